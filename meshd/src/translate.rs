//! Translation from user resources to what the data plane needs: pure functions from a
//! [`ResourceSet`] to a [`MeshView`] of proto Workloads, Services, Policies and route resources,
//! plus what status and scoping need (waypoints, route references and findings).
//!
//! Owns the view's shape and where waypoint bindings (`binding`) and route references
//! (`route_check`) land in it; what a pod or a Service becomes (enrollment labels, endpoints,
//! port resolution) is [`workloads`]'s. Does not know where resources come from, nor who
//! receives the view.

use std::collections::{BTreeMap, BTreeSet};

use meshcore::proto::config::{Policy, RouteResource, Service, TrustBundle, Workload};

use crate::resources::ResourceSet;
use crate::waypoints::Waypoint;
use crate::{binding, route_check};

mod workloads;

pub use workloads::is_captured;
use workloads::{service, workload};

/// Namespace (and pod) label that enrolls pods in the ambient mesh.
pub use meshcore::enrollment::DATAPLANE_MODE_LABEL;

/// Mesh-wide settings translation depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub trust_domain: String,
    pub cluster_domain: String,
}

/// Identity of a pod as the CA authorizes it: (namespace, service account).
pub type PodIdentity = (String, String);

/// Everything the data plane is told, plus what the CA needs to authorize requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshView {
    /// By "ns/name".
    pub workloads: BTreeMap<String, Workload>,
    /// By "ns/name".
    pub services: BTreeMap<String, Service>,
    /// By "Kind/ns/name".
    pub policies: BTreeMap<String, Policy>,
    /// L7 route resources by "Kind/ns/name" (sent to waypoints only).
    pub routes: BTreeMap<String, RouteResource>,
    /// What route resources' checks found (unsupported fields, a refused newer version), by
    /// "Kind/ns/name"; only routes with something to report. For logs and status, not sent.
    pub route_findings: BTreeMap<String, RouteFindings>,
    /// Which Services each route resource attaches to and sends to, by "Kind/ns/name" (what
    /// decides which waypoint is sent it). Not sent.
    pub route_refs: BTreeMap<String, RouteRefs>,
    /// Gateway "ns/name" → the Services ("ns/name") and pods ("ns/name") its waypoint takes
    /// (bound, and admitted by it: see `binding::Bound`), running or not. Not sent.
    pub waypoint_members: BTreeMap<String, WaypointMembers>,
    /// Gateways of class istio-waypoint by "ns/name", accepted or not. Not sent.
    pub waypoints: BTreeMap<String, Waypoint>,
    pub trust_bundle: TrustBundle,
    /// Node name → identities of the (non-terminal) pods scheduled on it, IP or not: a node may
    /// fetch a certificate before its pod has an address.
    pub identities_by_node: BTreeMap<String, BTreeSet<PodIdentity>>,
}

/// What a waypoint takes, by key ("ns/name").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaypointMembers {
    pub services: BTreeSet<String>,
    pub workloads: BTreeSet<String>,
}

/// Service keys ("ns/name") a route resource attaches to and sends to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteRefs {
    pub attaches_to: Vec<String>,
    pub sends_to: Vec<String>,
}

/// What checking a route resource found, for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFindings {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub notes: Vec<String>,
    /// Why its newest version was refused (the last good one is in force), if it was.
    pub rejected: Option<String>,
}

/// When meshd first saw each route resource (older is smaller): Gateway API breaks ties
/// between routes by age. A resource that goes and comes back is new again, as a re-created
/// Kubernetes object is.
#[derive(Debug, Clone, Default)]
pub struct RouteOrder {
    next: i64,
    first_seen: BTreeMap<String, i64>,
}

impl RouteOrder {
    /// Numbers the routes of `res` not seen before (in key order) and forgets those gone.
    pub fn update(&mut self, res: &ResourceSet) {
        self.first_seen.retain(|k, _| res.routes.contains_key(k));
        for key in res.routes.keys() {
            if !self.first_seen.contains_key(key) {
                self.first_seen.insert(key.clone(), self.next);
                self.next += 1;
            }
        }
    }

    pub fn of(&self, key: &str) -> i64 {
        self.first_seen.get(key).copied().unwrap_or(i64::MAX)
    }
}

/// A view as published: versions increase by one for every change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionedView {
    pub version: u64,
    pub view: MeshView,
}

pub fn translate(res: &ResourceSet, settings: &Settings, trust_bundle: &TrustBundle) -> MeshView {
    let mut order = RouteOrder::default();
    order.update(res);
    translate_ordered(res, settings, trust_bundle, &order)
}

