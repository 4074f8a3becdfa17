//! ztunnel's ZDS enrollment source (`--enrollment zds`) end to end, with a fake CNI agent: the
//! test holds the agent's side of ZDS (`dataplane::zds::AgentSession`) and hands a real pod's
//! network namespace to a real ztunnel process on node-0. The pod (`zb/client`) lives in a
//! namespace that is NOT ambient, so the config never enrolls it: whatever capture it gets
//! comes from ZDS. Its peer `za/server` (node-1, config-enrolled) is STRICT, so a connection
//! from the client reaches it only if it was captured and carried over HBONE.
//!
//! Asserts what a user (the agent, the pod's app) notices: the ack comes with capture already
//! in place, del and a snapshot without the pod take capture away, a bad netns is refused with
//! a reason, an agent reconnect keeps capture, and readiness waits for the snapshot.

use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dataplane::zds::proto::WorkloadInfo;
use dataplane::zds::{AgentSession, ZdsListener};
use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::privileged;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: za, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: zb}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: za}
spec: {mtls: {mode: STRICT}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: za, labels: {app: server}}
spec:
  nodeName: node-1
  serviceAccountName: server
  containers:
  - name: echo
    command: ["mesh-echo", "serve", "--port", "8080"]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: zb, labels: {app: client}}
spec:
  nodeName: node-0
  serviceAccountName: client
  containers:
  - name: echo
    command: ["mesh-echo", "serve", "--port", "8080"]
"#;

const DEADLINE: Duration = Duration::from_secs(20);
const POD_UID: &str = "6f1c1f0e-3a52-4d2b-9a51-0c1d2e3f4a5b";

fn client_info() -> WorkloadInfo {
    WorkloadInfo {
        name: "client".into(),
        namespace: "zb".into(),
        service_account: "client".into(),
    }
}

/// The mesh, node-0's config-mode ztunnel replaced by a `--enrollment zds` one pointed at
/// `socket`, and a runtime for the fake agent.
struct Setup {
    // Dropped first: the process goes before its mesh.
    _ztunnel: testbed::Proc,
    mesh: LocalMesh,
    rt: tokio::runtime::Runtime,
    server: String,
}

fn setup() -> (Setup, ZdsListener) {
    // The rest of the mesh enrolls from the config, so this test needs no CNI agent: the
    // fake one below is node-0's only agent.
    // SAFETY: set before anything reads the environment on another thread (this binary has
    // this one test; the mesh starts after).
    unsafe { std::env::set_var("MESH_ENROLLMENT", "config") };
    let mesh = LocalMesh::start(MeshOptions::default()).expect("start mesh");
    // In the mesh's run directory: removed with it, even on failure.
    let socket = mesh.dir().join("zds.sock");
    mesh.apply("00-all.yaml", MANIFESTS).unwrap();
    mesh.wait_listening("za", "server", 8080).unwrap();
    mesh.wait_listening("zb", "client", 8080).unwrap();
    mesh.wait_enrolled("za", "server").unwrap();
    let server = format!("{}:8080", mesh.pod("za", "server").unwrap().ip4);
    assert!(
        !reaches(&mesh, &server),
        "an uncaptured client must not pass STRICT (the test would prove nothing)"
    );
    mesh.stop_ztunnel(0, true);
    let rt = tokio::runtime::Runtime::new().unwrap();
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
        .arg(&socket);
    let ztunnel = mesh
        .cluster
        .spawn(&node0.netns, cmd, "ztunnel-zds")
        .expect("start ztunnel --enrollment zds");
    (
        Setup {
            mesh,
            rt,
            _ztunnel: ztunnel,
            server,
        },
        listener,
    )
}

impl Setup {
    /// The next ZDS session ztunnel opens (it connects and says hello).
    fn accept(&self, listener: &ZdsListener) -> AgentSession {
        self.rt
            .block_on(async {
                tokio::time::timeout(DEADLINE, async {
                    let conn = listener.accept().await?;
                    AgentSession::accept(conn).await
                })
                .await
            })
            .expect("ztunnel connects within the deadline")
            .expect("ztunnel's hello")
    }

    fn add(&self, agent: &mut AgentSession, uid: &str, netns: &Path) -> Result<(), String> {
        let fd = std::fs::File::open(netns).expect("open netns");
        self.rt
            .block_on(agent.add(uid, client_info(), fd.as_fd()))
            .expect("add exchange")
    }

    fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// node-0 ztunnel's `/healthz/ready`: Ok, or the reason it is not ready.
    fn ready(&self) -> Result<(), String> {
        match self.curl("http://127.0.0.1:15021/healthz/ready") {
            (200, _) => Ok(()),
            (code, body) => Err(format!("{code}: {body}")),
        }
    }

    fn dump(&self) -> serde_json::Value {
        let (code, body) = self.curl("http://127.0.0.1:15000/config_dump");
        assert_eq!(code, 200, "config_dump: {body}");
        serde_json::from_str(&body).expect("config_dump is JSON")
    }

