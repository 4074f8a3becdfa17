//! The harness of the ZDS path tests (`zds_paths.rs`, `zds_exclusions.rs`): a mesh whose
//! node-0 ztunnel runs `--enrollment zds` against a fake CNI agent the test holds
//! (`dataplane::zds::AgentSession`), the pods they use, and what they read back (config dump,
//! access log, listeners, leftovers). `zb/client` lives in a namespace that is NOT ambient: its
//! capture comes from ZDS only. Its peer `za/server` (node-1) is STRICT, so a client connection
//! reaches it only over HBONE; `zc/plain` (node-1) is outside the mesh. Changes nothing itself.

// Each test binary uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use dataplane::zds::proto::WorkloadInfo;
use dataplane::zds::{AgentSession, ZdsListener};
use localmesh::{Enrollment, LocalMesh, MeshOptions, wait_for};
use mesh_tests::leftovers::{pod_leftovers, sysctl};
use mesh_tests::manifests::{echo_pod, namespace};
use serde_json::Value;

pub const DEADLINE: Duration = Duration::from_secs(20);
pub const POD_UID: &str = "0d7e5b1a-6c3f-4e2a-8b9d-1f2e3a4b5c6d";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/zb/sa/client";

/// What enrollment changes in a pod (sysctls), read before it joins.
pub const SYSCTLS: [&str; 5] = [
    "net.ipv4.tcp_fwmark_accept",
    "net.ipv4.fwmark_reflect",
    "net.ipv6.fwmark_reflect",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_migrate_req",
];

/// Namespaces, za STRICT, an allow-nothing policy for zb pods labelled `app: locked`, and the
/// pods other than `zb/client`.
pub fn base() -> String {
    namespace("za", true)
        + &namespace("zb", false)
        + &namespace("zc", false)
        + "\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
           metadata: {name: strict, namespace: za}\nspec: {mtls: {mode: STRICT}}\n"
        // Allows nothing to the pods of zb labelled app=locked.
        + "\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
           metadata: {name: locked, namespace: zb}\nspec: {selector: {matchLabels: {app: locked}}}\n"
        + &echo_pod("za", "server", 1, "server", &[8080, 9090])
        + &echo_pod("zc", "plain", 1, "plain", &[8080, 9090])
        + &echo_pod("zb", "client-b", 0, "client", &[8080])
}

/// `zb/client` on node-0 (ports 8080, 7070) with `app: <app>` and `annotations` (a YAML map).
pub fn client_pod(app: &str, annotations: &str) -> String {
    format!(
        "\n---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: client, namespace: zb, labels: {{app: {app}}}, annotations: {annotations}}}\n\
         spec:\n  nodeName: node-0\n  serviceAccountName: client\n  containers:\n  \
         - {{name: echo, command: [mesh-echo, serve, --port, \"8080\", --port, \"7070\"]}}\n"
    )
}

pub fn client_info() -> WorkloadInfo {
    WorkloadInfo {
        name: "client".into(),
        namespace: "zb".into(),
        service_account: "client".into(),
    }
}

/// The mesh with node-0's ztunnel replaced by a `--enrollment zds` one, the agent's socket it
/// dials, and a runtime for the fake agent. Fields drop in order: the process goes first.
pub struct Zds {
    pub ztunnel: testbed::Proc,
    pub listener: ZdsListener,
    pub mesh: LocalMesh,
    pub rt: tokio::runtime::Runtime,
}

