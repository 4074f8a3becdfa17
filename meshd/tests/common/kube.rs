//! Kubernetes-source test support: the API server double with the mesh CRDs, objects to put in
//! it, what the API and a published set hold (as comparable keys), a recorder of every set a
//! source publishes, and meshd's captured log.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use meshd::kube::source::KubeSource;
use meshd::kube::{KubeSettings, kinds};
use meshd::resources::ResourceSet;
use serde_json::{Value, json};
use testbed::kubeapi::{ApiOptions, ApiServer, RequestMatch};
use tokio::sync::watch;

/// The double, with (or without) the Istio and Gateway API CRDs, and namespaces `mesh-system`
/// and `shop`.
pub fn cluster(crds: bool) -> ApiServer {
    let api = ApiServer::start(ApiOptions::default()).expect("API server double");
    if crds {
        api.install_mesh_crds().expect("mesh CRDs");
    }
    // meshd's own namespace (its CA Secret lives there), and the app's.
    for n in ["mesh-system", "shop"] {
        api.create(ns(n)).expect("namespace");
    }
    api
}

/// Source settings for `api` (short debounce: tests wait on conditions, not on it).
pub fn settings(api: &ApiServer) -> KubeSettings {
    let mut s = KubeSettings::new("mesh-system", "meshd-0");
    s.kubeconfig = Some(api.kubeconfig().to_path_buf());
    s.debounce = Duration::from_millis(20);
    s
}

/// Starts the source against `api` (returns once it has published its first set).
pub async fn source(api: &ApiServer) -> (KubeSource, watch::Receiver<Arc<ResourceSet>>) {
    let s = settings(api);
    let client = meshd::kube::client(&s).await.expect("client");
    KubeSource::start(client, &s).await.expect("source")
}

pub fn ns(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}}})
}

pub fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
           "spec": {"nodeName": node, "serviceAccountName": "sa",
                    "containers": [{"name": "c", "image": "x"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

pub fn service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}})
}

pub fn policy(name: &str, action: &str) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"action": action, "rules": [{"from": [{"source": {"principals": ["x"]}}]}]}})
}

pub fn http_route(name: &str, port: u64) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                    "rules": [{"backendRefs": [{"name": "web", "port": port}]}]}})
}

/// Every object in a set, as `Kind/ns/name` (`Namespace/name`).
pub fn keys(set: &ResourceSet) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    out.extend(set.namespaces.keys().map(|k| format!("Namespace/{k}")));
    out.extend(set.pods.keys().map(|k| format!("Pod/{k}")));
    out.extend(set.services.keys().map(|k| format!("Service/{k}")));
    out.extend(set.policies.keys().cloned());
    out.extend(set.gateways.keys().map(|k| format!("Gateway/{k}")));
    out.extend(set.routes.keys().cloned());
    out
}

/// Every object of the kinds meshd watches that the API holds, keyed as [`keys`].
pub fn api_keys(api: &ApiServer) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for k in kinds::watched() {
        for o in api.list(&k.resource.api_version, k.name()) {
            let m = &o["metadata"];
            let name = m["name"].as_str().unwrap_or_default();
            out.insert(match m["namespace"].as_str() {
                Some(ns) => format!("{}/{ns}/{name}", k.name()),
                None => format!("{}/{name}", k.name()),
            });
        }
    }
    out
}

/// Every set a source published, from its first, as [`keys`].
pub struct Recorder {
    pub sets: Arc<Mutex<Vec<BTreeSet<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub fn start(mut rx: watch::Receiver<Arc<ResourceSet>>) -> Recorder {
        let sets = Arc::new(Mutex::new(vec![keys(&rx.borrow_and_update())]));
        let s = sets.clone();
        let task = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let k = keys(&rx.borrow_and_update());
                s.lock().unwrap().push(k);
            }
        });
        Recorder { sets, task }
    }

    pub fn latest(&self) -> BTreeSet<String> {
        self.sets
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// Panics naming the first published set that lacks one of `must`.
    pub fn assert_always_held(&self, must: &BTreeSet<String>) {
        let sets = self.sets.lock().unwrap();
        for (i, s) in sets.iter().enumerate() {
            let lost: Vec<_> = must.difference(s).collect();
            assert!(
                lost.is_empty(),
                "published set {i} of {} lacks {lost:?}, which existed in the API all along",
                sets.len()
            );
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `r` is a watch request (kube's watcher sends `watch=true`).
pub fn is_watch(query: &str) -> bool {
    query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1")
}

/// Requests so far to `path` (exactly), as (watch?, code).
pub fn requests_to(api: &ApiServer, path: &str) -> Vec<(bool, u16)> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == path)
        .map(|r| (is_watch(&r.query), r.code))
        .collect()
}

pub fn gets(path: &str) -> RequestMatch {
    RequestMatch {
        method: Some("GET".into()),
        path_prefix: path.into(),
    }
}

/// meshd's log (everything the test binary logs at info and above), captured from the first
/// call on.
pub fn logs() -> &'static Mutex<String> {
    static LOGS: OnceLock<&'static Mutex<String>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static Mutex<String> = Box::leak(Box::new(Mutex::new(String::new())));
        let writer = move || LogWriter(buf);
        let _ = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .with_env_filter("info,kube_client=warn,kube_runtime=warn")
            .try_init();
        buf
    })
}

/// How many log lines contain every one of `parts`.
pub fn logged(parts: &[&str]) -> usize {
    let text = logs().lock().unwrap();
    text.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

struct LogWriter(&'static Mutex<String>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().push_str(&String::from_utf8_lossy(b));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
