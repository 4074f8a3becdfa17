//! Kubernetes mode at a tenth of the scale (1,000 pods, 100 Services, 100 policies, 10
//! nodes): meshd against the API server double, one real config-stream subscriber per node.
//! Every node's view must equal what the synthetic cluster's own model says it needs — every
//! workload and Service, only its namespaces' and the root namespace's policies, no routes —
//! after the first sync and again after churn. Correctness only: nothing here is timed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TRUST_DOMAIN, channel, request};
use meshcore::proto::config::SubscribeRequest;
use meshcore::proto::config::config_service_client::ConfigServiceClient;
use meshcore::store::ConfigStore;
use meshd::daemon::{self, RunConfig, RunOptions};
use meshd::kube::KubeSettings;
use meshd::settings::Listen;
use meshd::translate::Settings;
use serde_json::{Value, json};
use testbed::kubeapi::synth::{Change, Synth, SynthSize};
use testbed::kubeapi::{ApiOptions, ApiServer};

/// Generous: a debug meshd lists ~1,300 objects and translates them on a shared 2-core box.
const CONVERGE: Duration = Duration::from_secs(90);
const MESHD_NAMESPACE: &str = "mesh-system";

/// Runs `f` on the double from a blocking thread (its methods block on its own runtime).
async fn on_api<T: Send + 'static>(
    api: &Arc<ApiServer>,
    f: impl FnOnce(&ApiServer) -> T + Send + 'static,
) -> T {
    let api = api.clone();
    tokio::task::spawn_blocking(move || f(&api))
        .await
        .expect("API task panicked")
}

fn apply(api: &ApiServer, change: &Change) {
    match change {
        Change::Put(obj) => {
            api.put(obj.clone())
                .unwrap_or_else(|e| panic!("put {}: {e}", obj["metadata"]));
        }
        Change::Delete {
            api_version,
            kind,
            namespace,
            name,
        } => api
            .delete(api_version, kind, Some(namespace), name)
            .unwrap_or_else(|e| panic!("delete {kind} {namespace}/{name}: {e}")),
    }
}

/// One node's subscription: what it holds, and how its stream ended if it did.
struct Subscriber {
    node: String,
    store: Arc<Mutex<ConfigStore>>,
    failed: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

async fn subscribe(sock: PathBuf, node: String, token: String) -> Subscriber {
    let store = Arc::new(Mutex::new(ConfigStore::default()));
    let failed = Arc::new(Mutex::new(None));
    let (s, f, n) = (store.clone(), failed.clone(), node.clone());
    let task = tokio::spawn(async move {
        let mut client =
            ConfigServiceClient::new(channel(&sock).await).max_decoding_message_size(256 << 20);
        let req = SubscribeRequest {
            node: n,
            ..Default::default()
        };
        let mut stream = match client.subscribe(request(req, Some(&token))).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                *f.lock().unwrap() = Some(format!("subscribe: {e}"));
                return;
            }
        };
        let why = loop {
            match stream.message().await {
                Ok(Some(u)) => s.lock().unwrap().apply(u),
                Ok(None) => break "stream ended".to_string(),
                Err(e) => break format!("stream: {e}"),
            }
        };
        *f.lock().unwrap() = Some(why);
    });
    Subscriber {
        node,
        store,
        failed,
        task,
    }
}

/// What the API holds beyond the model: Services meshd itself rendered (waypoints).
fn rendered_services(api: &ApiServer, synth: &Synth) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for s in api.list("v1", "Service") {
        let key = format!(
            "{}/{}",
            s["metadata"]["namespace"].as_str().unwrap_or(""),
            s["metadata"]["name"].as_str().unwrap_or("")
        );
        if synth.services.contains_key(&key) {
            continue;
        }
        if s["metadata"]["labels"]["gateway.istio.io/managed"].is_null() {
            return Err(format!(
                "Service {key} in the API is neither the model's nor meshd's"
            ));
        }
        out.insert(key);
    }
    Ok(out)
}