/// [`translate`] with the routes' ages kept across translations (the daemon's loop).
pub fn translate_ordered(
    res: &ResourceSet,
    settings: &Settings,
    trust_bundle: &TrustBundle,
    order: &RouteOrder,
) -> MeshView {
    let mut view = MeshView {
        trust_bundle: trust_bundle.clone(),
        ..Default::default()
    };
    for pod in res.pods.values().filter(|p| !p.is_terminal()) {
        if let Some(node) = pod.spec.node_name.as_deref().filter(|n| !n.is_empty()) {
            let id = (
                pod.metadata.ns().to_string(),
                pod.service_account().to_string(),
            );
            view.identities_by_node
                .entry(node.to_string())
                .or_default()
                .insert(id);
        }
        if let Some(w) = workload(res, pod, settings) {
            view.workloads.insert(w.uid.clone(), w);
        }
    }
    for svc in res.services.values() {
        let s = service(res, svc, settings);
        view.services.insert(s.key.clone(), s);
    }
    for g in res.gateways.values() {
        if let Some(w) = Waypoint::from_gateway(g) {
            view.waypoints.insert(w.key(), w);
        }
    }
    bind(res, &mut view);
    for (key, p) in &res.policies {
        let policy = Policy {
            key: key.clone(),
            kind: p.kind.as_str().to_string(),
            namespace: p.metadata.ns().to_string(),
            name: p.metadata.name.clone(),
            spec_json: p.spec.to_string(),
        };
        view.policies.insert(key.clone(), policy);
    }
    for (key, r) in &res.routes {
        let (namespace, name) = (r.metadata.ns().to_string(), r.metadata.name.clone());
        view.routes.insert(
            key.clone(),
            RouteResource {
                key: key.clone(),
                kind: r.kind.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                spec_json: r.spec.to_string(),
                generation_order: order.of(key),
            },
        );
        let refs = route_check::references(r, &settings.cluster_domain);
        view.route_refs.insert(key.clone(), refs);
        if !r.notes.is_empty() || r.rejected.is_some() {
            let findings = RouteFindings {
                kind: r.kind.clone(),
                namespace,
                name,
                notes: r.notes.clone(),
                rejected: r.rejected.clone(),
            };
            view.route_findings.insert(key.clone(), findings);
        }
    }
    view
}

/// Resolves every Service's and pod's waypoint binding (`binding`), once the Services, whose
/// endpoints tell whether a waypoint is running, are translated.
fn bind(res: &ResourceSet, view: &mut MeshView) {
    let empty = BTreeMap::new();
    let ns_labels = |ns: &str| {
        res.namespaces
            .get(ns)
            .map_or(&empty, |n| &n.metadata.labels)
    };
    let ctx = binding::Context {
        waypoints: &view.waypoints,
        services: &view.services,
    };
    let services: Vec<(String, Option<binding::Bound>)> = res
        .services
        .values()
        .map(|s| {
            let key = format!("{}/{}", s.metadata.ns(), s.metadata.name);
            (
                key,
                binding::for_service(&s.metadata, ns_labels(s.metadata.ns()), &ctx),
            )
        })
        .collect();
    let workloads: Vec<(String, Option<binding::Bound>)> = res
        .pods
        .values()
        .map(|p| {
            let key = format!("{}/{}", p.metadata.ns(), p.metadata.name);
            (
                key,
                binding::for_pod(&p.metadata, ns_labels(p.metadata.ns()), &ctx),
            )
        })
        .collect();
    for (key, b) in services {
        if let Some(s) = view.services.get_mut(&key) {
            if let Some(b) = b.as_ref().filter(|b| b.admitted) {
                let m = view.waypoint_members.entry(b.binding.gateway.clone());
                m.or_default().services.insert(key.clone());
            }
            s.waypoint = b.map(|b| b.binding);
        }
    }
    for (key, b) in workloads {
        if let Some(w) = view.workloads.get_mut(&key) {
            if let Some(b) = b.as_ref().filter(|b| b.admitted) {
                let m = view.waypoint_members.entry(b.binding.gateway.clone());
                m.or_default().workloads.insert(key.clone());
            }
            w.waypoint = b.map(|b| b.binding);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_file;

    fn set(yaml: &str) -> ResourceSet {
        let mut s = ResourceSet::default();
        for r in parse_file("t.yaml", yaml).unwrap().resources {
            s.insert(r);
        }
        s
    }

    fn settings() -> Settings {
        Settings {
            trust_domain: "td.example".into(),
            cluster_domain: "cluster.local".into(),
        }
    }

    pub(super) fn view(yaml: &str) -> MeshView {
        translate(&set(yaml), &settings(), &TrustBundle::default())
    }

    #[test]
    fn policies_keep_spec_as_json() {
        let v = view(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: x}\nspec: {mtls: {mode: STRICT}}\n",
        );
        let p = &v.policies["PeerAuthentication/x/strict"];
        assert_eq!(
            (p.kind.as_str(), p.namespace.as_str(), p.name.as_str()),
            ("PeerAuthentication", "x", "strict")
        );
        let spec: serde_json::Value = serde_json::from_str(&p.spec_json).unwrap();
        assert_eq!(spec["mtls"]["mode"], "STRICT");
    }
}
