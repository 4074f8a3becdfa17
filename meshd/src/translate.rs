//! Translation from user resources to what the data plane needs: pure functions from a
//! [`ResourceSet`] to a [`MeshView`] of proto Workloads, Services, Policies and route resources,
//! plus what status and scoping need (waypoints, route references and findings).
//!
//! Owns the meaning of enrollment labels, Service endpoints and port resolution, and where
//! waypoint bindings (`binding`) and route references (`route_check`) land in the view. Does not
//! know where resources come from, nor who receives the view.

use std::collections::{BTreeMap, BTreeSet};

use meshcore::proto::config::{
    Endpoint, Policy, RouteResource, Service, ServicePort, TrustBundle, Workload,
};

use crate::resources::{self, IntOrString, Pod, ResourceSet};
use crate::waypoints::Waypoint;
use crate::{binding, route_check};

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

/// Ambient enrollment: namespace opted in, pod not opted out, and not sharing the node's
/// network (a hostNetwork pod's traffic is the node's, which the mesh must not capture).
pub fn is_captured(res: &ResourceSet, pod: &Pod) -> bool {
    let ns_label = res
        .namespaces
        .get(pod.metadata.ns())
        .and_then(|n| n.metadata.labels.get(DATAPLANE_MODE_LABEL));
    meshcore::enrollment::is_ambient(
        ns_label.map(String::as_str),
        pod.metadata
            .labels
            .get(DATAPLANE_MODE_LABEL)
            .map(String::as_str),
        pod.spec.host_network,
    )
}

fn workload(res: &ResourceSet, pod: &Pod, settings: &Settings) -> Option<Workload> {
    let ips = pod.ips();
    if ips.is_empty() {
        return None; // not running yet: nothing can address it
    }
    let m = &pod.metadata;
    Some(Workload {
        uid: format!("{}/{}", m.ns(), m.name),
        name: m.name.clone(),
        namespace: m.ns().to_string(),
        service_account: pod.service_account().to_string(),
        node: pod.spec.node_name.clone().unwrap_or_default(),
        ips,
        labels: m.labels.clone().into_iter().collect(),
        captured: is_captured(res, pod),
        netns: m
            .annotations
            .get(meshcore::NETNS_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
        trust_domain: settings.trust_domain.clone(),
        annotations: m.annotations.clone().into_iter().collect(),
        waypoint: None,
        workload_name: pod.workload_name(),
    })
}

fn service(res: &ResourceSet, svc: &resources::Service, settings: &Settings) -> Service {
    let m = &svc.metadata;
    let ports: Vec<&resources::ServicePort> = svc
        .spec
        .ports
        .iter()
        .filter(|p| resources::is_tcp(p.protocol.as_deref()))
        .collect();
    let proto_ports = ports
        .iter()
        .map(|p| ServicePort {
            port: u32::from(p.port),
            target_port: match p.target() {
                IntOrString::Int(t) => u32::from(t),
                IntOrString::Str(_) => 0,
            },
            name: p.name.clone().unwrap_or_default(),
            app_protocol: p.app_protocol.clone().unwrap_or_default(),
        })
        .collect();
    let endpoints = selected_pods(res, svc)
        .map(|pod| Endpoint {
            workload_uid: format!("{}/{}", pod.metadata.ns(), pod.metadata.name),
            ports: ports
                .iter()
                .filter_map(|p| {
                    let target = match p.target() {
                        IntOrString::Int(t) => Some(t),
                        IntOrString::Str(name) => resolve_named(pod, &name),
                    };
                    target.map(|t| (u32::from(p.port), u32::from(t)))
                })
                .collect(),
        })
        .collect();
    Service {
        key: format!("{}/{}", m.ns(), m.name),
        name: m.name.clone(),
        namespace: m.ns().to_string(),
        hostname: format!("{}.{}.svc.{}", m.name, m.ns(), settings.cluster_domain),
        vips: svc.vips(),
        ports: proto_ports,
        endpoints,
        waypoint: None,
    }
}

/// A numeric string is accepted as a number; anything else names a container port.
fn resolve_named(pod: &Pod, name: &str) -> Option<u16> {
    name.parse::<u16>().ok().or_else(|| pod.named_port(name))
}

/// Running pods with addresses in the Service's namespace carrying every selector label. No or
/// an empty selector selects nothing, as in Kubernetes (such endpoints are managed by hand).
fn selected_pods<'a>(
    res: &'a ResourceSet,
    svc: &'a resources::Service,
) -> impl Iterator<Item = &'a Pod> + 'a {
    let selector = svc.spec.selector.as_ref().filter(|s| !s.is_empty());
    res.pods.values().filter(move |pod| {
        let Some(sel) = selector else { return false };
        pod.metadata.ns() == svc.metadata.ns()
            && !pod.is_terminal()
            && !pod.ips().is_empty()
            && sel
                .iter()
                .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
    })
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

    fn view(yaml: &str) -> MeshView {
        translate(&set(yaml), &settings(), &TrustBundle::default())
    }

    const PODS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: in, namespace: amb, labels: {app: a}, annotations: {mesh.local/netns: /run/netns/in}}
