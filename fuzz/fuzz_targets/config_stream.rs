//! The data plane's side of the config stream: sequences of `ConfigUpdate::decode(bytes)`
//! applied to a `ConfigStore`, checked after every update against a plain model of the
//! stream's meaning (a snapshot replaces everything, upserts replace by key, removals delete):
//! same contents, lookups by IP / VIP that agree with the contents, the policy generation
//! bumped whenever the policies changed (or ztunnel would keep enforcing stale ones), and a
//! policy set that compiles from whatever arrived.
#![no_main]

use std::collections::HashMap;
use std::net::IpAddr;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use mesh_fuzz::r#gen;
use meshcore::policy::{DEFAULT_ROOT_NAMESPACE, PolicySet};
use meshcore::proto::config::{ConfigUpdate, Policy, Service, TrustBundle, Workload};
use meshcore::store::{ConfigStore, canonical};
use prost::Message;

/// What the stream means, written as simply as possible.
#[derive(Default)]
struct Model {
    version: u64,
    workloads: HashMap<String, Workload>,
    services: HashMap<String, Service>,
    policies: HashMap<String, Policy>,
    trust_bundle: Option<TrustBundle>,
}

impl Model {
    fn apply(&mut self, up: &ConfigUpdate) {
        if up.snapshot {
            self.workloads.clear();
            self.services.clear();
            self.policies.clear();
        }
        self.version = up.version;
        for k in &up.removed_workloads {
            self.workloads.remove(k);
        }
        for k in &up.removed_services {
            self.services.remove(k);
        }
        for k in &up.removed_policies {
            self.policies.remove(k);
        }
        for w in &up.workloads {
            self.workloads.insert(w.uid.clone(), w.clone());
        }
        for s in &up.services {
            self.services.insert(s.key.clone(), s.clone());
        }
        for p in &up.policies {
            self.policies.insert(p.key.clone(), p.clone());
        }
        if let Some(tb) = &up.trust_bundle {
            self.trust_bundle = Some(tb.clone());
        }
    }
}

/// Found by this target (regressions/config_stream/mapped-vip-unindexed), fixed in
/// core/src/store.rs: `ConfigStore` indexed an address listed in v4-mapped form
/// (`::ffff:10.0.0.1`) under that form while lookups canonicalise to IPv4, so such a pod or VIP
/// was never found. `true` would accept "nothing found" for such listings again.
const KNOWN_OPEN_MAPPED_LISTING: bool = false;

fn claims(ips: &[String], ip: IpAddr) -> bool {
    ips.iter()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .any(|a| canonical(a) == canonical(ip))
}

/// Whether a lookup of `ip` must find something listing `ips`.
fn must_find(ips: &[String], ip: IpAddr) -> bool {
    ips.iter()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .filter(|a| !(KNOWN_OPEN_MAPPED_LISTING && canonical(*a) != *a))
        .any(|a| canonical(a) == canonical(ip))
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut store = ConfigStore::default();
    let mut model = Model::default();
    for _ in 0..u.int_in_range(1..=8)? {
        let bytes = if u.ratio(1, 4)? {
            // Raw bytes from the wire: most do not decode, some do in odd ways.
            u.arbitrary::<&[u8]>()?.to_vec()
        } else {
            r#gen::config_update(u)?.encode_to_vec()
        };
        let Ok(update) = ConfigUpdate::decode(bytes.as_slice()) else {
            continue;
        };
        let policies_before = model.policies.clone();
        let generation_before = store.policy_generation;
        model.apply(&update);
        store.apply(update);
        check(
            &store,
            &model,
            policies_before != model.policies,
            generation_before,
        );
    }
    let set = PolicySet::compile(store.policies().map(|p| &**p), DEFAULT_ROOT_NAMESPACE);
    let _ = set.errors();
    Ok(())
}

fn check(store: &ConfigStore, model: &Model, policies_changed: bool, generation_before: u64) {
    assert_eq!(store.version, model.version);
    assert_eq!(store.trust_bundle(), model.trust_bundle.as_ref());
    if policies_changed {
        assert!(
            store.policy_generation > generation_before,
            "policies changed but the policy generation stayed {generation_before}"
        );
    }
    assert_eq!(store.workloads().count(), model.workloads.len());
    for (uid, w) in &model.workloads {
        assert_eq!(store.workload(uid).map(|a| &**a), Some(w), "workload {uid}");
    }
    assert_eq!(store.services().count(), model.services.len());
    let store_services: HashMap<&str, &Service> =
        store.services().map(|s| (s.key.as_str(), &**s)).collect();
    for (key, s) in &model.services {
        assert_eq!(store_services.get(key.as_str()), Some(&s), "service {key}");
    }
    assert_eq!(store.policies().count(), model.policies.len());
    for p in store.policies() {
        assert_eq!(model.policies.get(&p.key), Some(&**p), "policy {}", p.key);
    }
    for node in ["node-0", "node-1"] {
        let mut got: Vec<&str> = store
            .local_workloads(node)
            .map(|w| w.uid.as_str())
            .collect();
        let mut want: Vec<&str> = model
            .workloads
            .values()
            .filter(|w| w.node == node)
            .map(|w| w.uid.as_str())
            .collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "local workloads of {node}");
    }
    // Every address any workload or service lists, in both its forms: the lookup must find
    // something that claims it, and only such a thing.
    let mut addrs: Vec<IpAddr> = Vec::new();
    for ips in model
        .workloads
        .values()
        .map(|w| &w.ips)
        .chain(model.services.values().map(|s| &s.vips))
    {
        for ip in ips.iter().filter_map(|s| s.parse::<IpAddr>().ok()) {
            addrs.push(ip);
            addrs.push(match canonical(ip) {
                IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
                v6 => v6,
            });
        }
    }
    for ip in addrs {
        let claimed_by_workload = model.workloads.values().any(|w| must_find(&w.ips, ip));
        match store.workload_by_ip(ip) {
            Some(w) => assert!(
                claims(&w.ips, ip) && model.workloads.get(&w.uid) == Some(&**w),
                "workload_by_ip({ip}) gave {} which does not list it",
                w.uid
            ),
            None => assert!(
                !claimed_by_workload,
                "workload_by_ip({ip}) found nothing, but a workload lists it"
            ),
        }
        let claimed_by_service = model.services.values().any(|s| must_find(&s.vips, ip));
        match store.service_by_vip(ip) {
            Some(s) => assert!(
                claims(&s.vips, ip) && model.services.get(&s.key) == Some(&**s),
                "service_by_vip({ip}) gave {} which does not list it",
                s.key
            ),
            None => assert!(
                !claimed_by_service,
                "service_by_vip({ip}) found nothing, but a service lists it"
            ),
        }
    }
}
