//! What the leader writes to the API: each waypoint Gateway's ServiceAccount, Deployment and
//! Service (server-side apply, owner-referenced to the Gateway), the `istio-waypoint`
//! GatewayClass if absent, and status (Gateways, routes, policies) — only on change, with the
//! right observedGeneration.
//!
//! (Stub: filled in by the writer work; see /work/helpers/s5/design.md.)

use std::sync::Arc;

use tokio::sync::watch;

use super::KubeSettings;
use crate::translate::VersionedView;

/// Writes while `leader` is true, from every published view.
pub fn spawn(
    client: kube::Client,
    settings: &KubeSettings,
    views: watch::Receiver<Arc<VersionedView>>,
    leader: watch::Receiver<bool>,
) {
    let _ = (client, settings, views, leader);
}