spec: {nodeName: n1, serviceAccountName: sa1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: out, namespace: amb, labels: {app: a, istio.io/dataplane-mode: none}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: amb}
spec: {nodeName: n1, hostNetwork: true}
status: {podIP: 192.168.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: plain}
spec: {nodeName: n2}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: amb}
spec: {nodeName: n2, serviceAccountName: late}
---
apiVersion: v1
kind: Pod
metadata: {name: v6, namespace: amb}
spec: {nodeName: n2}
status: {podIP: 10.0.0.4, podIPs: [{ip: 10.0.0.4}, {ip: 'fd00::4'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: v6only, namespace: amb}
status: {podIPs: [{ip: 'fd00::5'}]}
";

    #[test]
    fn workload_names_follow_istio() {
        let v = view(
            "
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f8c6b5d-x2v4k
  labels: {pod-template-hash: 7d9f8c6b5d}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f8c6b5d, controller: true}]
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, controller: true}]
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: odd-abc
  labels: {pod-template-hash: other}
  ownerReferences: [{kind: ReplicaSet, name: odd-rs, controller: true}]
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: bare}
status: {podIP: 10.0.0.4}
",
        );
        let name = |k: &str| v.workloads[k].workload_name.clone();
        assert_eq!(name("default/web-7d9f8c6b5d-x2v4k"), "web");
        assert_eq!(name("default/db-0"), "db");
        // A ReplicaSet not named after the hash is not a Deployment's: its own name.
        assert_eq!(name("default/odd-abc"), "odd-rs");
        assert_eq!(name("default/bare"), "bare");
    }

    #[test]
    fn enrollment() {
        let v = view(PODS);
        let w = &v.workloads["amb/in"];
        assert!(w.captured);
        assert_eq!(
            (
                w.service_account.as_str(),
                w.node.as_str(),
                w.netns.as_str()
            ),
            ("sa1", "n1", "/run/netns/in")
        );
        assert_eq!(w.trust_domain, "td.example");
        assert_eq!(w.ips, vec!["10.0.0.1"]);
        assert!(!v.workloads["amb/out"].captured, "pod opt-out");
        assert!(!v.workloads["amb/host"].captured, "hostNetwork");
        assert!(
            !v.workloads["plain/legacy"].captured,
            "namespace not ambient"
        );
        assert!(!v.workloads.contains_key("amb/pending"), "no IP yet");
        assert!(v.identities_by_node["n2"].contains(&("amb".to_string(), "late".to_string())));
    }

    #[test]
    fn ipv6_pod_ips() {
        let v = view(PODS);
        assert_eq!(v.workloads["amb/v6"].ips, vec!["10.0.0.4", "fd00::4"]);
        assert_eq!(v.workloads["amb/v6only"].ips, vec!["fd00::5"]);
        assert_eq!(v.workloads["amb/v6only"].node, "");
    }

    #[test]
    fn service_endpoints_numeric_and_named_ports() {
        let yaml = "
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: s, labels: {app: web, tier: x}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: p2, namespace: s, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: other, containerPort: 9000}]}]}
status: {podIPs: [{ip: 'fd00::2'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: noip, namespace: s, labels: {app: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: t, labels: {app: web}}
status: {podIP: 10.1.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: s}
spec:
  clusterIPs: [10.96.0.1, 'fd00:96::1']
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: admin, port: 81, targetPort: 9090}
  - {name: same, port: 82}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: s}
spec: {clusterIP: None, ports: [{port: 1}]}
";
        let v = view(yaml);
        let s = &v.services["s/web"];
        assert_eq!(s.hostname, "web.s.svc.cluster.local");
        assert_eq!(s.vips, vec!["10.96.0.1", "fd00:96::1"]);
        let ports: Vec<(u32, u32, &str)> = s
            .ports
            .iter()
            .map(|p| (p.port, p.target_port, p.name.as_str()))
            .collect();
        assert_eq!(
            ports,
            vec![(80, 0, "http"), (81, 9090, "admin"), (82, 82, "same")]
        );
        let eps: BTreeMap<&str, BTreeMap<u32, u32>> = s
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.workload_uid.as_str(),
                    e.ports.clone().into_iter().collect(),
                )
            })
            .collect();
        assert_eq!(eps.len(), 2, "{eps:?}");
        assert_eq!(
            eps["s/p1"],
            BTreeMap::from([(80, 8080), (81, 9090), (82, 82)])
        );
        assert_eq!(
            eps["s/p2"],
            BTreeMap::from([(81, 9090), (82, 82)]),
            "no entry for a named port it lacks"
        );
        let headless = &v.services["s/headless"];
        assert!(headless.vips.is_empty() && headless.endpoints.is_empty());
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
