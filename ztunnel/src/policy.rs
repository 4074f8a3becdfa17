//! L4 policy in ztunnel: compiling the config's policies, and re-checking live connections.
//!
//! The policy *semantics* live in `meshcore::policy`; this module owns when they are applied:
//! a [`PolicySet`] is compiled whenever the config's policies change (its warnings and errors
//! logged once), and every live inbound connection is registered in [`LiveConns`] so that a
//! policy change can close those it now denies, within one config update.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meshcore::policy::{Connection, Decision, DecisionCache, MtlsMode, PolicySet};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::config::ConfigRx;
use crate::proxy::Pod;

/// The current compiled policies.
pub type PoliciesRx = watch::Receiver<Arc<PolicySet>>;

/// Compiles policies whenever the config's policies change; re-checks live connections.
pub async fn run(
    mut config: ConfigRx,
    root_namespace: String,
    tx: watch::Sender<Arc<PolicySet>>,
    live: Arc<LiveConns>,
    cache: Arc<DecisionCache>,
) {
    let mut generation = 0;
    loop {
        let store = config.borrow_and_update().clone();
        if let Some(store) = store.filter(|s| s.policy_generation != generation) {
            {
                generation = store.policy_generation;
                let set = Arc::new(PolicySet::compile(
                    store.policies().map(|p| p.as_ref()),
                    &root_namespace,
                ));
                for r in set.reports() {
                    for e in &r.errors {
                        error!(policy = %r.key, "policy rejected: {e}");
                    }
                    for w in &r.warnings {
                        warn!(policy = %r.key, "policy: {w}");
                    }
                }
                cache.clear();
                tx.send_replace(set.clone());
                let closed = live.recheck(&set, &cache);
                info!(
                    policies = store.policies().count(),
                    closed, "policies updated"
                );
            }
        }
        if config.changed().await.is_err() {
            return;
        }
    }
}

/// Whether an inbound connection may proceed, with the reason when not.
pub fn check(
    set: &PolicySet,
    cache: &DecisionCache,
    pod: &Pod,
    conn: &Connection,
) -> Result<(), String> {
    if conn.src_identity.is_none()
        && set.mtls_mode(&pod.workload, conn.dst_port) == MtlsMode::Strict
    {
        return Err("PeerAuthentication STRICT: plaintext refused".to_string());
    }
    match cache.authorize(set, conn, &pod.workload) {
        Decision::Allow => Ok(()),
        Decision::Deny { policy } => Err(format!("denied by AuthorizationPolicy: {policy}")),
    }
}

struct Live {
    pod: Arc<Pod>,
    conn: Connection,
    cancel: Arc<Notify>,
}

/// Every open inbound connection, so policy changes can reach them.
#[derive(Default)]
pub struct LiveConns {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Live>>,
}

/// Removes its connection from the registry when dropped.
pub struct LiveGuard {
    id: u64,
    registry: Arc<LiveConns>,
    /// Notified when a policy change denies this connection.
    pub cancel: Arc<Notify>,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.registry
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl LiveConns {
    pub fn register(self: &Arc<Self>, pod: Arc<Pod>, conn: Connection) -> LiveGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(Notify::new());
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Live {
                pod,
                conn,
                cancel: cancel.clone(),
            },
        );
        LiveGuard {
            id,
            registry: self.clone(),
            cancel,
        }
    }

    /// Closes every live connection `set` now denies; returns how many.
    pub fn recheck(&self, set: &PolicySet, cache: &DecisionCache) -> usize {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for live in map.values() {
            if let Err(reason) = check(set, cache, &live.pod, &live.conn) {
                info!(dst.workload = %live.pod.workload.uid, src.identity = ?live.conn.src_identity.as_ref().map(|i| i.to_string()),
                    dst.port = live.conn.dst_port, %reason, "closing live connection after policy change");
                // notify_one keeps a permit, so a copy loop not yet waiting still sees it.
                live.cancel.notify_one();
                closed += 1;
            }
        }
        closed
    }
}