    /// (HTTP status, body) of a GET on node-0's ztunnel admin ports.
    fn curl(&self, url: &str) -> (u16, String) {
        let node0 = self.mesh.cluster.nodes()[0].clone();
        let out = self
            .mesh
            .cluster
            .run(
                &node0.netns,
                &["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}", url],
            )
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn enrolled_uids(&self) -> Vec<String> {
        self.dump()["pods"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter_map(|p| p["podUid"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn reaches(&self) -> bool {
        reaches(&self.mesh, &self.server)
    }
}

/// Whether `zb/client` gets through to the STRICT server: only over HBONE, i.e. captured.
fn reaches(mesh: &LocalMesh, server: &str) -> bool {
    mesh.who("zb", "client", server, "zds").is_ok()
}

#[test]
fn zds_agent_enrolls_a_pod_before_acking_and_takes_it_back() {
    if !privileged() {
        return;
    }
    let (s, listener) = setup();
    let client = s.mesh.pod("zb", "client").unwrap();

    // Connected, no snapshot yet: not ready, and says why.
    let mut agent = s.accept(&listener);
    let r = s.ready();
    assert!(
        r.as_ref().is_err_and(|e| e.contains("snapshot")),
        "ready before the snapshot: {r:?}"
    );

    // The ack means captured: the pod's very next connection goes over HBONE.
    s.add(&mut agent, POD_UID, &client.netns.path)
        .expect("add acked");
    assert!(
        s.reaches(),
        "connection right after the ack was not captured"
    );
    let dump = s.dump();
    assert_eq!(dump["enrollment"]["source"], "zds");
    let pod = &dump["pods"][0];
    assert_eq!(pod["podUid"], POD_UID);
    assert_eq!(pod["uid"], "zb/client");
    assert_eq!(pod["identity"], "spiffe://cluster.local/ns/zb/sa/client");
    assert!(
        pod["ips"]
            .as_array()
            .is_some_and(|ips| ips.iter().any(|ip| ip == &client.ip4.to_string())),
        "{pod}"
    );

    // The same pod again (same netns): idempotent. Another uid with its netns, or the host's
    // netns: refused with a reason, nothing enrolled.
    s.add(&mut agent, POD_UID, &client.netns.path)
        .expect("re-add of the same pod is acked");
    let e = s
        .add(&mut agent, "other-uid", &client.netns.path)
        .expect_err("a netns already enrolled as another pod");
    assert!(e.contains("already enrolled as another pod"), "{e}");
    // The node's own namespace (where ztunnel and host-network pods live) and an fd that is no
    // network namespace at all.
    let node0 = s.mesh.cluster.nodes()[0].netns.path.clone();
    let e = s
        .add(&mut agent, "node-uid", &node0)
        .expect_err("the node's netns must be refused");
    assert!(e.contains("not a pod's"), "{e}");
    let e = s
        .add(&mut agent, "file-uid", Path::new("/etc/hostname"))
        .expect_err("a file is no netns");
    assert!(e.contains("is not a network namespace"), "{e}");
    assert_eq!(s.enrolled_uids(), vec![POD_UID.to_string()]);

    // Snapshot done: ready once the pod's certificate is in.
    s.run(agent.snapshot_sent())
        .expect("snapshot exchange")
        .expect("snapshot acked");
    wait_for(DEADLINE, "ztunnel ready after the snapshot", || {
        Ok(s.ready().is_ok())
    })
    .unwrap();

    // The agent goes away: capture stays, readiness goes; it comes back and keeps the pod.
    drop(agent);
    // (ztunnel reconnects at once — the socket still listens — and is not ready again until
    // the new session's snapshot.)
    wait_for(DEADLINE, "ztunnel to notice the agent left", || {
        Ok(s.ready().is_err_and(|e| {
            e.contains("not connected") || e.contains("waiting for the CNI agent's snapshot")
        }))
    })
    .unwrap();
    assert!(s.reaches(), "capture must stay while the agent is away");
    let mut agent = s.accept(&listener);
    s.run(agent.keep(POD_UID))
        .expect("keep exchange")
        .expect("keep acked");
    s.run(agent.snapshot_sent())
        .expect("snapshot exchange")
        .expect("snapshot acked");
    assert_eq!(s.enrolled_uids(), vec![POD_UID.to_string()]);
    assert!(s.reaches(), "a reconnect must keep capture");

    // Del: capture goes, at once.
    s.run(agent.del(POD_UID))
        .expect("del exchange")
        .expect("del acked");
    assert!(s.enrolled_uids().is_empty());
    assert!(!s.reaches(), "after del the pod must not be captured");

    // Back in, then a new session whose snapshot omits it: unenrolled.
    s.add(&mut agent, POD_UID, &client.netns.path)
        .expect("add acked");
    assert!(s.reaches());
    drop(agent);
    let mut agent = s.accept(&listener);
    s.run(agent.snapshot_sent())
        .expect("snapshot exchange")
        .expect("snapshot acked");
    assert!(s.enrolled_uids().is_empty());
    assert!(
        !s.reaches(),
        "a pod missing from the snapshot must be unenrolled"
    );
}
