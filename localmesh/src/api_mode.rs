//! API mode: local mode with the Kubernetes API server double (`testbed::kubeapi`) as meshd's
//! source instead of the config directory. meshd runs with `--kubernetes`; what local mode
//! renders for a file (Pods with status and netns, Services with VIPs, policies, Namespaces)
//! is created or replaced in the API, and objects a file no longer lists are deleted from it;
//! ztunnels and waypoints present tokens the double mints (audience `mesh-ca`; a ztunnel's is
//! bound to a pod `mesh-system/ztunnel-<node>` on its node).
//!
//! Owns the double's lifetime, the per-file record of what was written to the API, and the
//! tokens. It must not touch pods or processes (workloads.rs) nor decide what a file renders
//! to (lib.rs `apply`). `config/<file>` is still written as a record of what was synced, which
//! meshd does not read in this mode.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{Value, json};
use testbed::kubeapi::{ApiOptions, ApiServer, KubeApiError, TokenSpec};

use testbed::Cluster;

use crate::{Mesh, MeshOptions, write_private};
use services::{adopt_service_ips, service_ips_for_put};

mod agents;
mod services;
mod waypoint;

/// meshd's namespace: its Lease, CA Secret and root ConfigMap; the ztunnel pods and their SA.
pub const MESH_NAMESPACE: &str = "mesh-system";
/// The service account ztunnel tokens belong to (meshd's default `--ztunnel-service-account`).
pub const ZTUNNEL_SA: &str = "ztunnel";
/// The audience meshd's TokenReviews ask for (meshd's default `--token-audience`).
pub const AUDIENCE: &str = "mesh-ca";
/// The API's Service range. It holds the VIPs local mode gives user Services (10.96.0.11
/// upward, and fd00:96::a upward: explicit IPs the API must accept) and those the double
/// allocates for meshd's waypoint Services (from the bottom, skipping taken ones; a clash
/// would need more than ten waypoints before local mode's next Service).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const SERVICE_CIDR_V6: &str = "fd00:96::/112";
/// Files the controller applies (from meshd's objects in the API): their Deployment,
/// ServiceAccount and Service are meshd's, so only their Pods are written.
pub const CONTROLLER_FILE_PREFIX: &str = "generated.";
/// Short lease timings, so the only replica leads (and renders waypoints) soon after start.
const LEASE: [&str; 6] = [
    "--lease-duration",
    "4s",
    "--renew-deadline",
    "3s",
    "--retry-period",
    "500ms",
];
/// Lifetime of the tokens minted for ztunnels and waypoints (longer than any run).
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Kinds without a namespace (what local mode's files may hold).
const CLUSTER_SCOPED: [&str; 5] = [
    "Namespace",
    "Node",
    "GatewayClass",
    "CustomResourceDefinition",
    "ClusterRole",
];

/// An object's identity across API versions: (group, kind, namespace, name).
type ObjKey = (String, String, Option<String>, String);

/// The double and what each file put into it.
pub struct ApiMode {
    pub server: ApiServer,
    /// File → (object → the document last written for it).
    written: Mutex<HashMap<String, BTreeMap<ObjKey, Value>>>,
}

impl ApiMode {
    /// Starts the double and sets up what a cluster with the mesh installed has: the mesh
    /// CRDs, meshd's namespace, ztunnel's service account and one Node per testbed node.
    /// With `fabric` (the agents use the Kube view: [`MeshOptions::api_cni`]) the double also
    /// serves on the fabric, where the nodes' agents reach it.
    pub fn start(
        opts: &MeshOptions,
        nodes: &[String],
        fabric: Option<&testbed::Netns>,
    ) -> anyhow::Result<ApiMode> {
        let server = ApiServer::start(ApiOptions {
            service_cidr: SERVICE_CIDR.into(),
            service_cidr_v6: opts.ipv6.then(|| SERVICE_CIDR_V6.to_string()),
            also_serve_in: fabric.map(|f| (f.clone(), agents::fabric_api_addr())),
            ..ApiOptions::default()
        })
        .context("starting the Kubernetes API double")?;
        server
            .install_mesh_crds()
            .context("installing the mesh CRDs")?;
        let api = ApiMode {
            server,
            written: Mutex::new(HashMap::new()),
        };
        api.ensure_namespace(MESH_NAMESPACE)?;
        api.server
            .put(json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": ZTUNNEL_SA, "namespace": MESH_NAMESPACE},
            }))
            .context("creating ztunnel's ServiceAccount")?;
        for node in nodes {
            api.server
                .put(json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}]},
                }))
                .with_context(|| format!("creating Node {node}"))?;
        }
        Ok(api)
    }

    /// meshd's arguments for this API (instead of `--config-dir` and `--write-dir`).
    pub fn meshd_args(&self, cmd: &mut Command) {
        cmd.arg("--kubernetes")
            .arg("--kubeconfig")
            .arg(self.server.kubeconfig())
            .args(["--namespace", MESH_NAMESPACE, "--pod-name", "meshd-0"])
            .args(LEASE);
    }

    /// Makes the API hold exactly `docs` for `file`: each created or replaced (spec and
    /// status) if it changed since the last write, and what the file listed before but no
    /// longer does deleted. Every object is tried; the first failure is returned. A Service's
    /// cluster IPs in `docs` become those the API holds (the API has the last word on them).
    pub fn sync_file(&self, file: &str, docs: &mut [Value]) -> anyhow::Result<()> {
        let only_pods = file.starts_with(CONTROLLER_FILE_PREFIX);
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let before = written.remove(file).unwrap_or_default();
        let mut now: BTreeMap<ObjKey, Value> = BTreeMap::new();
        let mut first_err: Option<anyhow::Error> = None;
        for rendered in docs.iter_mut() {
            if only_pods && crate::render::kind(rendered) != "Pod" {
                continue;
            }
            let doc = with_namespace(rendered);
            let Some(key) = key_of(&doc) else {
                first_err.get_or_insert(anyhow::anyhow!(
                    "{file}: a document without apiVersion, kind or metadata.name cannot go to the API"
                ));
                continue;
            };
            let is_service = key.0.is_empty() && key.1 == "Service";
            if before.get(&key) == Some(&doc) {
                if is_service {
                    let held = self.server.get("v1", "Service", key.2.as_deref(), &key.3);
                    adopt_service_ips(rendered, held.as_ref());
                }
                now.insert(key, doc);
                continue;
            }
            let mut sent = doc.clone();
            if is_service {
                let held = self.server.get("v1", "Service", key.2.as_deref(), &key.3);
                service_ips_for_put(&mut sent, held.as_ref());
            }
            let put = key
                .2
                .as_deref()
                .map_or(Ok(()), |ns| self.ensure_namespace(ns))
                .and_then(|()| self.server.put(sent).map_err(anyhow::Error::from));
            match put {
                Ok(held) => {
                    if is_service {
                        adopt_service_ips(rendered, Some(&held));
                    }
                    now.insert(key, doc);
                }
                Err(e) => {
                    first_err.get_or_insert(
                        e.context(format!("{file}: writing {} to the API", show(&key))),
                    );
                }
            }
        }
        for (key, doc) in &before {
            if now.contains_key(key) {
                continue;
            }
            let api_version = doc["apiVersion"].as_str().unwrap_or("v1");
            match self
                .server
                .delete(api_version, &key.1, key.2.as_deref(), &key.3)
            {
                Ok(()) | Err(KubeApiError::Status { code: 404, .. }) => {}
                Err(e) => {
                    first_err.get_or_insert(
                        anyhow::Error::from(e)
                            .context(format!("{file}: deleting {} from the API", show(key))),
                    );
                }
            }
        }
        if !now.is_empty() {
            written.insert(file.to_string(), now);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The object the API holds under `doc`'s kind, namespace and name; `doc` created first if
    /// there is none (an existing one is left as it is).
    fn get_or_create(&self, doc: Value) -> anyhow::Result<Value> {
        let Some(key) = key_of(&doc) else {
            anyhow::bail!("a document without apiVersion, kind or metadata.name: {doc}");
        };
        let api_version = doc["apiVersion"].as_str().unwrap_or("v1");
        if let Some(held) = self
            .server
            .get(api_version, &key.1, key.2.as_deref(), &key.3)
        {
            return Ok(held);
        }
        self.server
            .put(doc)
            .with_context(|| format!("creating {}", show(&key)))
    }

    /// Creates Namespace `name` if the API has none (objects cannot live in a missing one).
    fn ensure_namespace(&self, name: &str) -> anyhow::Result<()> {
        if self.server.get("v1", "Namespace", None, name).is_some() {
            return Ok(());
        }
        match self.server.create(json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
        })) {
            Ok(_) | Err(KubeApiError::Status { code: 409, .. }) => Ok(()),
            Err(e) => Err(anyhow::Error::from(e).context(format!("creating Namespace {name}"))),
        }
    }

    /// Node `node`'s ztunnel credentials, written to `path` unless there already (a restarted
    /// ztunnel presents the token it had, as a restarted container finds its projected token):
    /// its pod `ztunnel-<node>` in meshd's namespace (created if absent, on that node) and a
    /// token bound to it.
    pub fn node_token(&self, node: &str, path: &Path) -> anyhow::Result<()> {
        if path.exists() {
            return Ok(());
        }
        let name = format!("ztunnel-{node}");
        let pod = self.get_or_create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": MESH_NAMESPACE,
                "labels": {"app": "ztunnel", "istio.io/dataplane-mode": "none"},
            },
            "spec": {
                "nodeName": node, "serviceAccountName": ZTUNNEL_SA, "hostNetwork": true,
                "containers": [{"name": "istio-proxy", "image": "ztunnel"}],
            },
            "status": {"phase": "Running"},
        }))?;
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let token = self.server.issue_token(TokenSpec {
            namespace: MESH_NAMESPACE.into(),
            service_account: ZTUNNEL_SA.into(),
            audiences: vec![AUDIENCE.into()],
            pod: Some((name, uid)),
            node: Some(node.to_string()),
            expires_at: expiry(),
        });
        write_private(path, token.as_bytes())
    }

    /// A token of service account `namespace/sa` (a waypoint's), written to a root-only file
    /// in `dir`.
    pub fn workload_token(&self, dir: &Path, namespace: &str, sa: &str) -> anyhow::Result<PathBuf> {
        let token = self.server.issue_token(TokenSpec {
            namespace: namespace.into(),
            service_account: sa.into(),
            audiences: vec![AUDIENCE.into()],
            pod: None,
            node: None,
            expires_at: expiry(),
        });
        let path = dir.join(format!("sa.{namespace}.{sa}.token"));
        write_private(&path, token.as_bytes())?;
        Ok(path)
    }

    /// meshd's waypoint Deployments (label `gateway.istio.io/managed`), each as the YAML of a
    /// Deployment the local controller can apply, keyed `<ns>.<name>.yaml` as meshd's
    /// write-dir names them. Only what running it needs is kept (not resourceVersion or
    /// status), so an update that changes nothing of that is not a change here.
    pub fn managed_deployments(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for d in self.server.list("apps/v1", "Deployment") {
            let meta = &d["metadata"];
            if meta["labels"]
                .get("gateway.istio.io/managed")
                .and_then(Value::as_str)
                .is_none()
            {
                continue;
            }
            let (Some(ns), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str()) else {
                continue;
            };
            let doc = json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns, "labels": meta["labels"].clone()},
                "spec": d["spec"].clone(),
            });
            match crate::render::to_yaml(&[doc]) {
                Ok(text) => {
                    out.insert(format!("{ns}.{name}.yaml"), text);
                }
                Err(e) => tracing::warn!("Deployment {ns}/{name}: {e:#}"),
            }
        }
        out
    }
}