/// `client_yaml` as `10-client.yaml`; with `meshd_down`, meshd is stopped before the ZDS
/// ztunnel starts (it enrolls pods with no config).
pub fn start(client_yaml: &str, ztunnel_args: &[&str], meshd_down: bool) -> Zds {
    let mesh = LocalMesh::start(MeshOptions {
        enrollment: Enrollment::Config,
        ..MeshOptions::default()
    })
    .expect("start mesh");
    mesh.apply("00-base.yaml", &base()).unwrap();
    mesh.apply("10-client.yaml", client_yaml).unwrap();
    for (ns, pod) in [("za", "server"), ("zc", "plain"), ("zb", "client-b")] {
        mesh.wait_listening(ns, pod, 8080).unwrap();
    }
    mesh.wait_listening("zb", "client", 7070).unwrap();
    mesh.wait_enrolled("za", "server").unwrap();
    mesh.stop_ztunnel(0, true);
    if meshd_down {
        mesh.kill_meshd();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    // In the mesh's run directory: removed with it, even on failure.
    let socket = mesh.dir().join("zds.sock");
    let listener = {
        let _g = rt.enter();
        ZdsListener::bind(&socket).expect("bind the agent's ZDS socket")
    };
    let node0 = mesh.cluster.nodes()[0].clone();
    let mut cmd = Command::new(&mesh.bins.ztunnel);
    cmd.args(["--node", "node-0", "--log-format", "json"])
        .arg("--meshd")
        .arg(format!("unix:{}", mesh.dir().join("meshd.sock").display()))
        .arg("--token-file")
        .arg(mesh.dir().join("node-0.token"))
        .args(["--capture", &mesh.opts.capture, "--enrollment", "zds"])
        .arg("--zds-socket")
        .arg(&socket)
        .args(ztunnel_args);
    let ztunnel = mesh
        .cluster
        .spawn(&node0.netns, cmd, "ztunnel-zds")
        .expect("start ztunnel --enrollment zds");
    let z = Zds {
        ztunnel,
        listener,
        mesh,
        rt,
    };
    assert!(
        !z.reaches("zb", "client", &z.addr("za", "server", 8080)),
        "an uncaptured client must not pass STRICT (the test would prove nothing)"
    );
    z
}

impl Zds {
    /// The next ZDS session ztunnel opens (it connects and says hello).
    pub fn accept(&self) -> AgentSession {
        self.rt
            .block_on(async {
                tokio::time::timeout(DEADLINE, async {
                    let conn = self.listener.accept().await?;
                    AgentSession::accept(conn).await
                })
                .await
            })
            .expect("ztunnel connects within the deadline")
            .expect("ztunnel's hello")
    }

    /// `add` for `zb/client` with uid [`POD_UID`] and the netns of pod `zb/<pod>`.
    pub fn add(&self, agent: &mut AgentSession, pod: &str) -> Result<(), String> {
        let netns = self.mesh.pod("zb", pod).unwrap().netns.path;
        let fd = std::fs::File::open(netns).expect("open netns");
        self.rt
            .block_on(agent.add(POD_UID, client_info(), fd.as_fd()))
            .expect("add exchange")
    }

    pub fn snapshot_sent(&self, agent: &mut AgentSession) {
        self.rt
            .block_on(agent.snapshot_sent())
            .expect("snapshot exchange")
            .expect("snapshot acked");
    }

    pub fn addr(&self, ns: &str, pod: &str, port: u16) -> String {
        format!("{}:{port}", self.mesh.pod(ns, pod).unwrap().ip4)
    }

    pub fn sock(&self, ns: &str, pod: &str, port: u16) -> SocketAddr {
        self.addr(ns, pod, port).parse().unwrap()
    }

    pub fn reaches(&self, ns: &str, pod: &str, addr: &str) -> bool {
        self.mesh.who(ns, pod, addr, "zds-paths").is_ok()
    }

    /// node-0's (the ZDS ztunnel's) config dump.
    pub fn dump(&self) -> Value {
        let node0 = self.mesh.cluster.nodes()[0].clone();
        let url = "http://127.0.0.1:15000/config_dump";
        let out = self
            .mesh
            .cluster
            .run(&node0.netns, &["curl", "-sf", "--max-time", "5", url])
            .expect("curl");
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Waits until the ZDS ztunnel has meshd's config (with `zb/client` in it).
    pub fn wait_config(&self) {
        wait_for(
            DEADLINE,
            "the ZDS ztunnel's config to have zb/client",
            || {
                let dump = self.dump();
                Ok(dump["workloads"]
                    .as_array()
                    .is_some_and(|ws| ws.iter().any(|w| w["uid"] == "zb/client")))
            },
        )
        .unwrap();
    }

    /// The dump's entry for [`POD_UID`], if enrolled.
    pub fn enrolled(&self) -> Option<Value> {
        let dump = self.dump();
        let pods = dump["pods"].as_array()?;
        pods.iter().find(|p| p["podUid"] == POD_UID).cloned()
    }

    /// The ZDS ztunnel's access-log entries.
    pub fn access_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.ztunnel.log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v.get("fields").cloned())
            .filter(|f| {
                f["message"] == "connection complete" || f["message"] == "connection failed"
            })
            .collect()
    }
}

/// Values of [`SYSCTLS`] in `zb/<pod>` now.
pub fn sysctls(z: &Zds, pod: &str) -> Vec<(&'static str, String)> {
    let p = z.mesh.pod("zb", pod).unwrap();
    SYSCTLS
        .iter()
        .map(|k| (*k, sysctl(&z.mesh, &p, k)))
        .collect()
}

/// What of ztunnel is in `zb/<pod>`: listeners on its ports, [`pod_leftovers`].
pub fn leftovers(z: &Zds, pod: &str, before: &[(&'static str, String)]) -> Vec<String> {
    let p = z.mesh.pod("zb", pod).unwrap();
    let pre: Vec<(&str, &str)> = before.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut left = pod_leftovers(&z.mesh, &p, &pre);
    for port in [15001, 15006, 15008] {
        if z.mesh.listening("zb", pod, port).unwrap_or(true) {
            left.push(format!("listener on {port}"));
        }
    }
    left
}

/// The socket inodes of ztunnel's listeners in `zb/<pod>` (the same sockets, or new ones).
pub fn listener_inodes(z: &Zds, pod: &str) -> Vec<String> {
    let filter = "( sport = :15001 or sport = :15006 or sport = :15008 )";
    let out = z.mesh.exec("zb", pod, &["ss", "-Hltne", filter]).unwrap();
    let mut ino: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("ino:"))
        .map(String::from)
        .collect();
    ino.sort();
    ino
}
