//! ztunnel's ZDS enrollment (`--enrollment zds`) on the paths `zds_enroll.rs` leaves out, each
//! with a fake CNI agent (the test holds `dataplane::zds::AgentSession`) handing real pods'
//! network namespaces to a real ztunnel on node-0:
//! - re-listen: a pod enrolled before meshd's config arrived gets the config's trust domain
//!   (new connections present the new identity) and later label changes (policy by selector),
//!   while live connections keep working;
//! - replace: `add` for the same pod uid with another netns (a re-created sandbox) moves the
//!   enrollment, leaving nothing in the old netns, in steady state and in a reconnect's
//!   snapshot; the same netns again is idempotent (same listener sockets, a live connection
//!   carries on), and so are config updates that do not concern the pod;
//! - exclusions: Istio's `excludeOutboundPorts`/`excludeInboundPorts` on a ZDS-enrolled pod
//!   bypass ztunnel, the rest is captured (run with MESH_CAPTURE=ebpf and =nftables).
//!
//! `zb/client` lives in a namespace that is NOT ambient: its capture comes from ZDS only. Its
//! peer `za/server` (node-1) is STRICT, so a client connection reaches it only over HBONE;
//! `zc/plain` (node-1) is outside the mesh.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use dataplane::zds::proto::WorkloadInfo;
use dataplane::zds::{AgentSession, ZdsListener};
use localmesh::client::field;
use localmesh::{Enrollment, LocalMesh, MeshOptions, wait_for};
use mesh_tests::leftovers::{pod_leftovers, sysctl};
use mesh_tests::manifests::{echo_pod, namespace};
use mesh_tests::{WhoConn, privileged, served_by};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(20);
const POD_UID: &str = "0d7e5b1a-6c3f-4e2a-8b9d-1f2e3a4b5c6d";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/zb/sa/client";

/// What enrollment changes in a pod (sysctls), read before it joins.
const SYSCTLS: [&str; 5] = [
    "net.ipv4.tcp_fwmark_accept",
    "net.ipv4.fwmark_reflect",
    "net.ipv6.fwmark_reflect",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_migrate_req",
];

