//! Property test: for random sequences of views (pods moving between nodes, namespaces coming
//! and going, policies added/edited/removed, trust bundle changes) and a subscriber that skips
//! versions, every message equals what diffing whole node views sends, and applying them to an
//! empty client yields exactly `view_for_node` of the last version.

use std::collections::BTreeMap;

use meshcore::proto::config::{Endpoint, Service, TrustBundle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::config_service::view_for_node;
use crate::delta;

const ROOT: &str = "istio-system";
const NODES: [&str; 3] = ["n0", "n1", "n2"];
const NAMESPACES: [&str; 4] = ["a", "b", "c", ROOT];

fn pick<'a>(rng: &mut StdRng, xs: &[&'a str]) -> &'a str {
    xs[rng.random_range(0..xs.len())]
}

fn random_view(rng: &mut StdRng) -> MeshView {
    let mut v = MeshView::default();
    for i in 0..rng.random_range(0..8) {
        let ns = pick(rng, &NAMESPACES[..3]);
        let uid = format!("{ns}/w{i}");
        let mut w = Workload {
            uid: uid.clone(),
            name: format!("w{i}"),
            namespace: ns.into(),
            node: pick(rng, &NODES).into(),
            netns: format!("/run/netns/{}", rng.random_range(0..2)),
            ..Default::default()
        };
        if rng.random_bool(0.5) {
            w.annotations
                .insert("k".into(), rng.random_range(0..2).to_string());
        }
        if rng.random_bool(0.5) {
            w.labels
                .insert("app".into(), rng.random_range(0..2).to_string());
        }
        v.workloads.insert(uid, w);
    }
    for i in 0..rng.random_range(0..3) {
        // A pod scheduled but without an address yet: its namespace counts for the node.
        let node = pick(rng, &NODES).to_string();
        let ns = pick(rng, &NAMESPACES[..3]).to_string();
        v.identities_by_node
            .entry(node)
            .or_default()
            .insert((ns, format!("sa{i}")));
    }
    for i in 0..rng.random_range(0..3) {
        let key = format!("a/s{i}");
        let endpoints = v
            .workloads
            .keys()
            .filter(|_| rng.random_bool(0.3))
            .map(|k| Endpoint {
                workload_uid: k.clone(),
                ..Default::default()
            })
            .collect();
        let s = Service {
            key: key.clone(),
            name: format!("s{i}"),
            namespace: "a".into(),
            hostname: format!("s{i}.a.svc"),
            endpoints,
            ..Default::default()
        };
        v.services.insert(key, s);
    }
    for i in 0..rng.random_range(0..6) {
        let ns = pick(rng, &NAMESPACES);
        let kind = pick(
            rng,
            &[
                "AuthorizationPolicy",
                "AuthorizationPolicy",
                "PeerAuthentication",
                "RequestAuthentication",
            ],
        );
        let key = format!("{kind}/{ns}/p{i}");
        let spec = pick(
            rng,
            &[
                "{}",
                r#"{"action":"DENY","rules":[{}]}"#,
                r#"{"targetRefs":[{"group":"gateway.networking.k8s.io","kind":"Gateway","name":"wp"}]}"#,
                r#"{"targetRef":{"group":"","kind":"Service","name":"s0"}}"#,
            ],
        );
        let p = Policy {
            key: key.clone(),
            kind: kind.into(),
            namespace: ns.into(),
            name: format!("p{i}"),
            spec_json: spec.into(),
        };
        v.policies.insert(key, p);
    }
    v.trust_bundle = TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: vec![format!("root{}", rng.random_range(0..2))],
    };
    v
}

/// The next view: mostly the previous one with a few random changes, sometimes a fresh one.
fn next_view(rng: &mut StdRng, prev: &MeshView) -> MeshView {
    if rng.random_bool(0.2) {
        return random_view(rng);
    }
    let fresh = random_view(rng);
    let mut v = prev.clone();
    // Take one random section from the fresh view: small, correlated changes.
    match rng.random_range(0..5) {
        0 => v.workloads = fresh.workloads,
        1 => v.identities_by_node = fresh.identities_by_node,
        2 => v.services = fresh.services,
        3 => v.policies = fresh.policies,
        _ => v.trust_bundle = fresh.trust_bundle,
    }
    if let Some(w) = v.workloads.values_mut().next()
        && rng.random_bool(0.5)
    {
        // A pod moves, or only its netns changes (not a change for other nodes).
        if rng.random_bool(0.5) {
            w.node = pick(rng, &NODES).into();
        } else {
            w.netns.push('x');
        }
    }
    v
}

