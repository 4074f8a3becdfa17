//! meshd's API before a caller is trusted: who may connect to the unix socket, and what an
//! unauthenticated caller can cost meshd. Runs the real binary (its memory is measured) and,
//! for the socket, a client running as user `nobody` (so these tests need root).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_meshd");
const SUBSCRIBE: &str = "http://meshd/mesh.config.v1.ConfigService/Subscribe";

/// A `meshd run` on a unix socket in a temp dir; killed (and the dir removed) on drop.
struct Daemon {
    dir: tempfile::TempDir,
    sock: PathBuf,
    child: Child,
}

impl Daemon {
    async fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        // Traversable by anyone, so that only meshd's own checks stand between `nobody` and it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir(&config).unwrap();
        std::fs::write(config.join("ns.yaml"), NAMESPACES).unwrap();
        let sock = dir.path().join("meshd.sock");
        let child = Command::new(BIN)
            .arg("run")
            .arg("--config-dir")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stderr(std::fs::File::create(dir.path().join("meshd.log")).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon { dir, sock, child };
        let s = d.sock.clone();
        wait_for("meshd to listen", move || {
            let s = s.clone();
            async move { std::os::unix::net::UnixStream::connect(&s).is_ok() }
        })
        .await;
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("meshd.log")).unwrap_or_default()
    }

    /// meshd's resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gRPC Subscribe without credentials by curl, as `uid` (through setpriv when not root):
/// (curl's exit status, the response headers it printed).
fn curl_subscribe(sock: &Path, uid: u32) -> (std::process::ExitStatus, String) {
    let mut cmd = if uid == 0 {
        Command::new("curl")
    } else {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "curl",
        ]);
        c
    };
    let out = cmd
        .args([
            "-sS",
            "--max-time",
            "10",
            "--http2-prior-knowledge",
            "-X",
            "POST",
        ])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["--data-binary", "", "-D", "-", "-o", "/dev/null"])
        .arg("--unix-socket")
        .arg(sock)
        .arg(SUBSCRIBE)
        .stderr(Stdio::piped())
        .output()
        .expect("running curl");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

const NOBODY: u32 = 65534;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_root_may_talk_to_the_socket() {
    let meshd = Daemon::start().await;
    let mode = std::fs::metadata(&meshd.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is root's");

    // Root gets an answer (no token: UNAUTHENTICATED, which proves the request was served).
    let (status, headers) = curl_subscribe(&meshd.sock, 0);
    assert!(status.success(), "{status:?} {headers}");
    assert!(headers.contains("grpc-status: 16"), "{headers}");

    // As `nobody`, the file mode alone refuses the connect.
    let (status, headers) = curl_subscribe(&meshd.sock, NOBODY);
    assert!(
        !status.success() && !headers.contains("grpc-status"),
        "{status:?} {headers}"
    );

    // Opened up by mistake (or by an operator): meshd still closes a non-root peer unanswered.
    std::fs::set_permissions(&meshd.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (status, headers) = curl_subscribe(&meshd.sock, NOBODY);
    assert!(
        !status.success() && !headers.contains("grpc-status"),
        "nobody was answered: {status:?} {headers}"
    );
    let s = meshd.dir.path().join("meshd.log");
    wait_for("meshd to log the refusal", || {
        let s = s.clone();
        async move {
            std::fs::read_to_string(&s)
                .unwrap_or_default()
                .contains("only root may use it")
        }
    })
    .await;
    assert!(meshd.log().contains("uid=65534"), "{}", meshd.log());
    // Root still is served.
    let (status, headers) = curl_subscribe(&meshd.sock, 0);
    assert!(
        status.success() && headers.contains("grpc-status: 16"),
        "{headers}"
    );
}

/// The audit's probe (M5): 20 unauthenticated requests on one connection, each declaring a 4 MB
/// message and sending 3.9 MB of it. Each must be refused on its headers, before meshd buffers
/// its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_large_requests_are_refused_before_decoding() {
    let meshd = Daemon::start().await;
    let io = tokio::net::UnixStream::connect(&meshd.sock).await.unwrap();
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = || {
        http::Request::builder()
            .method("POST")
            .uri(SUBSCRIBE)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    };
    // One small request first, so that the baseline includes a served connection.
    let (resp, _body) = client
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request(), true)
        .unwrap();
    tokio::time::timeout(DEADLINE, resp)
        .await
        .expect("meshd answered")
        .unwrap();
    let before = meshd.rss_kib();

    let mut frame = vec![0u8; 5 + 3_900_000];
    frame[1..5].copy_from_slice(&4_000_000u32.to_be_bytes());
    let frame = Bytes::from(frame);
    let mut pending = Vec::new();
    for _ in 0..20 {
        let (resp, mut body) = client
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(request(), false)
            .unwrap();
        body.send_data(frame.clone(), false).unwrap();
        // Kept open: the request is never finished, as the audit's probe left it.
        pending.push((resp, body));
    }
    for (resp, _body) in pending.iter_mut() {
        let resp = tokio::time::timeout(DEADLINE, resp)
            .await
            .expect("an unauthenticated request must be answered before its body is read")
            .unwrap();
        let status = resp
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap());
        assert_eq!(status, Some("16"), "UNAUTHENTICATED: {resp:?}");
    }
    let after = meshd.rss_kib();
    assert!(
        after < before + 5 * 1024,
        "meshd grew from {before} KiB to {after} KiB"
    );
    eprintln!("meshd RSS: {before} KiB before, {after} KiB after 20 x 3.9 MB unauthenticated");
    drop(pending);
}

/// A connection that never carries a valid token is closed after a while (audit M5: time per
/// unauthenticated client is bounded); one that did stays, however long its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_closed_authenticated_ones_stay() {
    use meshcore::proto::config::SubscribeRequest;
    use meshcore::proto::config::config_service_client::ConfigServiceClient;
    let meshd = Daemon::start().await;

    // An authenticated config stream on its own connection.
    let token = meshd::state::node_authority(&meshd.dir.path().join("state"))
        .unwrap()
        .token("node-0", std::time::Duration::from_secs(600));
    let mut client = ConfigServiceClient::new(channel(&meshd.sock).await);
    let mut stream = client
        .subscribe(request(
            SubscribeRequest {
                node: "node-0".into(),
                ..Default::default()
            },
            Some(&token),
        ))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("snapshot");

    // A connection whose one request has no token, then idles.
    let io = tokio::net::UnixStream::connect(&meshd.sock).await.unwrap();
    let (h2, conn) = h2::client::handshake(io).await.unwrap();
    let closed = tokio::spawn(conn);
    let req = http::Request::builder()
        .method("POST")
        .uri(SUBSCRIBE)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (resp, _) = h2.ready().await.unwrap().send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(
        resp.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("16")
    );
    // meshd closes it (listener::UNAUTHENTICATED_CONN_TIMEOUT is 10 s; the bound is generous).
    tokio::time::timeout(std::time::Duration::from_secs(30), closed)
        .await
        .expect("meshd must close a connection that never authenticated")
        .unwrap()
        .ok();

    // The authenticated stream outlived it and still carries updates.
    std::fs::write(
        meshd.dir.path().join("config/pod.yaml"),
        pod("a", "node-0", "sa-a", "10.0.0.1", "a"),
    )
    .unwrap();
    let update = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("an update")
        .unwrap()
        .expect("the stream is open");
    assert_eq!(update.workloads.len(), 1, "{update:?}");
}
