//! The L4 bench's user-space ceiling: raw TCP through a chain of two plain relays, on the same
//! cross-node path as the raw and mesh pairs.
//!
//! Namespace `bench-relay` (not ambient) has a client pod on node-0 and a server pod on
//! node-1, placed like the other pairs. Each pod runs `mesh-echo relay` where a ztunnel would
//! sit: the client connects to its own pod's relay on 127.0.0.1, which dials the server pod's
//! relay, which hands the bytes to the echo server on its pod's loopback. So every byte takes
//! the mesh's route — three TCP connections, two user-space copies — without TLS, HTTP/2 or
//! policy. What the mesh loses to that chain is what HBONE's encryption and framing cost; what
//! the chain loses to raw TCP no proxy in user space can win back on this machine. The two
//! relays' CPU time, context switches and syscalls are read around each figure as the
//! ztunnels' are, so the mesh's cost over a plain relay is also stated in counters, which this
//! machine's noise leaves alone. (Unlike
//! the mesh, which pools one HBONE connection per node pair, the chain dials across nodes for
//! each client connection, so its connection rate is a plain proxy's, not a ceiling.) Owns
//! these pods and measuring through them; the sysctls the raw pods get are the caller's.

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::bench::measure_at;
use crate::{DEADLINE, LocalMesh, wait_for};

/// The relay pair's namespace.
pub(crate) const NAMESPACE: &str = "bench-relay";

/// Where each pod's relay listens (the client's on 127.0.0.1 only).
const PORT: u16 = 9080;

const NAMESPACE_YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench-relay}
"#;

/// The server pod: the echo server, and the relay to it from other nodes.
fn server_pod() -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {NAMESPACE}}}
spec:
  nodeName: node-1
  containers:
  - {{name: s, command: ["mesh-echo", "serve", "--port", "8080"]}}
  - {{name: r, command: ["mesh-echo", "relay", "--listen", "0.0.0.0:{PORT}", "--to", "127.0.0.1:8080"]}}
"#
    )
}

/// The client pod: only the relay its load connects to, dialling the server pod's.
fn client_pod(server_ip: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NAMESPACE}}}
spec:
  nodeName: node-0
  containers:
  - {{name: r, command: ["mesh-echo", "relay", "--listen", "127.0.0.1:{PORT}", "--to", "{server_ip}:{PORT}"]}}
"#
    )
}

/// A running relay chain in a mesh.
pub(crate) struct RelayChain<'a> {
    mesh: &'a LocalMesh,
    /// The client pod's relay and the server pod's (whose echo server is not counted).
    pids: [u32; 2],
}

impl<'a> RelayChain<'a> {
    /// Starts both pods (the server first: the client's relay needs its address) and waits
    /// until every relay and the echo server listen.
    pub(crate) fn start(mesh: &'a LocalMesh) -> anyhow::Result<RelayChain<'a>> {
        mesh.apply("30-relay-ns.yaml", NAMESPACE_YAML)?;
        mesh.apply("31-relay-server.yaml", &server_pod())?;
        mesh.wait_listening(NAMESPACE, "server", 8080)?;
        mesh.wait_listening(NAMESPACE, "server", PORT)?;
        let server_ip = mesh.pod(NAMESPACE, "server")?.ip4.to_string();
        mesh.apply("32-relay-client.yaml", &client_pod(&server_ip))?;
        mesh.wait_listening(NAMESPACE, "client", PORT)?;
        // A pod's pids are recorded once all its containers are spawned, which can be just
        // after one of them listens.
        let relay_pid = |pod: &str, container: usize| -> anyhow::Result<u32> {
            let mut pid = None;
            wait_for(DEADLINE, &format!("{NAMESPACE}/{pod}'s pids"), || {
                pid = mesh.container_pids(NAMESPACE, pod)?.get(container).copied();
                Ok(pid.is_some())
            })?;
            pid.with_context(|| format!("{NAMESPACE}/{pod} has no container {container}"))
        };
        let pids = [relay_pid("client", 0)?, relay_pid("server", 1)?];
        Ok(RelayChain { mesh, pids })
    }

    /// Both relays' pids (client side first), whose counters are the chain's cost.
    pub(crate) fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Runs `mesh-echo <args>` in the client pod through the chain, its argv passed through
    /// `wrap` (e.g. under `perf stat`); the JSON report.
    pub(crate) fn measure(
        &self,
        d: Duration,
        args: &[&str],
        wrap: impl FnOnce(&[&str]) -> Vec<String>,
    ) -> anyhow::Result<Value> {
        let addr = format!("127.0.0.1:{PORT}");
        measure_at(self.mesh, NAMESPACE, &addr, d, args, wrap)
    }
}
