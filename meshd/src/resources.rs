//! The Kubernetes-style resources users write (Namespace, Pod, Service, and Istio's
//! PeerAuthentication / AuthorizationPolicy), parsed from YAML or JSON files, and the merged
//! [`ResourceSet`] every source produces.
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
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
            PolicyKind::PeerAuthentication => "PeerAuthentication",
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

#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    Policy(Policy),
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
        }
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
        }
    }
}
