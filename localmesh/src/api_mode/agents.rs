//! The node agents' side of the API in API mode with CNI enrollment ([`MeshOptions::api_cni`]):
//! what a cluster running the mesh-cni DaemonSet holds for them — the DaemonSet, its
//! ServiceAccount, one agent Pod per node (`mesh-system/mesh-cni-<node>`, which the agent
//! annotates when an uninstall is done) — and each agent's credentials: a token of that
//! ServiceAccount bound to its pod, in a kubeconfig that reaches the double over the fabric
//! (the agents run in the nodes' namespaces, which the host's loopback is not part of).
//!
//! Owns these objects and files only; the agent processes are node_cni.rs's.
//!
//! [`MeshOptions::api_cni`]: crate::MeshOptions::api_cni

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;
use testbed::kubeapi::TokenSpec;

use super::{ApiMode, MESH_NAMESPACE, expiry};

/// The agents' DaemonSet and ServiceAccount, as in `manifests/base/mesh-cni.yaml`.
pub const AGENT: &str = "mesh-cni";

/// Where the double serves the nodes: the fabric's own address, the API server's usual port.
pub(super) fn fabric_api_addr() -> SocketAddr {
    SocketAddr::from((testbed::FABRIC_HOST_V4, 6443))
}

impl ApiMode {
    /// Node `node`'s agent pod (created, with the DaemonSet and ServiceAccount, if absent) and
    /// a kubeconfig for it (in the double's private dir); returns (pod name, kubeconfig).
    pub fn agent_credentials(&self, node: &str) -> anyhow::Result<(String, PathBuf)> {
        let url = self
            .server
            .also_url()
            .context("the double does not serve the fabric (MeshOptions::api_cni is off)")?;
        self.get_or_create(json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": AGENT, "namespace": MESH_NAMESPACE},
        }))?;
        let daemonset = self.get_or_create(json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": AGENT, "namespace": MESH_NAMESPACE, "labels": {"app": AGENT}},
            "spec": {
                "selector": {"matchLabels": {"app": AGENT}},
                "template": {
                    "metadata": {"labels": {"app": AGENT, "istio.io/dataplane-mode": "none"}},
                    "spec": {
                        "serviceAccountName": AGENT, "hostNetwork": true,
                        "containers": [{"name": "agent", "image": "mesh/mesh-cni:0.1.0"}],
                    },
                },
            },
        }))?;
        let name = format!("{AGENT}-{node}");
        let pod = self.get_or_create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": MESH_NAMESPACE,
                "labels": {"app": AGENT, "istio.io/dataplane-mode": "none"},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "DaemonSet", "name": AGENT,
                    "uid": daemonset["metadata"]["uid"], "controller": true,
                }],
            },
            "spec": {
                "nodeName": node, "serviceAccountName": AGENT, "hostNetwork": true,
                "containers": [{"name": "agent", "image": "mesh/mesh-cni:0.1.0"}],
            },
            "status": {"phase": "Running"},
        }))?;
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
        let token = self.server.issue_token(TokenSpec {
            namespace: MESH_NAMESPACE.into(),
            service_account: AGENT.into(),
            audiences: vec!["https://kubernetes.default.svc".into()],
            pod: Some((name.clone(), uid.to_string())),
            node: Some(node.to_string()),
            expires_at: expiry(),
        });
        let kubeconfig = self
            .server
            .kubeconfig_at(&url, &token)
            .context("writing the agent's kubeconfig")?;
        Ok((name, kubeconfig))
    }
}
