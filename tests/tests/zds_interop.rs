//! ZDS interoperates with Istio's definitions at the message level: an independent peer
//! (tests/python/zds_peer.py) whose message classes protoc generates at test time from Istio's
//! published zds.proto (tests/schemas/istio-ztunnel-62d8265/, a copy of upstream) talks to our sessions over a
//! real SOCK_SEQPACKET socket, each way:
//!
//! - Python as the CNI agent → our `ZtunnelSession`: we must decode every field Istio's agent
//!   sets (add with its workload info and netns fd, keep = tag 5, snapshot_sent, del = tag 2),
//!   and Python must read our hello and acks (including an ack's error).
//! - Our `AgentSession` → Python as ztunnel: Python must decode every field we send, receive
//!   exactly one fd with add and see that it is our network namespace, and we must read its acks.
//!
//! Nothing privileged: the netns handed over is the process's own.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dataplane::zds::proto::WorkloadInfo;
use dataplane::zds::{AgentSession, Request, ZdsConn, ZdsError, ZdsListener, ZtunnelSession};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// protoc compiling the file and Python starting take a few seconds on a loaded machine.
const PEER_DEADLINE: Duration = Duration::from_secs(60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn istio_proto() -> PathBuf {
    let p = workspace().join("tests/schemas/istio-ztunnel-62d8265/zds.proto");
    assert!(
        p.exists(),
        "Istio's zds.proto is missing at {}",
        p.display()
    );
    p
}

/// A fresh directory under cargo's scratch area, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("zds-interop-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Peer {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    fn spawn(role: &str, socket: &Path) -> Peer {
        let python = std::env::var("MESH_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut child = Command::new(python)
            .arg(workspace().join("tests/python/zds_peer.py"))
            .arg(istio_proto())
            .arg(role)
            .arg(socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("run python3 (cargo xtask deps installs grpcio-tools)");
        let stdout = child.stdout.take().expect("stdout piped");
        Peer {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The peer's next stdout line; panics if it exits or stalls first.
    async fn line(&mut self) -> String {
        match tokio::time::timeout(PEER_DEADLINE, self.lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            Ok(Ok(None)) => panic!("the Python peer exited early (its stderr is above)"),
            Ok(Err(e)) => panic!("reading the Python peer: {e}"),
            Err(_) => panic!("the Python peer said nothing for {PEER_DEADLINE:?}"),
        }
    }

    async fn json(&mut self) -> Value {
        let l = self.line().await;
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("peer printed {l:?}: {e}"))
    }

    async fn succeeded(mut self) {
        let status = tokio::time::timeout(PEER_DEADLINE, self.child.wait())
            .await
            .expect("the Python peer did not exit")
            .expect("wait for the Python peer");
        assert!(status.success(), "the Python peer failed: {status}");
    }
}

fn netns_link(fd: &impl AsRawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .expect("readlink fd")
        .display()
        .to_string()
}

fn info(name: &str, namespace: &str, sa: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: namespace.into(),
        service_account: sa.into(),
    }
}

/// What our ztunnel side decoded, with the netns as its `net:[inode]` link.
#[derive(Debug, PartialEq)]
enum Seen {
    Add(String, Option<WorkloadInfo>, String),
    Keep(String),
    Del(String),
    SnapshotSent,
}

#[tokio::test]
async fn istio_agent_to_our_ztunnel() {
    let scratch = Scratch::new("agent");
    let socket = scratch.0.join("ztunnel.sock");
    let mut peer = Peer::spawn("agent", &socket);
    assert_eq!(peer.line().await, "ready");

    let conn = ZdsConn::connect(&socket)
        .await
        .expect("connect to the Python agent");
    let mut session = ZtunnelSession::start(conn).await.expect("hello");
    let mut seen = Vec::new();
    loop {
        let request = match tokio::time::timeout(PEER_DEADLINE, session.next()).await {
            Ok(Ok(r)) => r,
            Ok(Err(ZdsError::Closed)) => break,
            Ok(Err(e)) => panic!("decoding the Python agent's request: {e}"),
            Err(_) => panic!("the Python agent sent nothing"),
        };
        let mut verdict = Ok(());
        seen.push(match request {
            Request::Add { uid, info, netns } => {
                if uid == "pod-uid-2" {
                    verdict = Err("no room for db-0".to_string());
                }
                Seen::Add(uid, info, netns_link(&netns))
            }
            Request::Keep { uid } => Seen::Keep(uid),
            Request::Del { uid } => Seen::Del(uid),
            Request::SnapshotSent => Seen::SnapshotSent,
        });
        session.ack(verdict).await.expect("ack");
    }

    let report = peer.json().await;
    peer.succeeded().await;
    let python_netns = report["netns"].as_str().expect("netns").to_string();
    assert!(python_netns.starts_with("net:["), "{python_netns}");
    assert_eq!(
        seen,
        vec![
            Seen::Add(
                "pod-uid-1".into(),
                Some(info("web-7f9c", "shop", "web-sa")),
                python_netns.clone()
            ),
            Seen::Add(
                "pod-uid-2".into(),
                Some(info("db-0", "data", "db")),
                python_netns
            ),
            Seen::Keep("pod-uid-3".into()),
            Seen::SnapshotSent,
            Seen::Del("pod-uid-1".into()),
        ]
    );
    // Istio's classes read our hello and acks.
    assert_eq!(report["hello_version"], "V1");
    assert_eq!(report["hello_hex"], "0801", "hello = field 1, varint 1");
    let acks: Vec<(&str, &str)> = report["acks"]
        .as_array()
        .expect("acks")
        .iter()
        .map(|a| {
            (
                a["sent"].as_str().unwrap_or("?"),
                a["error"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        acks,
        vec![
            ("add", ""),
            ("add", "no room for db-0"),
            ("keep", ""),
            ("snapshot_sent", ""),
            ("del", ""),
        ]
    );
}

#[tokio::test]
async fn our_agent_to_istio_ztunnel() {
    let scratch = Scratch::new("ztunnel");
    let socket = scratch.0.join("ztunnel.sock");
    let listener = ZdsListener::bind(&socket).expect("bind");
    let mut peer = Peer::spawn("ztunnel", &socket);
    let conn = tokio::time::timeout(PEER_DEADLINE, listener.accept())
        .await
        .expect("the Python ztunnel did not connect")
        .expect("accept");
    let mut session = AgentSession::accept(conn).await.expect("Istio's hello");
    assert_eq!(peer.line().await, "ready");

    let netns: OwnedFd = std::fs::File::open("/proc/self/ns/net")
        .expect("open /proc/self/ns/net")
        .into();
    let ino = std::fs::metadata(format!("/proc/self/fd/{}", netns.as_raw_fd()))
        .expect("stat netns")
        .ino();
    let web = info("web-7f9c", "shop", "web-sa");
    assert_eq!(
        session
            .add("pod-uid-1", web, netns.as_fd())
            .await
            .expect("add"),
        Ok(())
    );
    assert_eq!(
        session
            .add("nack-me", info("x", "y", "z"), netns.as_fd())
            .await
            .expect("add"),
        Err("nack requested by the test".to_string()),
        "Ack.error decoded"
    );
    assert_eq!(session.keep("pod-uid-3").await.expect("keep"), Ok(()));
    assert_eq!(session.snapshot_sent().await.expect("snapshot"), Ok(()));
    assert_eq!(session.del("pod-uid-1").await.expect("del"), Ok(()));
    drop(session);

    let mut got = Vec::new();
    for _ in 0..5 {
        let mut v = peer.json().await;
        let hex = v.as_object_mut().and_then(|o| o.remove("hex"));
        eprintln!("python decoded {v} from {hex:?}");
        got.push(v);
    }
    peer.succeeded().await;
    let link = netns_link(&netns);
    assert_eq!(
        got,
        vec![
            json!({"kind": "add", "fds": 1, "uid": "pod-uid-1", "has_info": true,
                   "name": "web-7f9c", "namespace": "shop", "service_account": "web-sa",
                   "netns": [link], "netns_inode": [ino]}),
            json!({"kind": "add", "fds": 1, "uid": "nack-me", "has_info": true,
                   "name": "x", "namespace": "y", "service_account": "z",
                   "netns": [link], "netns_inode": [ino]}),
            json!({"kind": "keep", "fds": 0, "uid": "pod-uid-3"}),
            json!({"kind": "snapshot_sent", "fds": 0}),
            json!({"kind": "del", "fds": 0, "uid": "pod-uid-1"}),
        ]
    );
}