/// The double for a mesh started with [`MeshOptions::api`] (`None` otherwise).
pub(crate) fn start_if(opts: &MeshOptions, cluster: &Cluster) -> anyhow::Result<Option<ApiMode>> {
    if !opts.api {
        return Ok(None);
    }
    // The double listens on the host's loopback, which meshd in node-0's namespace cannot reach.
    anyhow::ensure!(
        !opts.meshd_tls,
        "API mode runs meshd on the host (unix socket): it cannot be combined with meshd_tls"
    );
    let nodes: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let fabric = if opts.api_cni {
        Some(
            cluster
                .fabric()
                .context("the testbed cluster has no fabric namespace")?,
        )
    } else {
        None
    };
    ApiMode::start(opts, &nodes, fabric).map(Some)
}

impl Mesh {
    /// The Kubernetes API double meshd reads, in API mode ([`MeshOptions::api`]): for a test's
    /// direct changes, its hooks (compaction, dropped watches, outages) and its kubeconfig.
    pub fn api(&self) -> Option<&ApiServer> {
        self.api.as_ref().map(|a| &a.server)
    }
}

/// The document with `metadata.namespace` set to `default` where a namespaced object has
/// none (as kubectl does), so its record names the object the API holds.
fn with_namespace(doc: &Value) -> Value {
    let mut doc = doc.clone();
    let kind = crate::render::kind(&doc).to_string();
    if !CLUSTER_SCOPED.contains(&kind.as_str())
        && let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut)
        && meta.get("namespace").and_then(Value::as_str).is_none()
    {
        meta.insert("namespace".into(), "default".into());
    }
    doc
}

