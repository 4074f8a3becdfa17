//! The config subscription: keeps a local copy of what meshd says, through meshd outages.
//!
//! Owns the stream, its reconnect backoff, and publishing each new [`ConfigStore`] on a watch
//! channel. If meshd goes away, the last config stays in force and we reconnect with capped,
//! jittered exponential backoff. A config that removes every pod of this node at once is what a
//! control-plane fault looks like (an emptied source, a broken translation), so it is held back
//! until it is confirmed ([`Suspicion`]). Does not act on the config.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshcore::proto::config::SubscribeRequest;
use meshcore::proto::config::config_service_client::ConfigServiceClient;
use meshcore::store::ConfigStore;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::meshd::Meshd;

/// The latest config; `None` until the first snapshot arrives.
pub type ConfigRx = watch::Receiver<Option<Arc<ConfigStore>>>;

/// Subscribes forever with `request` (a ztunnel names its node; a waypoint also its Gateway).
/// Returns only when every receiver is gone. A config that removes every pod of the node is
/// applied only once it has stood for `hold` (or the pods are really gone).
pub async fn run(
    meshd: Meshd,
    request: SubscribeRequest,
    hold: Duration,
    tx: watch::Sender<Option<Arc<ConfigStore>>>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let node = request.node.clone();
    loop {
        match subscribe_once(&meshd, &request, hold, &tx, &mut backoff).await {
            Ok(()) => warn!(%node, "config stream from meshd ended; keeping the last config"),
            Err(status) => {
                warn!(%node, code = ?status.code(), message = status.message(), "config stream from meshd failed; keeping the last config")
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// How often a held config is checked for confirmation by the kernel (its pods' namespaces gone).
const CONFIRM_POLL: Duration = Duration::from_millis(500);

async fn subscribe_once(
    meshd: &Meshd,
    request: &SubscribeRequest,
    hold: Duration,
    tx: &watch::Sender<Option<Arc<ConfigStore>>>,
    backoff: &mut Backoff,
) -> Result<(), tonic::Status> {
    let mut client =
        ConfigServiceClient::new(meshd.channel.clone()).max_decoding_message_size(256 << 20);
    let mut stream = client
        .subscribe(meshd.request(request.clone()))
        .await?
        .into_inner();
    let node = request.node.as_str();
    // What meshd has said so far on this stream; published unless it is suspect.
    let mut latest = tx.borrow().as_deref().cloned().unwrap_or_default();
    // Since when `latest` has been held back.
    let mut held_since: Option<Instant> = None;
    loop {
        let update = match held_since {
            None => stream.message().await?,
            Some(since) => tokio::select! {
                m = stream.message() => m?,
                _ = tokio::time::sleep(CONFIRM_POLL) => {
                    let published = tx.borrow().clone();
                    match Suspicion::of(published.as_deref(), &latest, node) {
                        Some(s) if since.elapsed() < hold && !s.confirmed_by_kernel() => {}
                        Some(s) => {
                            warn!(%node, pods = ?s.vanished, held_s = since.elapsed().as_secs(),
                                "applying a config that removes every pod of this node: it stood for the hold time or the pods are gone");
                            held_since = None;
                            tx.send_replace(Some(Arc::new(latest.clone())));
                        }
                        None => held_since = None,
                    }
                    continue;
                }
            },
        };
        let Some(update) = update else { return Ok(()) };
        let snapshot = update.snapshot;
        latest.apply(update);
        if snapshot {
            info!(
                version = latest.version,
                workloads = latest.workloads().count(),
                services = latest.services().count(),
                "config snapshot from meshd"
            );
            backoff.reset();
            // The snapshot's decode and the store's rebuild leave their garbage behind.
            crate::memory::trim_soon();
        }
        let published = tx.borrow().clone();
        if let Some(s) = Suspicion::of(published.as_deref(), &latest, node)
            && !s.confirmed_by_kernel()
        {
            if held_since.is_none() {
                warn!(%node, pods = ?s.vanished, hold_s = hold.as_secs(), version = latest.version,
                    "meshd's config removes every pod of this node at once; holding it back in case the control plane is at fault (capture and policy stay as they are)");
                held_since = Some(Instant::now());
            }
            continue;
        }
        if held_since.take().is_some() {
            info!(%node, version = latest.version, "config no longer removes every pod of this node; applying it");
        }
        tx.send_replace(Some(Arc::new(latest.clone())));
    }
}

/// A config that would remove, at once, every captured pod this node runs.
#[derive(Debug, PartialEq, Eq)]
pub struct Suspicion {
    /// The pods that vanished: (uid, network namespace path).
    pub vanished: Vec<(String, String)>,
}

impl Suspicion {
    /// Whether going from `before` to `after` removes every captured pod of `node` from the
    /// config (not merely takes it out of the mesh: that is a label change, a user's act).
    pub fn of(before: Option<&ConfigStore>, after: &ConfigStore, node: &str) -> Option<Suspicion> {
        let before = before?;
        if after.local_workloads(node).next().is_some() {
            return None;
        }
        let vanished: Vec<(String, String)> = before
            .local_workloads(node)
            .filter(|w| w.captured)
            .map(|w| (w.uid.clone(), w.netns.clone()))
            .collect();
        (!vanished.is_empty()).then_some(Suspicion { vanished })
    }

    /// True when every vanished pod's network namespace is gone: the pods really were deleted,
    /// whatever the control plane says.
    pub fn confirmed_by_kernel(&self) -> bool {
        self.vanished
            .iter()
            .all(|(_, netns)| netns.is_empty() || !Path::new(netns).exists())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcore::proto::config::{ConfigUpdate, Workload};

    fn store(workloads: &[(&str, &str, bool, &str)]) -> ConfigStore {
        let mut s = ConfigStore::default();
        s.apply(ConfigUpdate {
            snapshot: true,
            workloads: workloads
                .iter()
                .map(|(uid, node, captured, netns)| Workload {
                    uid: uid.to_string(),
                    node: node.to_string(),
                    captured: *captured,
                    netns: netns.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        s
    }

    #[test]
    fn a_config_that_empties_this_node_is_suspect() {
        let live = "/proc/self/ns/net";
        let before = store(&[("a/x", "n0", true, live), ("b/y", "n1", true, live)]);
        // Everything gone (an emptied source), or just this node's pods gone.
        for after in [store(&[]), store(&[("b/y", "n1", true, live)])] {
            let s = Suspicion::of(Some(&before), &after, "n0").expect("suspect");
            assert_eq!(s.vanished, vec![("a/x".to_string(), live.to_string())]);
            assert!(!s.confirmed_by_kernel(), "the pod's netns still exists");
        }
    }

    #[test]
    fn ordinary_changes_are_not_suspect() {
        let live = "/proc/self/ns/net";
        let before = store(&[("a/x", "n0", true, live), ("a/z", "n0", true, live)]);
        // One of two pods removed; a pod leaving the mesh (label change); the first config.
        assert_eq!(
            Suspicion::of(Some(&before), &store(&[("a/x", "n0", true, live)]), "n0"),
            None
        );
        assert_eq!(
            Suspicion::of(Some(&before), &store(&[("a/x", "n0", false, live)]), "n0"),
            None
        );
        assert_eq!(Suspicion::of(None, &store(&[]), "n0"), None);
        // Another node emptied: not this node's business.
        assert_eq!(Suspicion::of(Some(&before), &store(&[]), "n1"), None);
        // Nothing was captured here: nothing to protect.
        let uncaptured = store(&[("a/x", "n0", false, live)]);
        assert_eq!(Suspicion::of(Some(&uncaptured), &store(&[]), "n0"), None);
    }

    #[test]
    fn pods_whose_namespaces_are_gone_confirm_the_removal() {
        let before = store(&[("a/x", "n0", true, "/run/netns/no-such-pod-ns-for-test")]);
        let s = Suspicion::of(Some(&before), &store(&[]), "n0").expect("suspect");
        assert!(s.confirmed_by_kernel());
    }
}