/// How `node`'s store differs from what the model says it needs (empty: equal).
fn differences(
    node: &str,
    store: &ConfigStore,
    synth: &Synth,
    vips: &BTreeMap<String, BTreeSet<String>>,
    rendered: &BTreeSet<String>,
) -> Vec<String> {
    let mut d = Vec::new();
    let got: BTreeSet<String> = store.workloads().map(|w| w.uid.clone()).collect();
    let want = synth.workloads();
    for uid in want.difference(&got) {
        d.push(format!("{node}: workload {uid} missing"));
    }
    for uid in got.difference(&want) {
        d.push(format!("{node}: workload {uid} should not be there"));
    }
    for uid in want.intersection(&got) {
        let (pod, w) = (&synth.pods[uid], store.workload(uid).expect("listed"));
        let local = pod.node == node;
        let labels: BTreeMap<String, String> = w
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let annotations_ok = if local {
            w.annotations.get("prometheus.io/port").map(String::as_str) == Some("15020")
        } else {
            w.annotations.is_empty()
        };
        let fine = w.name == pod.name
            && w.namespace == pod.namespace
            && w.node == pod.node
            && w.service_account == pod.service_account
            && w.ips == pod.ips
            && labels == pod.labels
            && w.captured == synth.captured(pod)
            && w.trust_domain == TRUST_DOMAIN
            && w.workload_name == pod.owner
            && w.netns.is_empty()
            && annotations_ok;
        if !fine {
            d.push(format!("{node}: workload {uid} is {w:?}, model {pod:?}"));
        }
    }
    let got: BTreeSet<String> = store.services().map(|s| s.key.clone()).collect();
    let want: BTreeSet<String> = synth.services.keys().chain(rendered).cloned().collect();
    if got != want {
        d.push(format!(
            "{node}: Services differ: missing {:?}, extra {:?}",
            want.difference(&got).collect::<Vec<_>>(),
            got.difference(&want).collect::<Vec<_>>()
        ));
    }
    for (key, svc) in &synth.services {
        let Some(s) = store.service(key) else {
            continue;
        };
        let endpoints: BTreeMap<String, BTreeMap<u32, u32>> = s
            .endpoints
            .iter()
            .map(|e| {
                let ports = e.ports.iter().map(|(k, v)| (*k, *v)).collect();
                (e.workload_uid.clone(), ports)
            })
            .collect();
        let ports: Vec<(u32, u32, &str, &str)> = s
            .ports
            .iter()
            .map(|p| {
                (
                    p.port,
                    p.target_port,
                    p.name.as_str(),
                    p.app_protocol.as_str(),
                )
            })
            .collect();
        let want_ports: Vec<(u32, u32, &str, &str)> = svc
            .ports
            .iter()
            .map(|p| {
                let target = match &p.target {
                    testbed::kubeapi::synth::TargetPort::Number(n) => u32::from(*n),
                    testbed::kubeapi::synth::TargetPort::Named(_) => 0,
                };
                (u32::from(p.port), target, p.name.as_str(), p.app_protocol)
            })
            .collect();
        let got_vips: BTreeSet<String> = s.vips.iter().cloned().collect();
        let fine = endpoints == synth.endpoints(svc)
            && ports == want_ports
            && s.hostname == format!("{}.{}.svc.cluster.local", svc.name, svc.namespace)
            && Some(&got_vips) == vips.get(key)
            && (svc.headless == got_vips.is_empty());
        if !fine {
            d.push(format!(
                "{node}: Service {key}: endpoints {endpoints:?} (model {:?}), ports {ports:?} \
                 (model {want_ports:?}), VIPs {got_vips:?} (API {:?})",
                synth.endpoints(svc),
                vips.get(key)
            ));
        }
    }
    let got: BTreeSet<String> = store.policies().map(|p| p.key.clone()).collect();
    let want = synth.policies_for_node(node);
    if got != want {
        d.push(format!(
            "{node}: policies differ: missing {:?}, extra {:?}",
            want.difference(&got).collect::<Vec<_>>(),
            got.difference(&want).collect::<Vec<_>>()
        ));
    }
    for p in store.policies() {
        let Some(m) = synth.policies.get(&p.key) else {
            continue;
        };
        let spec: Value = serde_json::from_str(&p.spec_json).unwrap_or(Value::Null);
        if spec != m.spec || p.kind != m.kind || p.namespace != m.namespace || p.name != m.name {
            d.push(format!("{node}: policy {} is {p:?}, model {m:?}", p.key));
        }
    }
    if store.routes().next().is_some() {
        d.push(format!(
            "{node}: was sent route resources (waypoints' business)"
        ));
    }
    if store.trust_bundle().is_none_or(|b| b.roots_pem.is_empty()) {
        d.push(format!("{node}: no trust bundle"));
    }
    d
}

