//! The Kubernetes resource source: one reflector per kind in [`super::kinds`], feeding the
//! same parser as the directory source and publishing the same `ResourceSet` channel.
//!
//! (Stub: filled in by the source work; see /work/helpers/s5/design.md.)

use std::sync::Arc;

use tokio::sync::watch;

use super::{KubeError, KubeSettings};
use crate::resources::ResourceSet;

/// The running reflectors; dropping it stops them.
pub struct KubeSource {
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self._tasks {
            t.abort();
        }
    }
}

impl KubeSource {
    /// Starts the reflectors and returns once every required kind has been listed in full, with
    /// the first complete set; never publishes a partial view.
    pub async fn start(
        client: kube::Client,
        settings: &KubeSettings,
    ) -> Result<(KubeSource, watch::Receiver<Arc<ResourceSet>>), KubeError> {
        let _ = (client, settings);
        Err(KubeError::Other(
            "the Kubernetes source is not built yet".into(),
        ))
    }
}
