//! On-demand waypoints: what a Gateway API `Gateway` of class `istio-waypoint` means, and the
//! ServiceAccount, Deployment and Service Kubernetes would run for it.
//!
//! Owns acceptance of a waypoint Gateway (its `mesh` listener, `istio.io/waypoint-for`, which
//! namespaces may use it) and rendering its objects as Kubernetes JSON objects, owned by the
//! Gateway. Pure: nothing here knows local mode or writes anything (`outputs` writes files; a
//! Kubernetes backend will apply the same objects to the API server).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::resources::{Gateway, RouteNamespaces};

/// The GatewayClass of waypoints (Istio's name).
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label on everything rendered for a Gateway (and the selector of its pods), as Gateway API
/// implementations set it.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Label on a waypoint Gateway: which traffic it takes (`service`, `workload`, `all`, `none`).
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// Istio's marker for objects its controller manages.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
const MANAGED_VALUE: &str = "istio.io-mesh-controller";
/// The listener every waypoint must have.
pub const MESH_LISTENER: &str = "mesh";
pub const MESH_PORT: u16 = 15008;
pub const STATUS_PORT: u16 = 15021;
pub const METRICS_PORT: u16 = 15020;
/// `command[0]` of the waypoint container; local mode maps it to the waypoint binary.
pub const WAYPOINT_COMMAND: &str = "mesh-waypoint";
/// The image a Kubernetes cluster would pull (local mode ignores images): the one
/// `cargo xtask images` builds, `mesh/waypoint:<version>`, as the manifests name the others.
pub const WAYPOINT_IMAGE: &str = concat!("mesh/waypoint:", env!("CARGO_PKG_VERSION"));

/// Which traffic a waypoint takes (`istio.io/waypoint-for`, default `service`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    pub fn as_str(self) -> &'static str {
        match self {
            WaypointFor::Service => "service",
            WaypointFor::Workload => "workload",
            WaypointFor::All => "all",
            WaypointFor::None => "none",
        }
    }

    pub fn takes_services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    pub fn takes_workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// Which namespaces may bind to a waypoint in another namespace: the `mesh` listener's
/// `allowedRoutes.namespaces` (Gateway API's default is `Same`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedFrom {
    Same,
    All,
    /// Namespaces carrying all these labels; `None` when the selector has expressions, which
    /// meshd does not evaluate (so it matches nothing).
    Selector(Option<BTreeMap<String, String>>),
}

/// Why a waypoint Gateway is not accepted, as a Gateway API condition reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// A Gateway of class `istio-waypoint`, as meshd understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub generation: Option<i64>,
    pub waypoint_for: WaypointFor,
    pub allowed_from: AllowedFrom,
    /// `None` when accepted.
    pub refusal: Option<Refusal>,
    /// Why the Gateway's newest version was refused, when this is its last accepted version
    /// kept in force (objects rendered, bindings usable) until the edit is fixed.
    pub refused_edit: Option<Refusal>,
}

pub fn is_waypoint_class(g: &Gateway) -> bool {
    g.spec.gateway_class_name == WAYPOINT_CLASS
}

impl Waypoint {
    /// The waypoint a Gateway stands for; `None` for Gateways of other classes (not meshd's).
    pub fn from_gateway(g: &Gateway) -> Option<Waypoint> {
        if !is_waypoint_class(g) {
            return None;
        }
        let m = &g.metadata;
        let mut refusal = None;
        let waypoint_for = match m.labels.get(WAYPOINT_FOR_LABEL).map(String::as_str) {
            None | Some("service") => WaypointFor::Service,
            Some("workload") => WaypointFor::Workload,
            Some("all") => WaypointFor::All,
            Some("none") => WaypointFor::None,
            Some(other) => {
                refusal = Some(Refusal {
                    reason: "InvalidParameters",
                    message: format!(
                        "label {WAYPOINT_FOR_LABEL}={other:?} is not one of service, workload, all, none"
                    ),
                });
                WaypointFor::Service
            }
        };
        let mesh = g
            .spec
            .listeners
            .iter()
            .find(|l| l.name == MESH_LISTENER && l.port == MESH_PORT && l.protocol == "HBONE");
        if mesh.is_none() {
            refusal = Some(Refusal {
                reason: "ListenersNotValid",
                message: format!(
                    "spec.listeners: a waypoint needs a listener named {MESH_LISTENER:?} on port {MESH_PORT} with protocol HBONE"
                ),
            });
        }
        let allowed_from = allowed_from(
            mesh.and_then(|l| l.allowed_routes.as_ref())
                .and_then(|a| a.namespaces.as_ref()),
        );
        Some(Waypoint {
            namespace: m.ns().to_string(),
            name: m.name.clone(),
            uid: m.uid.clone().filter(|u| !u.is_empty()),
            generation: m.generation,
            waypoint_for,
            allowed_from,
            refusal,
            refused_edit: g.refused_edit.clone(),
        })
    }

