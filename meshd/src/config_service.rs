//! The config stream (`mesh.config.v1.ConfigService`): each authenticated node gets a snapshot
//! of the mesh view and then only what changed.
//!
//! Owns per-subscriber state (what it was last sent) and the node check. Does not translate
//! resources and does not decide what a diff contains (see `delta`).

use std::sync::Arc;

use meshcore::nodeauth::NodeAuthority;
use meshcore::proto::config::config_service_server::ConfigService;
use meshcore::proto::config::{ConfigUpdate, SubscribeRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::authn::authenticate;
use crate::delta;
use crate::translate::{MeshView, VersionedView};

/// Updates queued per subscriber before the sender waits; a slow node only slows itself.
const QUEUE: usize = 16;

pub struct ConfigStream {
    views: watch::Receiver<Arc<VersionedView>>,
    auth: Arc<NodeAuthority>,
    /// Becomes true at shutdown: open streams end so the server can stop.
    shutdown: watch::Receiver<bool>,
}

impl ConfigStream {
    pub fn new(
        views: watch::Receiver<Arc<VersionedView>>,
        auth: Arc<NodeAuthority>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        ConfigStream {
            views,
            auth,
            shutdown,
        }
    }
}

/// What `node` is sent of the mesh. Every node gets everything today (routing to any Service
/// needs all workloads); this is the one place to narrow it per node later.
fn view_for_node(view: &MeshView, _node: &str) -> MeshView {
    view.clone()
}

#[tonic::async_trait]
impl ConfigService for ConfigStream {
    type SubscribeStream = ReceiverStream<Result<ConfigUpdate, Status>>;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = authenticate(&self.auth, &req)?;
        let node = req.into_inner().node;
        if node != caller {
            return Err(Status::permission_denied(format!(
                "token is for node {caller:?} but the subscription is for node {node:?}"
            )));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut views = self.views.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let current = views.borrow_and_update().clone();
            let mut sent = view_for_node(&current.view, &node);
            info!(%node, version = current.version, "node subscribed; sending snapshot");
            if tx
                .send(Ok(delta::snapshot(&sent, current.version)))
                .await
                .is_err()
            {
                return;
            }
            loop {
                tokio::select! {
                    changed = views.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                    _ = shutdown.wait_for(|s| *s) => break,
                }
                let current = views.borrow_and_update().clone();
                let next = view_for_node(&current.view, &node);
                if let Some(update) = delta::delta(&sent, &next, current.version) {
                    debug!(%node, version = current.version, "sending update");
                    if tx.send(Ok(update)).await.is_err() {
                        break;
                    }
                }
                sent = next;
            }
            info!(%node, "subscription ended");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