/// A ztunnel's config store: what it holds after applying updates.
#[derive(Default, Debug, PartialEq)]
struct Client {
    workloads: BTreeMap<String, Workload>,
    services: BTreeMap<String, Service>,
    policies: BTreeMap<String, Policy>,
    trust_bundle: Option<TrustBundle>,
}

impl Client {
    fn apply(&mut self, u: &ConfigUpdate) {
        if u.snapshot {
            *self = Client::default();
        }
        for k in &u.removed_workloads {
            self.workloads.remove(k);
        }
        for k in &u.removed_services {
            self.services.remove(k);
        }
        for k in &u.removed_policies {
            self.policies.remove(k);
        }
        for w in &u.workloads {
            self.workloads.insert(w.uid.clone(), w.clone());
        }
        for s in &u.services {
            self.services.insert(s.key.clone(), s.clone());
        }
        for p in &u.policies {
            self.policies.insert(p.key.clone(), p.clone());
        }
        if let Some(t) = &u.trust_bundle {
            self.trust_bundle = Some(t.clone());
        }
    }

    fn of(v: &MeshView) -> Client {
        Client {
            workloads: v.workloads.clone(),
            services: v.services.clone(),
            policies: v.policies.clone(),
            trust_bundle: Some(v.trust_bundle.clone()),
        }
    }
}

#[test]
fn node_updates_equal_whole_view_diffs_and_rebuild_the_node_view() {
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let shared = Shared::default();
        let mut views = vec![Arc::new(VersionedView {
            version: 1,
            view: random_view(&mut rng),
        })];
        for version in 2..30 {
            let view = next_view(&mut rng, &views[views.len() - 1].view);
            views.push(Arc::new(VersionedView { version, view }));
        }
        // Several subscribers, starting at different versions and skipping different ones,
        // sharing the diffs and facts.
        for (i, node) in NODES.iter().enumerate() {
            let start = rng.random_range(0..views.len() / 2);
            let (mut sub, snap) =
                NodeSubscriber::start(&shared, node.to_string(), ROOT.into(), views[start].clone());
            let mut sent = view_for_node(&views[start].view, node, ROOT);
            assert_eq!(
                snap,
                delta::snapshot(&sent, views[start].version),
                "seed {seed}"
            );
            let mut client = Client::default();
            client.apply(&snap);
            for v in &views[start + 1..] {
                if i > 0 && rng.random_bool(0.4) && v.version != views[views.len() - 1].version {
                    continue; // the watch channel coalesced this version
                }
                let got = sub.advance(&shared, v.clone());
                let next = view_for_node(&v.view, node, ROOT);
                let want = delta::delta(&sent, &next, v.version);
                assert_eq!(got, want, "seed {seed} node {node} version {}", v.version);
                if let Some(u) = &got {
                    client.apply(u);
                }
                sent = next;
            }
            let last = &views[views.len() - 1].view;
            assert_eq!(
                client,
                Client::of(&view_for_node(last, node, ROOT)),
                "seed {seed} node {node}"
            );
        }
    }
}

fn policy(kind: &str, spec: &str) -> Policy {
    Policy {
        key: format!("{kind}/a/p"),
        kind: kind.into(),
        namespace: "a".into(),
        name: "p".into(),
        spec_json: spec.into(),
    }
}

#[test]
fn nodes_are_not_sent_what_only_waypoints_enforce() {
    let gw = r#"{"targetRefs":[{"group":"gateway.networking.k8s.io","kind":"Gateway","name":"wp"}],"rules":[{}]}"#;
    let svc = r#"{"targetRef":{"group":"","kind":"Service","name":"web"}}"#;
    assert!(!for_nodes(&policy("AuthorizationPolicy", gw)));
    assert!(!for_nodes(&policy("AuthorizationPolicy", svc)));
    assert!(!for_nodes(&policy(
        "RequestAuthentication",
        r#"{"jwtRules":[]}"#
    )));
    // ztunnel enforces these (or reports them rejected): still sent.
    for spec in [
        "",
        "{}",
        r#"{"targetRefs":[],"rules":[{}]}"#,
        r#"{"targetRefs":"wp"}"#,
        r#"{"targetRef":null,"action":"DENY","rules":[{}]}"#,
        "not json",
    ] {
        assert!(for_nodes(&policy("AuthorizationPolicy", spec)), "{spec}");
    }
    assert!(for_nodes(&policy("PeerAuthentication", gw)));
}
