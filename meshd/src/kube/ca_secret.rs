//! The CA root in a Secret (`mesh-ca` in meshd's namespace, created if absent) so every
//! replica signs with the same root and a restart keeps it; the root certificate published
//! in a ConfigMap (`mesh-root-cert`) for clients to trust meshd's serving certificate.
//!
//! (Stub: filled in by the identity work; see /work/helpers/s5/design.md.)

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use super::{KubeError, KubeSettings};
use crate::roots::Roots;

/// Makes `ca_dir` hold the CA stored in the Secret (creating the Secret if absent), and keeps
/// it in step with the Secret from then on (a rotation step changes the Secret; every replica
/// follows). Returns once `ca_dir` holds a usable CA.
pub async fn sync(
    client: kube::Client,
    settings: &KubeSettings,
    ca_dir: &Path,
    trust_domain: &str,
) -> Result<(), KubeError> {
    let _ = (client, settings, ca_dir, trust_domain);
    Ok(())
}

/// Publishes the trusted roots in the root ConfigMap while `leader` is true.
pub fn publish_root(
    client: kube::Client,
    settings: &KubeSettings,
    roots: watch::Receiver<Arc<Roots>>,
    leader: watch::Receiver<bool>,
) {
    let _ = (client, settings, roots, leader);
}