/// Waits until every subscriber's view equals the model's; panics with the differences left.
async fn converge(api: &Arc<ApiServer>, subs: &[Subscriber], synth: &Synth, what: &str) {
    let synth = Arc::new(synth.clone());
    let vips = {
        let synth = synth.clone();
        on_api(api, move |api| {
            synth
                .services
                .values()
                .filter_map(|s| {
                    let obj = api.get("v1", "Service", Some(&s.namespace), &s.name)?;
                    let ips = obj["spec"]["clusterIPs"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    let ips = ips
                        .iter()
                        .filter_map(|v| v.as_str())
                        .filter(|v| *v != "None")
                        .map(String::from)
                        .collect();
                    Some((format!("{}/{}", s.namespace, s.name), ips))
                })
                .collect::<BTreeMap<String, BTreeSet<String>>>()
        })
        .await
    };
    assert_eq!(vips.len(), synth.services.len(), "the API lost Services");
    let start = Instant::now();
    loop {
        let rendered = {
            let synth = synth.clone();
            on_api(api, move |api| rendered_services(api, &synth)).await
        };
        let rendered = rendered.unwrap_or_else(|e| panic!("{e}"));
        let mut diffs = Vec::new();
        for s in subs {
            if let Some(why) = s.failed.lock().unwrap().clone() {
                panic!("{}'s subscription failed: {why}", s.node);
            }
            let store = s.store.lock().unwrap();
            diffs.extend(differences(&s.node, &store, &synth, &vips, &rendered));
        }
        if diffs.is_empty() {
            return;
        }
        if start.elapsed() > CONVERGE {
            let n = diffs.len();
            diffs.truncate(20);
            panic!(
                "{what}: {n} differences after {CONVERGE:?}, first:\n{}",
                diffs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_gets_exactly_what_it_needs_at_a_tenth_of_the_scale() {
    let api = Arc::new(
        tokio::task::spawn_blocking(|| ApiServer::start(ApiOptions::default()))
            .await
            .unwrap()
            .expect("the API server double starts"),
    );
    let mut synth = Synth::new(SynthSize::divided(10), 42);
    let objects = synth.objects();
    on_api(&api, move |api| {
        api.install_mesh_crds().expect("CRDs install");
        let ns =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": MESHD_NAMESPACE}});
        api.create(ns).expect("meshd's namespace");
        for obj in &objects {
            apply(api, &Change::Put(obj.clone()));
        }
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let sock = dir.path().join("meshd.sock");
    let cfg = RunConfig {
        config_dir: dir.path().join("unused-config"),
        state_dir: state.clone(),
        listen: Listen::Unix(sock.clone()),
        settings: Settings {
            trust_domain: TRUST_DOMAIN.into(),
            cluster_domain: "cluster.local".into(),
        },
        root_namespace: testbed::kubeapi::synth::ROOT_NAMESPACE.into(),
        cert_lifetime: Duration::from_secs(3600),
        poll_interval: Duration::from_millis(50),
    };
    let opts = RunOptions {
        kube: Some(KubeSettings {
            kubeconfig: Some(api.kubeconfig().to_path_buf()),
            ..KubeSettings::new(MESHD_NAMESPACE, "meshd-0")
        }),
        ..Default::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let meshd = tokio::spawn(daemon::run_with(cfg, opts, async move {
        let _ = stopped.await;
    }));
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if meshd.is_finished() {
            panic!("meshd stopped: {:?}", meshd.await);
        }
        assert!(start.elapsed() < CONVERGE, "meshd did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Node tokens from meshd's own secret (they keep working in Kubernetes mode).
    let authority = meshd::state::node_authority(&state).unwrap();
    let mut subs = Vec::new();
    for node in synth.nodes() {
        let token = authority.token(&node, Duration::from_secs(3600));
        subs.push(subscribe(sock.clone(), node, token).await);
    }
    converge(&api, &subs, &synth, "first sync").await;

    // Churn: pods come and go, labels and policies change; then every view is right again.
    for _ in 0..200 {
        let c = synth.churn();
        on_api(&api, move |api| apply(api, &c.change)).await;
    }
    converge(&api, &subs, &synth, "after churn").await;

    for s in &subs {
        s.task.abort();
    }
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), meshd).await;
}
