//! A whole ZDS session over a real socket file: the agent binds, ztunnel connects and says
//! hello, the agent sends add (with a real netns fd) / keep / snapshot_sent / del, and each is
//! acked in order. Also the socket file's life: mode 0600, a stale file replaced, a live or
//! foreign one refused.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use dataplane::zds::proto::WorkloadInfo;
use dataplane::zds::{AgentSession, Request, ZdsConn, ZdsError, ZdsListener, ZtunnelSession};

/// A fresh directory, removed on drop (also when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("zds-session-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn own_netns() -> OwnedFd {
    std::fs::File::open("/proc/self/ns/net")
        .expect("open /proc/self/ns/net")
        .into()
}

fn inode_of(fd: &OwnedFd) -> u64 {
    nix::sys::stat::fstat(fd.as_raw_fd()).expect("fstat").st_ino
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "shop".into(),
        service_account: "checkout".into(),
    }
}

/// What ztunnel saw, in order; a netns is recorded as its inode and whether it is CLOEXEC.
#[derive(Debug, PartialEq)]
enum Seen {
    Add(String, Option<WorkloadInfo>, u64, bool),
    Keep(String),
    Del(String),
    SnapshotSent,
}

#[tokio::test]
async fn full_session_over_a_socket_file() {
    let dir = TempDir::new();
    let path = dir.0.join("run/ztunnel/ztunnel.sock");
    let listener = ZdsListener::bind(&path).expect("bind");
    let mode = std::fs::metadata(&path)
        .expect("socket file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode");

    // ztunnel: hello, then ack everything except the add for "bad".
    let zt_path = path.clone();
    let ztunnel = tokio::spawn(async move {
        let conn = ZdsConn::connect(&zt_path).await.expect("connect");
        let mut session = ZtunnelSession::start(conn).await.expect("hello");
        let mut seen = Vec::new();
        loop {
            let request = match session.next().await {
                Ok(r) => r,
                Err(ZdsError::Closed) => return seen,
                Err(e) => panic!("ztunnel side: {e}"),
            };
            let mut verdict = Ok(());
            seen.push(match request {
                Request::Add { uid, info, netns } => {
                    let flags = nix::fcntl::fcntl(netns.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD)
                        .expect("F_GETFD");
                    if uid == "bad" {
                        verdict = Err("cannot enter netns: permission denied".to_string());
                    }
                    Seen::Add(uid, info, inode_of(&netns), flags & libc::FD_CLOEXEC != 0)
                }
                Request::Keep { uid } => Seen::Keep(uid),
                Request::Del { uid } => Seen::Del(uid),
                Request::SnapshotSent => Seen::SnapshotSent,
            });
            session.ack(verdict).await.expect("ack");
        }
    });

    let conn = listener.accept().await.expect("accept");
    let mut agent = AgentSession::accept(conn)
        .await
        .expect("hello from ztunnel");
    let netns = own_netns();
    let want_ino = inode_of(&netns);

    assert_eq!(
        agent
            .add("uid-1", info("web-1"), netns.as_fd())
            .await
            .expect("add"),
        Ok(())
    );
    assert_eq!(
        agent
            .add("bad", info("web-2"), netns.as_fd())
            .await
            .expect("add"),
        Err("cannot enter netns: permission denied".to_string()),
        "ztunnel's error comes back as the ack's error"
    );
    assert_eq!(agent.keep("uid-0").await.expect("keep"), Ok(()));
    assert_eq!(agent.snapshot_sent().await.expect("snapshot"), Ok(()));
    let late_keep = agent.keep("uid-0").await;
    assert!(
        matches!(&late_keep, Err(ZdsError::Protocol(m)) if m.contains("keep") && m.contains("snapshot_sent")),
        "keep after snapshot_sent must be refused before it is sent: {late_keep:?}"
    );
    assert_eq!(agent.del("uid-1").await.expect("del"), Ok(()));
    drop(agent);

    let seen = ztunnel.await.expect("ztunnel task");
    assert_eq!(
        seen,
        vec![
            Seen::Add("uid-1".into(), Some(info("web-1")), want_ino, true),
            Seen::Add("bad".into(), Some(info("web-2")), want_ino, true),
            Seen::Keep("uid-0".into()),
            Seen::SnapshotSent,
            Seen::Del("uid-1".into()),
        ]
    );
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_but_not_a_live_one_or_a_file() {
    let dir = TempDir::new();
    let path = dir.0.join("ztunnel.sock");

    let first = ZdsListener::bind(&path).expect("first bind");
    let inode_before = std::fs::metadata(&path).expect("socket").ino();
    let second = ZdsListener::bind(&path);
    assert!(
        matches!(&second, Err(ZdsError::Socket { source, .. }) if source.kind() == std::io::ErrorKind::AddrInUse),
        "a live agent's socket must not be stolen: {:?}",
        second.err()
    );
    assert_eq!(
        std::fs::metadata(&path).expect("socket").ino(),
        inode_before
    );

    // A dead agent leaves its socket file behind.
    drop(first);
    assert!(path.exists());
    let third = ZdsListener::bind(&path).expect("stale socket file replaced");
    let conn = ZdsConn::connect(&path)
        .await
        .expect("connect to the new listener");
    let (accepted, started) = tokio::join!(third.accept(), ZtunnelSession::start(conn));
    started.expect("hello");
    AgentSession::accept(accepted.expect("accept"))
        .await
        .expect("hello received");

    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, "keep me").expect("write");
    let refused = ZdsListener::bind(&file);
    assert!(refused.is_err(), "a regular file must not be replaced");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");
}

#[tokio::test]
async fn connect_to_nothing_names_the_path() {
    let dir = TempDir::new();
    let path = dir.0.join("absent.sock");
    let err = ZdsConn::connect(&path).await.err().expect("must fail");
    let text = err.to_string();
    assert!(
        text.contains("absent.sock"),
        "error names the socket: {text}"
    );
}
