//! The cluster as the agent reads it: pods of this node and their namespaces' labels, from the
//! Kubernetes API (watch, and a direct GET on a miss) or from local mode's config directory.
//! Owns turning either source into [`PodFacts`] and the ambient decision's inputs; never
//! touches a netns or ztunnel. Writes to the cluster are annotations only (Kube).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde_json::Value;
use tokio::sync::watch;

use super::dir_view::DirView;
use super::kube_view::KubeView;

/// What the agent needs to know about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// The Kubernetes pod UID; in a config directory without one, "<namespace>/<name>".
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: Option<String>,
    /// The pod's `istio.io/dataplane-mode` label.
    pub mode_label: Option<String>,
    pub host_network: bool,
    pub ips: Vec<IpAddr>,
    /// Local mode's `mesh.local/netns` annotation.
    pub netns_annotation: Option<String>,
    /// `ambient.istio.io/redirection: enabled` is set (the agent enrolled it before).
    pub redirection_enabled: bool,
}

/// One pod and its namespace's `istio.io/dataplane-mode` label, as the view holds them.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// This node's pods by (namespace, name).
    pub pods: BTreeMap<(String, String), PodFacts>,
    /// Namespace name → its dataplane-mode label (a namespace without one maps to `None`).
    pub namespaces: HashMap<String, Option<String>>,
}

impl Snapshot {
    /// THE rule ([`meshcore::enrollment::is_ambient`]) applied to one pod of this snapshot.
    pub fn is_ambient(&self, pod: &PodFacts) -> bool {
        let ns_label = self
            .namespaces
            .get(&pod.namespace)
            .and_then(|l| l.as_deref());
        meshcore::enrollment::is_ambient(ns_label, pod.mode_label.as_deref(), pod.host_network)
    }
}

/// Why the view could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("Kubernetes API: {0}")]
    Api(String),
    #[error("{0}")]
    Config(String),
}

/// Where the agent reads the cluster from.
pub enum View {
    Kube(KubeView),
    Directory(DirView),
}

impl View {
    /// What the view holds now (this node's pods only).
    pub fn snapshot(&self) -> Snapshot {
        match self {
            View::Kube(k) => k.snapshot(),
            View::Directory(d) => d.snapshot(),
        }
    }

    /// Bumped whenever the view changes; the reconciler waits on it.
    pub fn changes(&self) -> watch::Receiver<u64> {
        match self {
            View::Kube(k) => k.changes(),
            View::Directory(d) => d.changes(),
        }
    }

    /// Waits until the view has read the cluster once (the restart recovery needs it whole).
    pub async fn ready(&self) {
        match self {
            View::Kube(k) => k.ready().await,
            View::Directory(_) => {}
        }
    }

