//! The Kubernetes resource source: one reflector per kind in [`super::kinds`], feeding the
//! same parser as the directory source and publishing the same `ResourceSet` channel.
//!
//! Owns the first-publish gate and the debounced rebuild. Nothing is published before every
//! kind's contents are known in full (a partial first view would strip policies mesh-wide);
//! after that, the set only changes when a store's contents do, so an API outage or a watch
//! that drops or expires leaves the last published set in force. The watch connections are
//! `source_watch`'s, each kind's objects `source_store`'s.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use super::kinds;
// Split out of this file to keep each part readable; private to the source.
#[path = "source_store.rs"]
mod source_store;
#[path = "source_watch.rs"]
mod source_watch;

use super::{KubeError, KubeSettings};
use crate::resources::ResourceSet;
use source_store::{KindStore, Phase};
use source_watch::lock;

/// How often `start` says what it is still waiting for.
const WAIT_REPORT: Duration = Duration::from_secs(10);

/// The running reflectors; dropping it stops them.
pub struct KubeSource {
    _tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self._tasks {
            t.abort();
        }
    }
}

type Stores = Arc<Vec<Arc<Mutex<KindStore>>>>;

impl KubeSource {
    /// Starts the reflectors and returns once every required kind has been listed in full, with
    /// the first complete set; never publishes a partial view. Waits as long as that takes
    /// (an unreachable API at start is waited for, and reported).
    pub async fn start(
        client: kube::Client,
        settings: &KubeSettings,
    ) -> Result<(KubeSource, watch::Receiver<Arc<ResourceSet>>), KubeError> {
        let kinds = kinds::watched();
        let stores: Stores = Arc::new(
            kinds
                .iter()
                .map(|k| Arc::new(Mutex::new(KindStore::new(k.clone()))))
                .collect(),
        );
        let changed = Arc::new(Notify::new());
        let (crds_tx, crds) = watch::channel(source_watch::Crds::new());
        // Built before anything is awaited, so that dropping `start` stops every task.
        let mut source = KubeSource {
            _tasks: vec![tokio::spawn(source_watch::run_crds(
                client.clone(),
                crds_tx,
            ))],
        };
        for (kind, store) in kinds.into_iter().zip(stores.iter()) {
            source._tasks.push(tokio::spawn(source_watch::run_kind(
                client.clone(),
                kind,
                store.clone(),
                changed.clone(),
                crds.clone(),
            )));
        }
        wait_until_listed(&stores, &changed).await;
        let first = merged(&stores);
        info!(
            namespaces = first.namespaces.len(),
            pods = first.pods.len(),
            services = first.services.len(),
            policies = first.policies.len(),
            "every kind listed in full; serving config from the Kubernetes API"
        );
        let (tx, rx) = watch::channel(Arc::new(first));
        source._tasks.push(tokio::spawn(publish(
            stores,
            changed,
            tx,
            settings.debounce,
        )));
        Ok((source, rx))
    }
}

/// Returns when every store is [`KindStore::ready`], saying now and then what it waits for.
async fn wait_until_listed(stores: &Stores, changed: &Notify) {
    let mut report = tokio::time::interval(WAIT_REPORT);
    report.tick().await; // the first tick is immediate; report only after a wait
    loop {
        let waiting: Vec<String> = stores
            .iter()
            .filter_map(|s| {
                let s = lock(s);
                if s.ready() {
                    return None;
                }
                Some(match s.phase() {
                    Phase::Waiting { error: Some(e) } => {
                        format!("{} (last attempt: {e})", s.kind().describe())
                    }
                    _ => s.kind().describe(),
                })
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = report.tick() => info!(
                "no config is served until the Kubernetes API has been listed in full; waiting for {}",
                waiting.join(", ")
            ),
        }
    }
}

/// Rebuilds and publishes the set after each burst of changes, until nobody listens.
async fn publish(
    stores: Stores,
    changed: Arc<Notify>,
    tx: watch::Sender<Arc<ResourceSet>>,
    debounce: Duration,
) {
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tx.closed() => return,
        }
        // Changes arriving meanwhile join this rebuild (one that lands during the rebuild
        // leaves a wake-up behind, so it is not lost either).
        tokio::time::sleep(debounce).await;
        let set = merged(&stores);
        tx.send_if_modified(|cur| {
            if **cur == set {
                return false;
            }
            debug!(
                namespaces = set.namespaces.len(),
                pods = set.pods.len(),
                services = set.services.len(),
                policies = set.policies.len(),
                routes = set.routes.len(),
                "resources changed"
            );
            *cur = Arc::new(set);
            true
        });
    }
}

/// Every store's contents in one set.
fn merged(stores: &Stores) -> ResourceSet {
    let mut set = ResourceSet::default();
    for store in stores.iter() {
        for r in lock(store).resources() {
            set.insert(r.clone());
        }
    }
    set
}
