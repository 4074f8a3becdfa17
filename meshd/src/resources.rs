//! The Kubernetes-style resources users write (Namespace, Pod, Service, Istio's
//! PeerAuthentication / AuthorizationPolicy, Gateway API Gateways, the L7 route kinds, and
//! Deployments / ServiceAccounts, which meshd only passes over), parsed from YAML or JSON files,
//! and the merged [`ResourceSet`] every source produces.
//!
//! Owns the typed model and resource keys. Parsing text is `parse`'s job; what the data plane
//! gets from these is `translate`'s. Any source (files, a Kubernetes watch) fills a ResourceSet.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Where a namespaced object without `metadata.namespace` lives, as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `null` and absent both mean "empty", as the Kubernetes API server treats them.
fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    /// Resolved to [`DEFAULT_NAMESPACE`] for namespaced kinds after parsing.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_default")]
    pub annotations: BTreeMap<String, String>,
    /// Set by the API server; owner references to the object carry it when known.
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub generation: Option<i64>,
    #[serde(default, rename = "ownerReferences", deserialize_with = "null_default")]
    pub owner_references: Vec<OwnerReference>,
}

/// Who owns an object (only what workload naming needs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct OwnerReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub controller: bool,
}

impl ObjectMeta {
    pub fn ns(&self) -> &str {
        self.namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    /// Fills in the namespace Kubernetes would default.
    pub(crate) fn default_namespace(&mut self) {
        self.namespace = Some(self.ns().to_string());
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: PodSpec,
    #[serde(default, deserialize_with = "null_default")]
    pub status: PodStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Deprecated alias of serviceAccountName, still honoured by Kubernetes.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub host_network: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub containers: Vec<Container>,
}

impl Pod {
    /// The service account the pod runs as (Kubernetes defaults it to "default").
    pub fn service_account(&self) -> &str {
        let s = &self.spec;
        s.service_account_name
            .as_deref()
            .or(s.service_account.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
    }

    /// Pod IPs in Kubernetes order (podIPs, falling back to podIP), without duplicates.
    pub fn ips(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let listed = self.status.pod_ips.iter().map(|p| p.ip.as_str());
        for ip in listed.chain(self.status.pod_ip.as_deref()) {
            if !ip.is_empty() && !out.iter().any(|o| o == ip) {
                out.push(ip.to_string());
            }
        }
        out
    }

    /// The workload the pod belongs to, as Istio's telemetry names it: a ReplicaSet owner named
    /// `<deployment>-<pod-template-hash>` gives the Deployment's name, any other controller its
    /// own name, and a pod without one is its own workload.
    pub fn workload_name(&self) -> String {
        let m = &self.metadata;
        let owner = m
            .owner_references
            .iter()
            .find(|o| o.controller)
            .or_else(|| m.owner_references.first());
        let Some(owner) = owner.filter(|o| !o.name.is_empty()) else {
            return m.name.clone();
        };
        if owner.kind == "ReplicaSet"
            && let Some(hash) = m.labels.get("pod-template-hash")
            && let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}"))
            && !deployment.is_empty()
        {
            return deployment.to_string();
        }
        owner.name.clone()
    }

    /// Succeeded/Failed pods no longer run, so they are neither workloads nor endpoints.
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// The TCP port a named container port resolves to, as kube-proxy resolves targetPort.
    pub fn named_port(&self, name: &str) -> Option<u16> {
        self.spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .find(|p| p.name.as_deref() == Some(name) && is_tcp(p.protocol.as_deref()))
            .map(|p| p.container_port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", deserialize_with = "null_default")]
    pub pod_ips: Vec<PodIp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct ServiceSpec {
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs", deserialize_with = "null_default")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<ServicePort>,
}

impl Service {
    /// VIPs in Kubernetes order (clusterIPs, falling back to clusterIP); headless has none.
    pub fn vips(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let s = &self.spec;
        for ip in s
            .cluster_ips
            .iter()
            .map(String::as_str)
            .chain(s.cluster_ip.as_deref())
        {
            if !ip.is_empty() && ip != "None" && !out.iter().any(|o| o == ip) {
                out.push(ip.to_string());
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// The target, defaulting to the service port as Kubernetes does.
    pub fn target(&self) -> IntOrString {
        self.target_port
            .clone()
            .unwrap_or(IntOrString::Int(self.port))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    Str(String),
}

/// Kubernetes' default protocol is TCP; the mesh carries TCP only.
pub fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP") | Some(""))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyKind {
    AuthorizationPolicy,
    PeerAuthentication,
    /// JWT rules; applied by waypoints (attached with `targetRefs`).
    RequestAuthentication,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
            PolicyKind::PeerAuthentication => "PeerAuthentication",
            PolicyKind::RequestAuthentication => "RequestAuthentication",
        }
    }
}

/// An Istio security policy; its spec is kept as written (validated for shape only).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub kind: PolicyKind,
    pub metadata: ObjectMeta,
    pub spec: Value,
}

/// A Gateway API `Gateway` (meshd acts on `istio-waypoint` ones: see `waypoints`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Gateway {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: GatewaySpec,
    /// Set by the source on the last accepted version of a waypoint Gateway, kept in force
    /// because its newer version was refused: why that version was (never read from a file).
    #[serde(skip)]
    pub refused_edit: Option<crate::waypoints::Refusal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub listeners: Vec<Listener>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct AllowedRoutes {
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct RouteNamespaces {
    /// `Same` (the default), `All` or `Selector`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, deserialize_with = "null_default")]
    pub match_labels: BTreeMap<String, String>,
    /// Not evaluated: a selector with expressions matches nothing (and is reported).
    #[serde(default, deserialize_with = "null_default")]
    pub match_expressions: Vec<Value>,
}

/// An L7 route resource (VirtualService, DestinationRule, HTTPRoute, GRPCRoute): its spec is
/// kept as written and handed to waypoints; `meshcore::route` gives it meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The Kubernetes kind, e.g. `"HTTPRoute"`.
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: Value,
    /// Findings that do not stop it (unsupported fields, warnings), each naming the field.
    pub notes: Vec<String>,
    /// Set when a newer version was refused and this, the last good one, is kept: why.
    pub rejected: Option<String>,
}

/// The route kinds meshd accepts.
pub const ROUTE_KINDS: &[&str] = &[
    "VirtualService",
    "DestinationRule",
    "HTTPRoute",
    "GRPCRoute",
];

/// A kind meshd accepts but does not act on (Deployment, ServiceAccount): local mode's
/// controller-manager runs Deployments; meshd sees the pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passive {
    pub kind: String,
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    Policy(Policy),
    Gateway(Gateway),
    Route(Route),
    Passive(Passive),
}

impl Resource {
    /// "Kind ns/name" (or "Namespace name"), as logs and errors name it.
    pub fn describe(&self) -> String {
        match self {
            Resource::Namespace(n) => format!("Namespace {}", n.metadata.name),
            Resource::Pod(p) => format!("Pod {}/{}", p.metadata.ns(), p.metadata.name),
            Resource::Service(s) => format!("Service {}/{}", s.metadata.ns(), s.metadata.name),
            Resource::Policy(p) => format!(
                "{} {}/{}",
                p.kind.as_str(),
                p.metadata.ns(),
                p.metadata.name
            ),
            Resource::Gateway(g) => format!("Gateway {}/{}", g.metadata.ns(), g.metadata.name),
            Resource::Route(r) => format!("{} {}/{}", r.kind, r.metadata.ns(), r.metadata.name),
            Resource::Passive(p) => format!("{} {}/{}", p.kind, p.metadata.ns(), p.metadata.name),
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::Namespace(n) => &n.metadata,
            Resource::Pod(p) => &p.metadata,
            Resource::Service(s) => &s.metadata,
            Resource::Policy(p) => &p.metadata,
            Resource::Gateway(g) => &g.metadata,
            Resource::Route(r) => &r.metadata,
            Resource::Passive(p) => &p.metadata,
        }
    }
}

impl Route {
    /// `"Kind/ns/name"`, the key of [`ResourceSet::routes`] and of the config stream.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.kind,
            self.metadata.ns(),
            self.metadata.name
        )
    }
}

/// Everything a source currently holds, keyed as the API server would key it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResourceSet {
    /// By name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// By "ns/name".
    pub pods: BTreeMap<String, Pod>,
    /// By "ns/name".
    pub services: BTreeMap<String, Service>,
    /// By "Kind/ns/name".
    pub policies: BTreeMap<String, Policy>,
    /// By "ns/name".
    pub gateways: BTreeMap<String, Gateway>,
    /// By "Kind/ns/name".
    pub routes: BTreeMap<String, Route>,
    /// Deployments and ServiceAccounts, by "Kind/ns/name".
    pub passive: BTreeMap<String, Passive>,
}

impl ResourceSet {
    /// Adds or replaces a resource; returns true when one with the same key was replaced.
    pub fn insert(&mut self, r: Resource) -> bool {
        match r {
            Resource::Namespace(n) => self.namespaces.insert(n.metadata.name.clone(), n).is_some(),
            Resource::Pod(p) => self
                .pods
                .insert(format!("{}/{}", p.metadata.ns(), p.metadata.name), p)
                .is_some(),
            Resource::Service(s) => self
                .services
                .insert(format!("{}/{}", s.metadata.ns(), s.metadata.name), s)
                .is_some(),
            Resource::Policy(p) => {
                let key = format!(
                    "{}/{}/{}",
                    p.kind.as_str(),
                    p.metadata.ns(),
                    p.metadata.name
                );
                self.policies.insert(key, p).is_some()
            }
            Resource::Gateway(g) => self
                .gateways
                .insert(format!("{}/{}", g.metadata.ns(), g.metadata.name), g)
                .is_some(),
            Resource::Route(r) => self.routes.insert(r.key(), r).is_some(),
            Resource::Passive(p) => {
                let key = format!("{}/{}/{}", p.kind, p.metadata.ns(), p.metadata.name);
                self.passive.insert(key, p).is_some()
            }
        }
    }
}
