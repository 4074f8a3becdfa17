//! What the CNI plugin tells the node agent, and what the agent answers: one JSON object per
//! line each way on the agent's unix stream socket ([`DEFAULT_PLUGIN_SOCKET`]), one request per
//! connection. The plugin is short-lived and runs as root for the container runtime; the agent
//! is the long-lived process that holds state. Owns the message shapes only.

use serde::{Deserialize, Serialize};

/// Where the agent listens for the plugin (mode 0600: only root on the node may enroll pods).
pub const DEFAULT_PLUGIN_SOCKET: &str = "/var/run/mesh-cni/plugin.sock";

/// The longest the plugin waits for the agent's answer. Kubelet retries a failed ADD, so a
/// bounded wait that fails is safe; an unbounded one would hang the pod's sandbox creation.
pub const PLUGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The largest request or reply line either side reads.
pub const MAX_LINE: usize = 64 * 1024;

/// A CNI command the runtime ran, for one pod sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginEvent {
    pub command: Command,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS: the sandbox's network namespace path (may be empty on DEL).
    pub netns: String,
    /// From CNI_ARGS: K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID (the uid may be empty:
    /// not every runtime passes it).
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// The pod's addresses, from the primary plugin's result (`prevResult.ips`): the API does
    /// not know them yet while the sandbox is being created.
    pub ips: Vec<std::net::IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AgentReply {
    /// ztunnel acknowledged the pod: its traffic is captured from now on.
    Enrolled,
    /// The pod is not in the mesh (namespace not ambient, opted out, host network, one of the
    /// mesh's own components): nothing was done. `reason` says which.
    Skipped { reason: String },
    /// DEL/CHECK done.
    Done,
    /// The pod must not start: `error` says why and what to fix (e.g. "no ztunnel is connected
    /// on this node").
    Failed { error: String },
}
