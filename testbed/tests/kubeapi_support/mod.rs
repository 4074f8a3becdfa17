//! Helpers for the API server double's conformance tests: starting a double, a kube client for
//! it, waiting on conditions with deadlines, and a reflector that records every watcher event.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use testbed::kubeapi::{ApiOptions, ApiServer};

pub const NS: &str = "conformance";

/// A double with short bookmark intervals, and namespace [`NS`].
pub fn start() -> ApiServer {
    let opts = ApiOptions {
        bookmark_interval: Duration::from_millis(100),
        ..ApiOptions::default()
    };
    let server = ApiServer::start(opts).expect("the API server double starts");
    server
        .create(json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":NS}}))
        .expect("namespace created");
    server
}

/// Stops a double from async code (its runtime thread must not be dropped on a worker).
pub async fn stop(server: ApiServer) {
    let _ = tokio::task::spawn_blocking(move || drop(server)).await;
}

pub async fn client(server: &ApiServer) -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(server.kubeconfig()).expect("kubeconfig readable");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig usable");
    Client::try_from(cfg).expect("client")
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn configmap(name: &str, labels: Value, data: &str) -> Value {
    json!({"apiVersion":"v1","kind":"ConfigMap",
           "metadata":{"name":name,"namespace":NS,"labels":labels},
           "data":{"v":data}})
}

pub fn pod(name: &str, node: Option<&str>) -> Value {
    let mut spec = json!({"containers":[{"name":"app","image":"app:1"}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":name,"namespace":NS},"spec":spec})
}

/// name → resourceVersion of the double's objects of a kind in [`NS`], optionally filtered.
pub fn server_state(
    server: &ApiServer,
    api_version: &str,
    kind: &str,
    keep: impl Fn(&Value) -> bool,
) -> BTreeMap<String, String> {
    server
        .list(api_version, kind)
        .into_iter()
        .filter(|o| o["metadata"]["namespace"] == NS && keep(o))
        .map(|o| {
            let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
            let rv = o["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (name, rv)
        })
        .collect()
}

/// What a watcher reported, in order (objects by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    Error(String),
}

/// A reflector over a watcher, recording its events; stops when dropped.
pub struct Reflected<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    pub store: Store<K>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Reflected<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    pub fn spawn(api: Api<K>, cfg: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff());
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                let rec = match ev {
                    Ok(watcher::Event::Init) => Seen::Init,
                    Ok(watcher::Event::InitApply(o)) => Seen::InitApply(o.name_any()),
                    Ok(watcher::Event::InitDone) => Seen::InitDone,
                    Ok(watcher::Event::Apply(o)) => Seen::Apply(o.name_any()),
                    Ok(watcher::Event::Delete(o)) => Seen::Delete(o.name_any()),
                    Err(e) => Seen::Error(e.to_string()),
                };
                if let Ok(mut l) = log.lock() {
                    l.push(rec);
                }
            }
        });
        Reflected { store, seen, task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// name → resourceVersion of the store's objects.
    pub fn state(&self) -> BTreeMap<String, String> {
        self.store
            .state()
            .iter()
            .map(|o| (o.name_any(), o.resource_version().unwrap_or_default()))
            .collect()
    }

    pub fn count(&self, which: &Seen) -> usize {
        self.seen().iter().filter(|s| *s == which).count()
    }

    /// Names reported deleted.
    pub fn deleted(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Delete(n) => Some(n),
                _ => None,
            })
            .collect()
    }

    pub async fn ready(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.store.wait_until_ready())
            .await
            .expect("the reflector's first list within 10 s")
            .expect("store ready");
    }
}

impl<K: Resource + 'static> Drop for Reflected<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}
