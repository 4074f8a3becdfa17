//! The config stream (`mesh.config.v1.ConfigService`): each authenticated node (or waypoint)
//! gets a snapshot of its part of the mesh view and then only what changed.
//!
//! Owns the streams, who may subscribe as what (a node token for its node, a service-account
//! token for the waypoint Gateway that runs as it), and what of the mesh a node is told
//! ([`view_for_node`]; a waypoint's scope is `config_waypoint`'s). A node's updates are
//! computed incrementally by `config_node` (what changed is found once per version pair for
//! all nodes); a waypoint's by diffing its whole view (`delta`). Does not translate resources;
//! the token was checked by `authn`'s interceptor before this runs.

use std::collections::BTreeSet;
use std::sync::Arc;

use meshcore::nodeauth::Principal;
use meshcore::proto::config::config_service_server::ConfigService;
use meshcore::proto::config::{ConfigUpdate, SubscribeRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::authn::principal_of;
use crate::config_node::{self, NodeSubscriber};
pub use crate::config_waypoint::view_for_waypoint;
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
    /// Per-version facts and diffs, computed once for every node subscriber.
    shared: Arc<config_node::Shared>,
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
            shared: Arc::default(),
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
///   ztunnels' `--root-namespace`. Not those only waypoints enforce (`config_node::for_nodes`:
///   RequestAuthentications, AuthorizationPolicies attached with `targetRefs`).
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
        .filter(|(_, p)| config_node::for_nodes(p))
        .map(|(k, p)| (k.clone(), p.clone()))
        .collect();
    MeshView {
        workloads,
        services: view.services.clone(),
        policies,
        trust_bundle: view.trust_bundle.clone(),
        identities_by_node: view
            .identities_by_node
            .iter()
            .filter(|(n, _)| n.as_str() == node)
            .map(|(n, ids)| (n.clone(), ids.clone()))
            .collect(),
        // Route resources are for waypoints, which subscribe with their own scope.
        ..Default::default()
    }
}

/// Whom a subscription is for.
#[derive(Debug, Clone)]
enum Scope {
    Node(String),
    /// A waypoint, by its Gateway's "ns/name".
    Waypoint(String),
}

impl Scope {
    fn view(&self, view: &MeshView, root_namespace: &str) -> MeshView {
        match self {
            Scope::Node(node) => view_for_node(view, node, root_namespace),
            Scope::Waypoint(gw) => view_for_waypoint(view, gw, root_namespace),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Node(n) => write!(f, "node {n}"),
            Scope::Waypoint(gw) => write!(f, "waypoint {gw}"),
        }
    }
}

