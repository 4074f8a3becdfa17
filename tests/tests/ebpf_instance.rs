//! A Kubernetes rolling update of ztunnel keeps one eBPF instance (eBPF capture; run as root).
//!
//! On Kubernetes ztunnel is not host network: each ztunnel pod has a network namespace of its
//! own, so the next pod of a rolling update (maxSurge 1) runs in another one than the pod it
//! replaces, and the DaemonSet names the instance with `--ebpf-instance $(NODE_NAME)`. This
//! test plays that: ztunnels A and then B each run in a fresh netns of their own (only
//! loopback: in-pod mode needs nothing of the node's network — meshd is a unix socket, every
//! pod socket is made inside the pod's netns), both with the same `--ebpf-instance`; a fake
//! CNI agent (`dataplane::zds::AgentSession`, as in zds_enroll.rs) hands the pod `zb/client`
//! (node-0, in no ambient namespace, so only ZDS captures it) first to A, then to B — as the
//! agent does in a rolling update: adds go to the newest ztunnel. Its peer `za/server` (node-1,
//! config-enrolled) is STRICT: reaching it proves a connection was captured and went over HBONE.
//!
//! Asserts what an operator notices: both ztunnels load the same bpffs directory (not two),
//! B's cgroup links replace A's (one set of hooks attached, A's detached), a connection open
//! through A keeps working while A drains after B took over, new connections are captured,
//! `ztunnel cleanup --orphans` does not list the instance once A's netns is gone (it is B's),
//! and when B stops with no pod enrolled nothing is left: directory gone, links detached.
//!
//! Names (the instance, the two namespaces) carry the run id; a guard removes the instance
//! (`ztunnel cleanup --ebpf-instance`) and the namespaces even when the test fails, and named
//! instances of earlier runs whose process is gone are removed first (`--orphans` never
//! removes named ones). The namespaces use the testbed's `mtb<run id>-` prefix, so a killed
//! run's are swept with the rest of it.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dataplane::zds::proto::WorkloadInfo;
use dataplane::zds::{AgentSession, ZdsListener};
use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{WhoConn, privileged, served_by};

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
const POD_UID: &str = "0b5e2a44-7f1d-4c1e-8d8e-2f6a9c1b7e30";
/// Prefix of this test's instance names (`<prefix><pid>-<tag>`, from the run id).
const NAME_PREFIX: &str = "e2e-";
/// The testbed's netns prefix: `mtb<run id>-<suffix>` is swept when the run is gone.
const TESTBED_NETNS_PREFIX: &str = "mtb";

/// The ztunnel pods' namespaces and the instance, removed on drop (test failure included).
struct Rig {
    ztunnel: PathBuf,
    instance: String,
    netns: Vec<String>,
}

impl Rig {
    fn new(mesh: &LocalMesh) -> Rig {
        let run = mesh.cluster.run_id().to_string();
        let rig = Rig {
            ztunnel: mesh.bins.ztunnel.clone(),
            instance: format!("{NAME_PREFIX}{run}"),
            netns: ["zta", "ztb"]
                .iter()
                .map(|s| format!("{TESTBED_NETNS_PREFIX}{run}-{s}"))
                .collect(),
        };
        for ns in &rig.netns {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        rig
    }

    fn dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf").join(format!("ztunnel@{}", self.instance))
    }