fn base() -> String {
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
fn client_pod(app: &str, annotations: &str) -> String {
    format!(
        "\n---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: client, namespace: zb, labels: {{app: {app}}}, annotations: {annotations}}}\n\
         spec:\n  nodeName: node-0\n  serviceAccountName: client\n  containers:\n  \
         - {{name: echo, command: [mesh-echo, serve, --port, \"8080\", --port, \"7070\"]}}\n"
    )
}

fn client_info() -> WorkloadInfo {
    WorkloadInfo {
        name: "client".into(),
        namespace: "zb".into(),
        service_account: "client".into(),
    }
}

/// The mesh with node-0's ztunnel replaced by a `--enrollment zds` one, the agent's socket it
/// dials, and a runtime for the fake agent. Fields drop in order: the process goes first.
struct Zds {
    ztunnel: testbed::Proc,
    listener: ZdsListener,
    mesh: LocalMesh,
    rt: tokio::runtime::Runtime,
}

/// `client_yaml` as `10-client.yaml`; with `meshd_down`, meshd is stopped before the ZDS
/// ztunnel starts (it enrolls pods with no config).
fn start(client_yaml: &str, ztunnel_args: &[&str], meshd_down: bool) -> Zds {
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
    fn accept(&self) -> AgentSession {
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
    fn add(&self, agent: &mut AgentSession, pod: &str) -> Result<(), String> {
        let netns = self.mesh.pod("zb", pod).unwrap().netns.path;
        let fd = std::fs::File::open(netns).expect("open netns");
        self.rt
            .block_on(agent.add(POD_UID, client_info(), fd.as_fd()))
            .expect("add exchange")
    }

    fn snapshot_sent(&self, agent: &mut AgentSession) {
        self.rt
            .block_on(agent.snapshot_sent())
            .expect("snapshot exchange")
            .expect("snapshot acked");
    }

    fn addr(&self, ns: &str, pod: &str, port: u16) -> String {
        format!("{}:{port}", self.mesh.pod(ns, pod).unwrap().ip4)
    }

    fn sock(&self, ns: &str, pod: &str, port: u16) -> SocketAddr {
        self.addr(ns, pod, port).parse().unwrap()
    }

    fn reaches(&self, ns: &str, pod: &str, addr: &str) -> bool {
        self.mesh.who(ns, pod, addr, "zds-paths").is_ok()
    }

    /// node-0's (the ZDS ztunnel's) config dump.
    fn dump(&self) -> Value {
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
    fn wait_config(&self) {
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
    fn enrolled(&self) -> Option<Value> {
        let dump = self.dump();
        let pods = dump["pods"].as_array()?;
        pods.iter().find(|p| p["podUid"] == POD_UID).cloned()
    }

    /// The ZDS ztunnel's access-log entries.
    fn access_log(&self) -> Vec<Value> {
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
fn sysctls(z: &Zds, pod: &str) -> Vec<(&'static str, String)> {
    let p = z.mesh.pod("zb", pod).unwrap();
    SYSCTLS
        .iter()
        .map(|k| (*k, sysctl(&z.mesh, &p, k)))
        .collect()
}

/// What of ztunnel is in `zb/<pod>`: listeners on its ports, [`pod_leftovers`].
fn leftovers(z: &Zds, pod: &str, before: &[(&'static str, String)]) -> Vec<String> {
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
fn listener_inodes(z: &Zds, pod: &str) -> Vec<String> {
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

#[test]
fn zds_pod_takes_the_configs_trust_domain_and_labels_live_connections_stay() {
    if !privileged() {
        return;
    }
    // Enrolled while meshd is away: the identity uses ztunnel's --trust-domain.
    let z = start(
        &client_pod("client", "{}"),
        &["--trust-domain", "stale.example"],
        true,
    );
    let mut agent = z.accept();
    z.add(&mut agent, "client")
        .expect("add acked without a config");
    let pod = z.enrolled().expect("enrolled");
    assert_eq!(pod["identity"], "spiffe://stale.example/ns/zb/sa/client");
    z.snapshot_sent(&mut agent);

    // A live connection through the pod's inbound listener (outbound ones wait for a config:
    // ztunnel cannot tell mesh destinations from others without one).
    let client = z.mesh.pod("zb", "client").unwrap();
    let plain = z.mesh.pod("zc", "plain").unwrap();
    let mut inb = WhoConn::connect(&plain, z.sock("zb", "client", 8080)).unwrap();
    assert_eq!(served_by(&inb.who("before").unwrap()), "client");
    let server = z.addr("za", "server", 8080);
    assert!(
        !z.reaches("zb", "client", &server),
        "no certificate for the stale trust domain: STRICT must refuse"
    );

    // meshd's config names the trust domain: new listeners, the new identity on the wire.
    z.mesh.start_meshd().unwrap();
    wait_for(DEADLINE, "the pod's identity to follow the config", || {
        Ok(z.enrolled().is_some_and(|p| p["identity"] == CLIENT_ID))
    })
    .unwrap();
    // The old listeners close: only one set of ztunnel's sockets stays in the pod.
    wait_for(DEADLINE, "the pod's old listeners to close", || {
        Ok(listener_inodes(&z, "client").len() == 6)
    })
    .unwrap();
    wait_for(DEADLINE, "the client to reach the STRICT server", || {
        Ok(z.reaches("zb", "client", &server))
    })
    .unwrap();
    // The server's ztunnel logs the peer identity mTLS showed it (when the connection ends).
    let seen = || -> Vec<String> {
        z.mesh
            .access_log(1)
            .into_iter()
            .filter(|e| {
                field(e, "direction") == "inbound" && field(e, "dst.workload") == "za/server"
            })
            .map(|e| field(&e, "src.identity"))
            .collect()
    };
    wait_for(
        DEADLINE,
        "the server's ztunnel to log the client's identity",
        || Ok(seen().iter().any(|id| id == CLIENT_ID)),
    )
    .unwrap();
    let seen = seen();
    assert!(
        !seen.iter().any(|id| id.contains("stale.example")),
        "{seen:?}"
    );
    assert_eq!(served_by(&inb.who("after-td").unwrap()), "client");
    let mut out = WhoConn::connect(&client, z.sock("za", "server", 8080)).unwrap();
    assert_eq!(served_by(&out.who("before-label").unwrap()), "server");

    // A label change reaches the pod's listeners: app=locked is selected by an allow-nothing
    // policy, so new inbound connections are refused; live ones carry on.
    let client_in = z.addr("zb", "client", 8080);
    assert!(z.reaches("zc", "plain", &client_in));
    z.mesh
        .apply("10-client.yaml", &client_pod("locked", "{}"))
        .unwrap();
    wait_for(
        DEADLINE,
        "the relabelled pod to refuse new connections",
        || Ok(!z.reaches("zc", "plain", &client_in)),
    )
    .unwrap();
    assert_eq!(served_by(&out.who("after-label").unwrap()), "server");
    assert_eq!(served_by(&inb.who("after-label").unwrap()), "client");
    assert!(
        z.reaches("zb", "client", &server),
        "outbound still captured"
    );
}

#[test]
fn zds_add_with_a_new_netns_replaces_the_enrollment_and_same_netns_is_idempotent() {
    if !privileged() {
        return;
    }
    let z = start(&client_pod("client", "{}"), &[], false);
    let (pre_a, pre_b) = (sysctls(&z, "client"), sysctls(&z, "client-b"));
    let server = z.addr("za", "server", 8080);
    // With the config in, the add is final (no later update moves the listeners).
    z.wait_config();
    let mut agent = z.accept();
    z.add(&mut agent, "client").expect("add acked");
    assert!(z.reaches("zb", "client", &server));

    // The same uid and netns again: nothing moves, a live connection carries on.
    let a = z.mesh.pod("zb", "client").unwrap();
    let mut live = WhoConn::connect(&a, z.sock("za", "server", 8080)).unwrap();
    assert_eq!(served_by(&live.who("before").unwrap()), "server");
    let listeners = listener_inodes(&z, "client");
    assert!(listeners.len() >= 3, "{listeners:?}");
    z.add(&mut agent, "client").expect("re-add acked");
    assert_eq!(
        listener_inodes(&z, "client"),
        listeners,
        "re-add must keep the pod's listeners"
    );
    assert_eq!(served_by(&live.who("after re-add").unwrap()), "server");
    // Config updates that do not concern the pod leave its listeners alone.
    for i in 0..4 {
        let name = format!("noise-{i}");
        let svc = format!(
            "\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: zc}}\n\
             spec: {{selector: {{app: plain}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
        );
        z.mesh.apply("20-noise.yaml", &svc).unwrap();
        wait_for(DEADLINE, &format!("the ZDS ztunnel to see {name}"), || {
            let dump = z.dump();
            Ok(dump["services"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["key"].as_str().is_some_and(|k| k.contains(&name)))
            }))
        })
        .unwrap();
        assert_eq!(
            listener_inodes(&z, "client"),
            listeners,
            "a config update unrelated to the pod moved its listeners"
        );
    }
    z.snapshot_sent(&mut agent);

    // The sandbox was re-created (new netns, same uid): the new one is captured, nothing of
    // ours stays in the old one.
    z.add(&mut agent, "client-b")
        .expect("add with a new netns acked");
    let b_ip = z.mesh.pod("zb", "client-b").unwrap().ip4.to_string();
    let pod = z.enrolled().expect("still enrolled");
    assert_eq!(pod["ips"][0], b_ip.as_str(), "{pod}");
    assert!(
        z.reaches("zb", "client-b", &server),
        "new netns not captured"
    );
    assert!(
        !z.reaches("zb", "client", &server),
        "old netns still captured"
    );
    assert_eq!(leftovers(&z, "client", &pre_a), Vec::<String>::new());

    // The same in a reconnect's snapshot: the replaced pod is part of it, not unenrolled.
    drop(agent);
    let mut agent = z.accept();
    z.add(&mut agent, "client")
        .expect("add with the first netns acked");
    z.snapshot_sent(&mut agent);
    let pod = z
        .enrolled()
        .expect("a pod added in the snapshot must stay enrolled");
    assert_eq!(pod["ips"][0], a.ip4.to_string().as_str(), "{pod}");
    assert!(
        z.reaches("zb", "client", &server),
        "re-enrolled netns not captured"
    );
    assert!(!z.reaches("zb", "client-b", &server));
    assert_eq!(leftovers(&z, "client-b", &pre_b), Vec::<String>::new());
}

#[test]
fn zds_pod_exclusion_annotations_bypass_ztunnel() {
    if !privileged() {
        return;
    }
    const EXCL: &str = "{traffic.sidecar.istio.io/excludeOutboundPorts: \"9090\", \
                        traffic.sidecar.istio.io/excludeInboundPorts: \"7070\"}";
    // zb STRICT: plaintext into the client is refused unless its port is excluded.
    let strict_zb = "\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                     metadata: {name: strict, namespace: zb}\nspec: {mtls: {mode: STRICT}}\n";
    let z = start(&(client_pod("client", EXCL) + strict_zb), &[], false);
    // The annotations come with meshd's config: have it before the add.
    z.wait_config();
    let mut agent = z.accept();
    z.add(&mut agent, "client").expect("add acked");
    z.snapshot_sent(&mut agent);

    // Outbound: 8080 captured (passes STRICT over HBONE), 9090 goes out as plaintext.
    assert!(z.reaches("zb", "client", &z.addr("za", "server", 8080)));
    assert!(
        !z.reaches("zb", "client", &z.addr("za", "server", 9090)),
        "excluded port 9090 must bypass ztunnel (plaintext, refused by STRICT)"
    );
    let client = z.mesh.pod("zb", "client").unwrap();
    let mut bypass = WhoConn::connect(&client, z.sock("zc", "plain", 9090)).unwrap();
    assert_eq!(served_by(&bypass.who("direct").unwrap()), "plain");
    let bypass_local = bypass.local_addr().unwrap().to_string();
    drop(bypass);
    // A captured connection afterwards: once its entry is logged, the bypass would be too.
    let mut captured = WhoConn::connect(&client, z.sock("zc", "plain", 8080)).unwrap();
    assert_eq!(served_by(&captured.who("via ztunnel").unwrap()), "plain");
    let captured_local = captured.local_addr().unwrap().to_string();
    drop(captured);
    wait_for(
        DEADLINE,
        "the captured connection's access-log entry",
        || {
            Ok(z.access_log()
                .iter()
                .any(|e| field(e, "peer") == captured_local))
        },
    )
    .unwrap();
    assert!(
        !z.access_log()
            .iter()
            .any(|e| field(e, "peer") == bypass_local),
        "the excluded connection went through ztunnel"
    );

    // Inbound: 8080 captured (plaintext refused by STRICT), 7070 reaches the app directly.
    assert!(!z.reaches("zc", "plain", &z.addr("zb", "client", 8080)));
    assert!(
        z.reaches("zc", "plain", &z.addr("zb", "client", 7070)),
        "excluded inbound port 7070 must bypass ztunnel"
    );

    // The annotations change after enrollment: applied in place.
    z.mesh
        .apply("10-client.yaml", &(client_pod("client", "{}") + strict_zb))
        .unwrap();
    wait_for(DEADLINE, "port 9090 to be captured again", || {
        Ok(z.reaches("zb", "client", &z.addr("za", "server", 9090)))
    })
    .unwrap();
    assert!(!z.reaches("zc", "plain", &z.addr("zb", "client", 7070)));
}