/// What the principal may subscribe to with `req`, or why not.
fn authorize(
    principal: Principal,
    req: SubscribeRequest,
    view: &MeshView,
) -> Result<Scope, Status> {
    match principal {
        Principal::Node(caller) => {
            if !req.waypoint.is_empty() {
                return Err(Status::permission_denied(format!(
                    "node {caller} may not subscribe as waypoint {:?}: a waypoint authenticates with its service-account token (`meshd workload-token`)",
                    req.waypoint
                )));
            }
            if req.node != caller {
                return Err(Status::permission_denied(format!(
                    "token is for node {caller:?} but the subscription is for node {:?}",
                    req.node
                )));
            }
            Ok(Scope::Node(caller))
        }
        Principal::ServiceAccount(ns, sa) => {
            let denied = |why: String| {
                Status::permission_denied(format!(
                    "service account {ns}/{sa} may not subscribe as waypoint {:?}: {why}",
                    req.waypoint
                ))
            };
            let Some((gw_ns, gw)) = req.waypoint.split_once('/') else {
                return Err(denied(
                    "a service account subscribes as its waypoint: set `waypoint` to \"<namespace>/<gateway>\"".into(),
                ));
            };
            if gw_ns != ns {
                return Err(denied(format!("the Gateway is not in namespace {ns}")));
            }
            let Some(w) = view.waypoints.get(&req.waypoint) else {
                return Err(denied(format!("there is no waypoint Gateway {gw_ns}/{gw}")));
            };
            if w.service_account() != sa {
                return Err(denied(format!(
                    "its waypoint runs as service account {}",
                    w.service_account()
                )));
            }
            Ok(Scope::Waypoint(req.waypoint))
        }
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigStream {
    type SubscribeStream = ReceiverStream<Result<ConfigUpdate, Status>>;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let principal = principal_of(&req)?;
        let scope = authorize(principal, req.into_inner(), &self.views.borrow().view)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let views = self.views.clone();
        let shutdown = self.shutdown.clone();
        let root_namespace = self.root_namespace.clone();
        match scope {
            Scope::Node(node) => {
                let shared = self.shared.clone();
                tokio::spawn(serve_node(
                    node,
                    root_namespace,
                    shared,
                    views,
                    shutdown,
                    tx,
                ));
            }
            Scope::Waypoint(gw) => {
                tokio::spawn(serve_waypoint(gw, root_namespace, views, shutdown, tx));
            }
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

type Tx = mpsc::Sender<Result<ConfigUpdate, Status>>;

/// Waits for a new view; false when the stream should end.
async fn next_view(
    views: &mut watch::Receiver<Arc<VersionedView>>,
    shutdown: &mut watch::Receiver<bool>,
    tx: &Tx,
) -> bool {
    tokio::select! {
        changed = views.changed() => changed.is_ok(),
        _ = tx.closed() => false,
        _ = shutdown.wait_for(|s| *s) => false,
    }
}

/// A node's stream: state is the version it was brought to and its policy keys; what changed
/// between versions is computed once for all nodes (`config_node`).
async fn serve_node(
    node: String,
    root_namespace: String,
    shared: Arc<config_node::Shared>,
    mut views: watch::Receiver<Arc<VersionedView>>,
    mut shutdown: watch::Receiver<bool>,
    tx: Tx,
) {
    let current = views.borrow_and_update().clone();
    let version = current.version;
    let (mut sub, snapshot) = NodeSubscriber::start(&shared, node.clone(), root_namespace, current);
    info!(subscriber = %format_args!("node {node}"), version, "subscribed; sending snapshot");
    if tx.send(Ok(snapshot)).await.is_err() {
        return;
    }
    while next_view(&mut views, &mut shutdown, &tx).await {
        let current = views.borrow_and_update().clone();
        let version = current.version;
        if let Some(update) = sub.advance(&shared, current) {
            debug!(subscriber = %format_args!("node {node}"), version, "sending update");
            if tx.send(Ok(update)).await.is_err() {
                break;
            }
        }
    }
    info!(subscriber = %format_args!("node {node}"), "subscription ended");
}

/// A waypoint's stream (few of them): its whole view is kept and diffed.
async fn serve_waypoint(
    gateway: String,
    root_namespace: String,
    mut views: watch::Receiver<Arc<VersionedView>>,
    mut shutdown: watch::Receiver<bool>,
    tx: Tx,
) {
    let scope = Scope::Waypoint(gateway);
    let current = views.borrow_and_update().clone();
    let mut sent = scope.view(&current.view, &root_namespace);
    info!(subscriber = %scope, version = current.version, "subscribed; sending snapshot");
    if tx
        .send(Ok(delta::snapshot(&sent, current.version)))
        .await
        .is_err()
    {
        return;
    }
    while next_view(&mut views, &mut shutdown, &tx).await {
        let current = views.borrow_and_update().clone();
        let next = scope.view(&current.view, &root_namespace);
        if let Some(update) = delta::delta(&sent, &next, current.version) {
            debug!(subscriber = %scope, version = current.version, "sending update");
            if tx.send(Ok(update)).await.is_err() {
                break;
            }
        }
        sent = next;
    }
    info!(subscriber = %scope, "subscription ended");
}