    /// `"ns/name"` of the Gateway.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `"ns/name"` of the Service in front of the waypoint's pods.
    pub fn service_key(&self) -> String {
        self.key()
    }

    /// The service account the waypoint's pods run as.
    pub fn service_account(&self) -> &str {
        &self.name
    }

    pub fn accepted(&self) -> bool {
        self.refusal.is_none()
    }

    /// Whether objects of namespace `ns` (with labels `ns_labels`) may bind to this waypoint.
    pub fn allows_namespace(&self, ns: &str, ns_labels: &BTreeMap<String, String>) -> bool {
        if ns == self.namespace {
            return true;
        }
        match &self.allowed_from {
            AllowedFrom::Same => false,
            AllowedFrom::All => true,
            AllowedFrom::Selector(None) => false,
            AllowedFrom::Selector(Some(want)) => {
                want.iter().all(|(k, v)| ns_labels.get(k) == Some(v))
            }
        }
    }
}

fn allowed_from(n: Option<&RouteNamespaces>) -> AllowedFrom {
    let Some(n) = n else {
        return AllowedFrom::Same;
    };
    match n.from.as_deref() {
        Some("All") => AllowedFrom::All,
        Some("Selector") => {
            let sel = n.selector.clone().unwrap_or_default();
            AllowedFrom::Selector(sel.match_expressions.is_empty().then_some(sel.match_labels))
        }
        _ => AllowedFrom::Same,
    }
}

/// The labels of everything rendered for `w`; the Deployment's pods carry them too.
fn labels(w: &Waypoint) -> Value {
    json!({ GATEWAY_NAME_LABEL: w.name, MANAGED_LABEL: MANAGED_VALUE })
}

fn metadata(w: &Waypoint) -> Value {
    let mut owner = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": w.name,
        "controller": true,
    });
    if let Some(uid) = &w.uid {
        owner["uid"] = json!(uid);
    }
    json!({
        "name": w.name,
        "namespace": w.namespace,
        "labels": labels(w),
        "ownerReferences": [owner],
    })
}

/// The ServiceAccount, Deployment and Service Kubernetes runs for an accepted waypoint, in
/// that order, as API objects.
pub fn render(w: &Waypoint) -> Vec<Value> {
    let selector = json!({ GATEWAY_NAME_LABEL: w.name });
    let mut pod_labels = labels(w);
    // Never captured by ztunnel: the waypoint speaks HBONE itself.
    pod_labels[crate::translate::DATAPLANE_MODE_LABEL] = json!("none");
    let field = |path: &str| json!({ "fieldRef": { "fieldPath": path } });
    let service_account = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(w),
    });
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(w),
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": selector },
            "template": {
                "metadata": { "labels": pod_labels },
                "spec": {
                    "serviceAccountName": w.service_account(),
                    "containers": [{
                        "name": "waypoint",
                        "image": WAYPOINT_IMAGE,
                        "command": [WAYPOINT_COMMAND],
                        "args": ["--gateway", w.key()],
                        "env": [
                            { "name": "POD_NAME", "valueFrom": field("metadata.name") },
                            { "name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace") },
                            { "name": "POD_IP", "valueFrom": field("status.podIP") },
                            { "name": "NODE_NAME", "valueFrom": field("spec.nodeName") },
                        ],
                        "ports": [
                            { "name": "mesh", "containerPort": MESH_PORT, "protocol": "TCP" },
                            { "name": "status", "containerPort": STATUS_PORT, "protocol": "TCP" },
                            { "name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP" },
                        ],
                        "readinessProbe": {
                            "httpGet": { "path": "/healthz/ready", "port": STATUS_PORT },
                            "periodSeconds": 2,
                        },
                    }],
                },
            },
        },
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(w),
        "spec": {
            "selector": selector,
            "ports": [
                { "name": "mesh", "port": MESH_PORT, "targetPort": MESH_PORT, "protocol": "TCP", "appProtocol": "hbone" },
                { "name": "status", "port": STATUS_PORT, "targetPort": STATUS_PORT, "protocol": "TCP" },
            ],
        },
    });
    vec![service_account, deployment, service]
}

/// Objects as one multi-document YAML text.
pub fn to_yaml(objects: &[Value]) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        // Serializing a JSON value cannot fail; fall back to JSON (valid YAML) all the same.
        match serde_saphyr::to_string(o) {
            Ok(y) => out.push_str(&y),
            Err(_) => out.push_str(&o.to_string()),
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}
