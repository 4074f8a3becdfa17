//! Leader election with a coordination.k8s.io/v1 Lease, client-go's algorithm: take the Lease
//! when it is free or expired, renew it every retry period, and stop leading when a renewal
//! has not succeeded within the renew deadline. Every write is a compare-and-swap on the
//! Lease's resourceVersion.
//!
//! (Stub: filled in by the leader work; see /work/helpers/s5/design.md.)

use tokio::sync::watch;

use super::KubeSettings;

/// Runs the elector until the returned receiver and every clone are dropped. `true` while this
/// replica leads: a writer must check it before each write and stop at once when it turns false.
pub fn spawn(client: kube::Client, settings: &KubeSettings) -> watch::Receiver<bool> {
    let _ = (client, settings);
    let (_tx, rx) = watch::channel(false);
    rx
}
