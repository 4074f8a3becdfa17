//! The config stream (`mesh.config.v1.ConfigService`): each authenticated node gets a snapshot
//! of the mesh view and then only what changed.
//!
//! Owns per-subscriber state (what it was last sent), the node check and what of the mesh a node
//! is told ([`view_for_node`]). Does not translate resources and does not decide what a diff
//! contains (see `delta`); the token was checked by `authn`'s interceptor before this runs.

use std::collections::BTreeSet;
use std::sync::Arc;

use meshcore::proto::config::config_service_server::ConfigService;
use meshcore::proto::config::{ConfigUpdate, SubscribeRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::authn::node_of;
use crate::delta;
use crate::translate::{MeshView, VersionedView};

/// Updates queued per subscriber before the sender waits; a slow node only slows itself.
const QUEUE: usize = 16;

pub struct ConfigStream {
    views: watch::Receiver<Arc<VersionedView>>,
    /// Istio's root namespace: its policies can apply to every node's pods.
    root_namespace: String,
    /// Becomes true at shutdown: open streams end so the server can stop.
    shutdown: watch::Receiver<bool>,
}

impl ConfigStream {
    pub fn new(
        views: watch::Receiver<Arc<VersionedView>>,
        root_namespace: String,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        ConfigStream {
            views,
            root_namespace,
            shutdown,
        }
    }
}

/// What `node` is sent of the mesh: what its ztunnel needs to route and enforce, no more.
///
/// - Every workload and Service: any pod may connect to any Service or pod, and the source's
///   name and labels label metrics. Other nodes' pods lose what only their own node uses: the
///   path of their network namespace and their annotations (capture knobs).
/// - Policies of the namespaces that have a pod on this node (policy is enforced at the
///   destination pod, by its node), and every policy of the root namespace (mesh-wide ones, and
///   root-namespace selectors that reach other namespaces). `root_namespace` must be the
///   ztunnels' `--root-namespace`.
/// - The trust bundle.
pub fn view_for_node(view: &MeshView, node: &str, root_namespace: &str) -> MeshView {
    // Pods without an address yet count too: their policies are in place before they start.
    let mut local_namespaces: BTreeSet<&str> = view
        .workloads
        .values()
        .filter(|w| w.node == node)
        .map(|w| w.namespace.as_str())
        .collect();
    if let Some(ids) = view.identities_by_node.get(node) {
        local_namespaces.extend(ids.iter().map(|(ns, _)| ns.as_str()));
    }
    let workloads = view
        .workloads
        .iter()
        .map(|(k, w)| {
            let mut w = w.clone();
            if w.node != node {
                w.netns.clear();
                w.annotations.clear();
            }
            (k.clone(), w)
        })
        .collect();
    let policies = view
        .policies
        .iter()
        .filter(|(_, p)| {
            p.namespace == root_namespace || local_namespaces.contains(p.namespace.as_str())
        })
        .map(|(k, p)| (k.clone(), p.clone()))
        .collect();
    MeshView {
        workloads,
        services: view.services.clone(),
        policies,
        // Route resources are for waypoints, which subscribe with their own scope.
        routes: Default::default(),
        trust_bundle: view.trust_bundle.clone(),
        identities_by_node: view
            .identities_by_node
            .iter()
            .filter(|(n, _)| n.as_str() == node)
            .map(|(n, ids)| (n.clone(), ids.clone()))
            .collect(),
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigStream {
    type SubscribeStream = ReceiverStream<Result<ConfigUpdate, Status>>;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = node_of(&req)?;
        let node = req.into_inner().node;
        if node != caller {
            return Err(Status::permission_denied(format!(
                "token is for node {caller:?} but the subscription is for node {node:?}"
            )));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut views = self.views.clone();
        let mut shutdown = self.shutdown.clone();
        let root_namespace = self.root_namespace.clone();
        tokio::spawn(async move {
            let current = views.borrow_and_update().clone();
            let mut sent = view_for_node(&current.view, &node, &root_namespace);
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
                let next = view_for_node(&current.view, &node, &root_namespace);
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