    /// One pod and its namespace's label, read fresh from the source when the view misses it
    /// (the pod may be newer than the last watch event). `Ok(None)`: it does not exist (on
    /// this node).
    pub async fn lookup(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<(PodFacts, Option<String>)>, ViewError> {
        let found = |s: Snapshot| {
            let pod = s.pods.get(&(namespace.to_string(), name.to_string()))?;
            let ns = s.namespaces.get(namespace)?;
            Some((pod.clone(), ns.clone()))
        };
        if let Some(hit) = found(self.snapshot()) {
            return Ok(Some(hit));
        }
        match self {
            View::Kube(k) => k.get(namespace, name).await,
            View::Directory(d) => {
                d.refresh().await;
                Ok(found(d.snapshot()))
            }
        }
    }

    /// Sets (`Some`) or removes (`None`) an annotation on a pod: Kubernetes only, through
    /// `pods/status` (the only pod write the agent's RBAC allows). Best effort, retried.
    pub async fn annotate(&self, namespace: &str, name: &str, key: &str, value: Option<&str>) {
        if let View::Kube(k) = self {
            k.annotate(namespace, name, key, value).await;
        }
    }

    /// Whether an uninstall was asked for: the annotation `mesh.dev/uninstall: "true"` on the
    /// agent's own DaemonSet (Kube), or the file `<state dir>/uninstall` (local mode).
    pub async fn uninstall_requested(&self, state_dir: &std::path::Path) -> bool {
        match self {
            View::Kube(k) => k.uninstall_requested(),
            View::Directory(_) => state_dir.join(super::uninstall::UNINSTALL_FILE).exists(),
        }
    }

    /// Where the pods are described, for error messages.
    pub fn describe(&self) -> String {
        match self {
            View::Kube(_) => "the Kubernetes API".to_string(),
            View::Directory(d) => format!("config directory {}", d.dir().display()),
        }
    }
}

/// A Pod object (as JSON, from either source) → its facts. `None` if it lacks a name or
/// namespace; every other field is optional and read defensively (hostile input).
pub fn pod_facts(pod: &Value, default_namespace: &str) -> Option<PodFacts> {
    let meta = pod.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_string();
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or(default_namespace)
        .to_string();
    if name.is_empty() || namespace.is_empty() {
        return None;
    }
    let label = |key: &str| {
        meta.get("labels")
            .and_then(|l| l.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let annotation = |key: &str| {
        meta.get("annotations")
            .and_then(|l| l.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let spec = pod.get("spec");
    let spec_str = |key: &str| spec.and_then(|s| s.get(key)).and_then(Value::as_str);
    let uid = match meta.get("uid").and_then(Value::as_str) {
        Some(uid) if !uid.is_empty() => uid.to_string(),
        _ => format!("{namespace}/{name}"),
    };
    let status = pod.get("status");
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Some(list) = status
        .and_then(|s| s.get("podIPs"))
        .and_then(Value::as_array)
    {
        for entry in list.iter().take(8) {
            if let Some(ip) = entry
                .get("ip")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
    }
    if let Some(ip) = status
        .and_then(|s| s.get("podIP"))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    Some(PodFacts {
        uid,
        service_account: spec_str("serviceAccountName")
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_string(),
        node: spec_str("nodeName").map(str::to_string),
        mode_label: label(meshcore::enrollment::DATAPLANE_MODE_LABEL),
        host_network: spec
            .and_then(|s| s.get("hostNetwork"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        ips,
        netns_annotation: annotation(meshcore::NETNS_ANNOTATION),
        redirection_enabled: annotation(meshcore::enrollment::REDIRECTION_ANNOTATION).as_deref()
            == Some("enabled"),
        namespace,
        name,
    })
}

/// A Namespace object → (name, its dataplane-mode label).
pub fn namespace_label(ns: &Value) -> Option<(String, Option<String>)> {
    let meta = ns.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_string();
    let label = meta
        .get("labels")
        .and_then(|l| l.get(meshcore::enrollment::DATAPLANE_MODE_LABEL))
        .and_then(Value::as_str)
        .map(str::to_string);
    Some((name, label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_pods_are_read_defensively() {
        assert!(pod_facts(&serde_json::json!({"metadata": 3}), "default").is_none());
        assert!(pod_facts(&serde_json::json!({"metadata": {"name": ""}}), "d").is_none());
        let p = pod_facts(
            &serde_json::json!({"metadata": {"name": "a", "labels": {"istio.io/dataplane-mode": 7}},
                "spec": {"hostNetwork": "yes", "nodeName": ["x"]},
                "status": {"podIPs": [{"ip": "nope"}, {"ip": "10.0.0.1"}], "podIP": "10.0.0.1"}}),
            "ns",
        )
        .expect("named pod");
        assert_eq!(p.uid, "ns/a");
        assert_eq!(p.mode_label, None);
        assert!(!p.host_network);
        assert_eq!(p.node, None);
        assert_eq!(p.ips, vec!["10.0.0.1".parse::<IpAddr>().expect("ip")]);
        assert_eq!(p.service_account, "default");
    }
}
