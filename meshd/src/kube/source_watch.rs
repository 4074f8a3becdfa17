//! The watch connections of the Kubernetes source: one kube-runtime watcher per kind (with
//! client-go's backoff, bulk meshd never reads stripped before anything is kept) feeding that
//! kind's store, and one on CustomResourceDefinitions so an optional kind whose CRD appears is
//! read at once instead of at its next retry (up to 30 s away).
//!
//! Owns the streams and when to restart one; what an event means is the store's business.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tracing::{debug, info};

use super::source_store::{KindStore, Phase};
use crate::kube::kinds::{self, Kind};

/// CRD name → its resourceVersion, as last seen.
pub type Crds = BTreeMap<String, String>;

pub fn lock(store: &Mutex<KindStore>) -> MutexGuard<'_, KindStore> {
    // A panic while holding the lock leaves a store that is still a valid map; keep serving.
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What meshd never reads but the API sends with every object: server-side apply's
/// bookkeeping (about half of a typical object's metadata) and kubectl's copy of the whole
/// last applied object. Dropped from every event before it is parsed.
fn strip(obj: &mut DynamicObject) {
    obj.metadata.managed_fields = None;
    if let Some(a) = obj.metadata.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Watches `kind` into `store` forever, waking `changed` whenever the store says so.
pub async fn run_kind(
    client: Client,
    kind: Kind,
    store: Arc<Mutex<KindStore>>,
    changed: Arc<Notify>,
    mut crds: watch::Receiver<Crds>,
) {
    let crd = kind.crd_name();
    loop {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.resource);
        let mut events = pin!(
            watcher(api, watcher::Config::default())
                .modify(strip)
                .default_backoff()
        );
        // While the kind is not served: the CRD's resourceVersion then (None: no CRD). A CRD
        // created or changed since (e.g. now established) is worth a fresh start at once.
        let mut absent_with: Option<Option<String>> = None;
        loop {
            let crd_changed = async {
                let Some(then) = &absent_with else {
                    return std::future::pending().await;
                };
                let differs = |c: &Crds| c.get(&crd).is_some_and(|rv| Some(rv) != then.as_ref());
                if crds.wait_for(differs).await.is_err() {
                    // No CRD watcher any more: the backoff's retries are left.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                event = events.next() => {
                    // The watcher's stream does not end; if it ever did, start over.
                    let Some(event) = event else { break };
                    let mut s = lock(&store);
                    let wake = match event {
                        Ok(e) => s.handle(e),
                        Err(e) => s.failed(&e),
                    };
                    let absent = *s.phase() == Phase::Absent;
                    drop(s);
                    if wake {
                        changed.notify_one();
                    }
                    if !absent {
                        absent_with = None;
                    } else if absent_with.is_none() {
                        absent_with = Some(crds.borrow().get(&crd).cloned());
                    }
                }
                _ = crd_changed => {
                    info!("CRD {crd} changed; reading {} again", kind.describe());
                    break;
                }
            }
        }
    }
}

/// Keeps `tx` holding the CRDs that exist. Failing to watch them (RBAC) only costs promptness.
pub async fn run_crds(client: Client, tx: watch::Sender<Crds>) {
    let api: Api<DynamicObject> = Api::all_with(client, &kinds::crds());
    // Only names and versions are read; a CRD's schema can be megabytes.
    let slim = |o: &mut DynamicObject| {
        o.data = Value::Null;
        o.metadata.managed_fields = None;
        o.metadata.annotations = None;
    };
    let mut events = pin!(
        watcher(api, watcher::Config::default())
            .modify(slim)
            .default_backoff()
    );
    let mut relist: Option<Crds> = None;
    let mut reported = false;
    let entry = |o: &DynamicObject| {
        (
            o.metadata.name.clone().unwrap_or_default(),
            o.metadata.resource_version.clone().unwrap_or_default(),
        )
    };
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => relist = Some(Crds::new()),
            Ok(watcher::Event::InitApply(o)) => {
                let (name, rv) = entry(&o);
                relist.get_or_insert_default().insert(name, rv);
            }
            Ok(watcher::Event::InitDone) => {
                reported = false;
                tx.send_replace(relist.take().unwrap_or_default());
            }
            Ok(watcher::Event::Apply(o)) => {
                let (name, rv) = entry(&o);
                tx.send_modify(|c| {
                    c.insert(name, rv);
                });
            }
            Ok(watcher::Event::Delete(o)) => {
                let (name, _) = entry(&o);
                tx.send_modify(|c| {
                    c.remove(&name);
                });
            }
            Err(e) if !reported => {
                reported = true;
                info!(
                    "cannot watch CustomResourceDefinitions ({e}); a mesh CRD installed later is read at its kind's next retry rather than at once"
                );
            }
            Err(e) => debug!("CustomResourceDefinitions: {e}"),
        }
    }
}