    fn delete_netns(&self, i: usize) {
        ip(&["netns", "del", &self.netns[i]]);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        cleanup_instance(&self.ztunnel, &self.instance);
        for ns in &self.netns {
            if Path::new("/run/netns").join(ns).exists() {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ztunnel cleanup --ebpf-instance NAME`: the instance's pods restored, its pins removed.
fn cleanup_instance(ztunnel: &Path, name: &str) {
    match Command::new(ztunnel)
        .args(["cleanup", "--ebpf-instance", name])
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "ztunnel cleanup --ebpf-instance {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("running ztunnel cleanup: {e}"),
    }
}

/// Named instances of earlier runs of this test whose process is gone (killed before its
/// guard ran): nothing else removes them.
fn sweep_stale_instances(ztunnel: &Path) {
    let prefix = format!("ztunnel@{NAME_PREFIX}");
    for e in std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
    {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(run) = file.strip_prefix(&prefix) else {
            continue;
        };
        let pid = run.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            eprintln!("removing {file} of a run that is gone");
            cleanup_instance(ztunnel, &format!("{NAME_PREFIX}{run}"));
        }
    }
}

/// Whether `zb/client` gets through to the STRICT server: only over HBONE, i.e. captured.
fn reaches(mesh: &LocalMesh, server: &str, message: &str) -> bool {
    mesh.who("zb", "client", server, message).is_ok()
}

fn start_ztunnel(mesh: &LocalMesh, rig: &Rig, i: usize, socket: &Path) -> testbed::Proc {
    let mut cmd = Command::new(&mesh.bins.ztunnel);
    cmd.args(["--node", "node-0", "--log-format", "json"])
        .arg("--meshd")
        .arg(format!("unix:{}", mesh.dir().join("meshd.sock").display()))
        .arg("--token-file")
        .arg(mesh.dir().join("node-0.token"))
        .args(["--capture", "ebpf", "--enrollment", "zds", "--zds-socket"])
        .arg(socket)
        .args(["--ebpf-instance", &rig.instance]);
    let label = ["ztunnel-a", "ztunnel-b"][i];
    mesh.cluster
        .spawn(&testbed::Netns::named(&rig.netns[i]), cmd, label)
        .expect("start ztunnel in its own netns")
}

/// The bpffs directory a ztunnel logged it loaded.
fn logged_dir(proc: &testbed::Proc) -> PathBuf {
    let mut dir = None;
    wait_for(DEADLINE, "ztunnel to log its eBPF directory", || {
        let log = std::fs::read_to_string(proc.log_path()).unwrap_or_default();
        dir = log
            .lines()
            .filter(|l| l.contains("eBPF capture loaded"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v["fields"]["dir"].as_str().map(PathBuf::from));
        Ok(dir.is_some())
    })
    .unwrap();
    dir.unwrap_or_default()
}

/// Ids of the cgroup hook links pinned in `dir` (`link_*`).
fn hook_link_ids(dir: &Path) -> Vec<u64> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !e.file_name().to_string_lossy().starts_with("link_") {
            continue;
        }
        let out = Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(e.path())
            .output()
            .expect("bpftool");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        ids.extend(v["id"].as_u64());
    }
    ids.sort();
    ids
}

fn link_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn orphans(ztunnel: &Path) -> String {
    let out = Command::new(ztunnel)
        .args(["cleanup", "--orphans", "--dry-run"])
        .output()
        .expect("ztunnel cleanup --orphans --dry-run");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Agent {
    rt: tokio::runtime::Runtime,
    listener: ZdsListener,
}

impl Agent {
    /// The next ZDS session a ztunnel opens (it connects and says hello).
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

    /// Hands the pod over, then says the snapshot is complete (a fresh session's first adds).
    fn add(&self, session: &mut AgentSession, netns: &Path) {
        let fd = std::fs::File::open(netns).expect("open the pod's netns");
        let info = WorkloadInfo {
            name: "client".into(),
            namespace: "zb".into(),
            service_account: "client".into(),
        };
        self.rt
            .block_on(session.add(POD_UID, info, fd.as_fd()))
            .expect("add exchange")
            .expect("add acked");
        self.rt
            .block_on(session.snapshot_sent())
            .expect("snapshot exchange")
            .expect("snapshot acked");
    }
}

#[test]
fn rolling_update_between_ztunnel_pods_keeps_one_ebpf_instance() {
    if !privileged() {
        return;
    }
    // The rest of the mesh enrolls from the config: the fake agent is node-0's only one.
    let mesh = LocalMesh::start(MeshOptions {
        capture: "ebpf".into(),
        enrollment: localmesh::Enrollment::Config,
        ..MeshOptions::default()
    })
    .expect("start mesh");
    sweep_stale_instances(&mesh.bins.ztunnel);
    mesh.apply("00-all.yaml", MANIFESTS).unwrap();
    mesh.wait_listening("za", "server", 8080).unwrap();
    mesh.wait_listening("zb", "client", 8080).unwrap();
    mesh.wait_enrolled("za", "server").unwrap();
    let server_pod = mesh.pod("za", "server").unwrap();
    let server = format!("{}:8080", server_pod.ip4);
    assert!(
        !reaches(&mesh, &server, "uncaptured"),
        "an uncaptured client must not pass STRICT (the test would prove nothing)"
    );
    // node-0's own ztunnel (in the node's netns) goes: A and B replace it.
    mesh.stop_ztunnel(0, true);
    let client = mesh.pod("zb", "client").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // In the mesh's run directory: removed with it, even on failure.
    let socket = mesh.dir().join("zds.sock");
    let listener = {
        let _g = rt.enter();
        ZdsListener::bind(&socket).expect("bind the agent's ZDS socket")
    };
    let agent = Agent { rt, listener };
    let rig = Rig::new(&mesh);

    // ztunnel A has the pod; a connection goes through it and stays open.
    let mut a = start_ztunnel(&mesh, &rig, 0, &socket);
    let mut session_a = agent.accept();
    agent.add(&mut session_a, &client.netns.path);
    assert!(
        reaches(&mesh, &server, "via-a"),
        "not captured by ztunnel A"
    );
    let target = std::net::SocketAddr::new(server_pod.ip4.into(), 8080);
    let mut live = WhoConn::connect(&client, target).unwrap();
    assert_eq!(served_by(&live.who("before").unwrap()), "server");
    let dir_a = logged_dir(&a);
    let links_a = hook_link_ids(&dir_a);
    assert_eq!(links_a.len(), 5, "A's cgroup hook links: {links_a:?}");

    // ztunnel B, in another netns, gets the pod (adds go to the newest), then A stops.
    let mut b = start_ztunnel(&mesh, &rig, 1, &socket);
    let mut session_b = agent.accept();
    agent.add(&mut session_b, &client.netns.path);
    let dir_b = logged_dir(&b);
    assert_eq!(
        dir_a, dir_b,
        "the two ztunnels of a rolling update loaded different eBPF instances"
    );
    assert_eq!(dir_b, rig.dir());
    let links_b = hook_link_ids(&dir_b);
    assert_eq!(links_b.len(), 5, "B's cgroup hook links: {links_b:?}");
    let attached: Vec<u64> = links_a
        .iter()
        .chain(&links_b)
        .copied()
        .filter(|id| link_exists(*id))
        .collect();
    assert_eq!(
        attached, links_b,
        "exactly one set of cgroup hooks (B's) must be attached: A's {links_a:?}, B's {links_b:?}"
    );

    a.request_stop();
    for i in 0..3 {
        let reply = live
            .who(&format!("draining-{i}"))
            .expect("the live connection through A survives the handover");
        assert_eq!(served_by(&reply), "server");
    }
    assert!(
        reaches(&mesh, &server, "via-b"),
        "a new connection after the handover was not captured"
    );
    drop(live);
    let status = a
        .wait_timeout(DEADLINE)
        .expect("A exits once its last connection ends");
    assert!(status.success(), "ztunnel A: {status:?}");
    drop(session_a);
    assert!(rig.dir().exists(), "A's stop removed the instance B uses");
    assert!(
        reaches(&mesh, &server, "after-a"),
        "not captured after A exited"
    );

    // The old pod's netns is gone, as after a real rolling update: still not an orphan.
    rig.delete_netns(0);
    let listed = orphans(&mesh.bins.ztunnel);
    assert!(
        !listed.contains(&rig.dir().display().to_string()),
        "cleanup --orphans would remove the instance a running ztunnel uses:\n{listed}"
    );

    // The pod leaves, B stops: nothing of the instance stays.
    agent
        .rt
        .block_on(session_b.del(POD_UID))
        .expect("del exchange")
        .expect("del acked");
    assert!(
        !reaches(&mesh, &server, "unenrolled"),
        "the pod is still captured after del"
    );
    b.terminate(DEADLINE);
    drop(session_b);
    assert!(
        !rig.dir().exists(),
        "B stopped with no pod enrolled and left {}",
        rig.dir().display()
    );
    wait_for(DEADLINE, "B's cgroup links to detach", || {
        Ok(links_b.iter().all(|id| !link_exists(*id)))
    })
    .unwrap();
}

/// `ztunnel cleanup --node NAME` run outside the network namespace the ztunnel ran in (a shell
/// on the node: the ztunnel pod's netns is gone with it) acts on the instance named after the
/// node, as the DaemonSet names it, and says so.
#[test]
fn cleanup_by_node_finds_the_instance_named_after_the_node() {
    if !privileged() {
        return;
    }
    let bins = localmesh::Bins::locate().expect("built binaries");
    sweep_stale_instances(&bins.ztunnel);
    let node = format!("{NAME_PREFIX}{}-node", std::process::id());
    let dir = Path::new("/sys/fs/bpf").join(format!("ztunnel@{node}"));
    std::fs::create_dir(&dir).expect("create a named instance directory");
    struct Guard<'a>(&'a Path, String);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            cleanup_instance(self.0, &self.1);
        }
    }
    let _guard = Guard(&bins.ztunnel, node.clone());
    let cleanup = |dry_run: bool| {
        let mut cmd = Command::new(&bins.ztunnel);
        cmd.args(["cleanup", "--node", &node]);
        if dry_run {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().expect("run ztunnel cleanup");
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (listed, said) = cleanup(true);
    assert_eq!(listed.trim(), dir.display().to_string(), "{said}");
    assert!(said.contains("--ebpf-instance"), "{said}");
    assert!(dir.exists(), "--dry-run removed {}", dir.display());
    cleanup(false);
    assert!(!dir.exists(), "cleanup --node left {}", dir.display());
}
