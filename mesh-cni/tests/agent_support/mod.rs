//! Shared by the agent tests: real network namespaces (a node and its pods), the agent as a
//! real process in the node's netns, a fake ztunnel speaking real ZDS (dataplane's
//! ZtunnelSession), and the plugin protocol (event.rs) over the agent's socket. Everything is
//! removed on drop, so a failed test leaves nothing behind.
#![allow(dead_code)]

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane::zds::{Request, ZdsConn, ZtunnelSession};
use mesh_cni::event::{AgentReply, Command as Cmd, PluginEvent};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

pub const DEADLINE: Duration = Duration::from_secs(20);

/// Waits for `cond` (polled), panicking with `what` at the deadline.
pub async fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    wait_for_within(what, DEADLINE, cond).await
}

/// [`wait_for`] with a deadline of `within`, for what the agent does only after a wait of its
/// own.
pub async fn wait_for_within(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short name (netns names are limited and shared machine-wide).
pub fn unique(tag: &str) -> String {
    format!(
        "mca{}{}{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::SeqCst),
        tag
    )
}

/// A named network namespace, deleted on drop.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(tag: &str) -> Ns {
        let name = unique(tag);
        run(&["ip", "netns", "add", &name]);
        Ns { name }
    }
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
    pub fn inode(&self) -> u64 {
        std::fs::metadata(self.path()).expect("netns exists").ino()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run(argv: &[&str]) {
    let st = Command::new(argv[0])
        .args(&argv[1..])
        .status()
        .expect("spawn");
    assert!(st.success(), "{argv:?} failed");
}

/// `mesh-cni agent` as a process in `node`'s netns; killed on drop.
pub struct AgentProc {
    child: Child,
    pub plugin_socket: PathBuf,
}

impl AgentProc {
    /// Starts the agent with the sockets and state under `dir` and `extra` flags, in `node`'s
    /// netns (else in the test's own, for an API double on loopback; no probe SNAT there).
    pub async fn start(node: Option<&Ns>, dir: &Path, extra: &[String]) -> AgentProc {
        let plugin_socket = dir.join("plugin.sock");
        let bin = env!("CARGO_BIN_EXE_mesh-cni");
        let mut cmd = match node {
            Some(node) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &node.name, bin, "agent"]);
                c
            }
            None => {
                let mut c = Command::new(bin);
                c.args(["agent", "--no-probe-snat"]);
                c
            }
        };
        cmd.arg("--plugin-socket")
            .arg(&plugin_socket)
            .arg("--zds-socket")
            .arg(dir.join("zds.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .env("RUST_LOG", "mesh_cni=debug,info")
            .stdin(Stdio::null());
        let child = cmd.spawn().expect("spawning the agent");
        let mut agent = AgentProc {
            child,
            plugin_socket,
        };
        // Serving once the plugin socket answers (bound last, after restart recovery).
        let end = Instant::now() + DEADLINE;
        loop {
            if tokio::net::UnixStream::connect(&agent.plugin_socket)
                .await
                .is_ok()
            {
                break;
            }
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("agent exited: {st}");
            }
            assert!(Instant::now() < end, "agent did not start serving");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agent
    }

    /// SIGTERM, and waits for the exit.
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl AgentProc {
    /// SIGKILL: a crash, leaving its socket files behind.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a fake ztunnel received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Add { uid: String, inode: u64, ns: String },
    Keep(String),
    Del(String),
    SnapshotSent,
}

/// A fake ztunnel: connects to the agent's ZDS socket, records every request, acks each with
/// `Ok` or, for uids in `refuse`, an error.
pub struct FakeZtunnel {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub refuse: Arc<Mutex<Vec<String>>>,
    pub connected: Arc<Mutex<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeZtunnel {
    pub async fn connect(zds: &Path) -> FakeZtunnel {
        let conn = {
            let end = Instant::now() + DEADLINE;
            loop {
                match ZdsConn::connect(zds).await {
                    Ok(c) => break c,
                    Err(e) => assert!(Instant::now() < end, "ZDS connect: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let mut session = ZtunnelSession::start(conn).await.expect("hello");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let refuse: Arc<Mutex<Vec<String>>> = Arc::default();
        let connected = Arc::new(Mutex::new(true));
        let (s, r, c) = (seen.clone(), refuse.clone(), connected.clone());
        let task = tokio::spawn(async move {
            loop {
                let req = match session.next().await {
                    Ok(req) => req,
                    Err(_) => {
                        *c.lock().expect("lock") = false;
                        return;
                    }
                };
                let (event, uid) = match req {
                    Request::Add { uid, info, netns } => {
                        let inode = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&netns))
                            .map(|s| s.st_ino)
                            .unwrap_or(0);
                        let ns = info
                            .map(|i| format!("{}/{}/{}", i.namespace, i.name, i.service_account))
                            .unwrap_or_default();
                        (
                            Seen::Add {
                                uid: uid.clone(),
                                inode,
                                ns,
                            },
                            Some(uid),
                        )
                    }
                    Request::Keep { uid } => (Seen::Keep(uid), None),
                    Request::Del { uid } => (Seen::Del(uid), None),
                    Request::SnapshotSent => (Seen::SnapshotSent, None),
                };
                s.lock().expect("lock").push(event);
                let refused = uid.is_some_and(|u| r.lock().expect("lock").contains(&u));
                let ack = if refused {
                    Err("fake ztunnel refuses this pod".to_string())
                } else {
                    Ok(())
                };
                if session.ack(ack).await.is_err() {
                    *c.lock().expect("lock") = false;
                    return;
                }
            }
        });
        FakeZtunnel {
            seen,
            refuse,
            connected,
            task,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn added(&self, uid: &str) -> bool {
        self.seen()
            .iter()
            .any(|s| matches!(s, Seen::Add { uid: u, .. } if u == uid))
    }

    pub fn deleted(&self, uid: &str) -> bool {
        self.seen().contains(&Seen::Del(uid.to_string()))
    }

    pub fn snapshot_done(&self) -> bool {
        self.seen().contains(&Seen::SnapshotSent)
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.lock().expect("lock")
    }
}

impl Drop for FakeZtunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An event as a CNI runtime's plugin would send it.
pub fn event(cmd: Cmd, ns: &str, name: &str, uid: &str, netns: &str, ip: &str) -> PluginEvent {
    PluginEvent {
        command: cmd,
        container_id: format!("sandbox-{name}"),
        netns: netns.to_string(),
        pod_namespace: ns.to_string(),
        pod_name: name.to_string(),
        pod_uid: uid.to_string(),
        ips: ip.parse::<IpAddr>().into_iter().collect(),
    }
}

/// One request on the plugin socket, as the plugin sends it (event.rs: a JSON line each way).
pub async fn call(socket: &Path, ev: &PluginEvent) -> AgentReply {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("agent socket");
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(ev).expect("json");
    line.push(b'\n');
    w.write_all(&line).await.expect("write");
    let mut reply = String::new();
    tokio::time::timeout(
        mesh_cni::event::PLUGIN_TIMEOUT,
        BufReader::new(r).read_line(&mut reply),
    )
    .await
    .expect("agent answered in time")
    .expect("read");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
}

/// Writes `text` to `path` atomically (the agent polls the directory).
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}