fn key_of(doc: &Value) -> Option<ObjKey> {
    let api_version = doc["apiVersion"].as_str()?;
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let kind = doc["kind"].as_str().filter(|k| !k.is_empty())?;
    let name = doc["metadata"]["name"].as_str().filter(|n| !n.is_empty())?;
    let ns = doc["metadata"]["namespace"].as_str().map(str::to_string);
    Some((group.into(), kind.into(), ns, name.into()))
}

fn show(key: &ObjKey) -> String {
    match &key.2 {
        Some(ns) => format!("{} {ns}/{}", key.1, key.3),
        None => format!("{} {}", key.1, key.3),
    }
}

fn expiry() -> u64 {
    (SystemTime::now() + TOKEN_TTL)
        .duration_since(UNIX_EPOCH)
        .map_or(u64::MAX, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_known_across_versions_and_default_to_namespace_default() {
        let v1 = with_namespace(&json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny"},
        }));
        let beta = json!({
            "apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny", "namespace": "default"},
        });
        assert_eq!(key_of(&v1), key_of(&beta));
        let ns = with_namespace(
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}),
        );
        assert_eq!(
            key_of(&ns),
            Some(("".into(), "Namespace".into(), None, "a".into()))
        );
        assert_eq!(
            key_of(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}})),
            None
        );
    }
}
