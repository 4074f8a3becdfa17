//! The `meshd` binary itself: node-token output, start-up on a unix socket, SIGTERM shutdown.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_meshd");

#[test]
fn node_token_matches_the_state_secret() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = Command::new(BIN)
        .args(["node-token", "--node", "node-7", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let auth = meshd::state::node_authority(&state).unwrap();
    assert_eq!(
        auth.verify(Some(&format!("Bearer {}", printed.trim()))),
        Ok("node-7".to_string())
    );
}

#[test]
fn workload_token_matches_the_state_secret() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = Command::new(BIN)
        .args([
            "workload-token",
            "--namespace",
            "shop",
            "--service-account",
            "wp",
        ])
        .args(["--ttl", "1h", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.starts_with("sa:shop:wp:"), "{printed}");
    let auth = meshd::state::node_authority(&state).unwrap();
    assert_eq!(
        auth.verify_principal(Some(&format!("Bearer {}", printed.trim()))),
        Ok(meshcore::nodeauth::Principal::ServiceAccount(
            "shop".into(),
            "wp".into()
        ))
    );
    let bad = Command::new(BIN)
        .args([
            "workload-token",
            "--namespace",
            "a:b",
            "--service-account",
            "wp",
        ])
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no ':'"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("ns.yaml"), NAMESPACES).unwrap();
    std::fs::write(config.join("gw.yaml"), waypoint_gateway("wp", "")).unwrap();
    let out = dir.path().join("out");
    let sock = dir.path().join("meshd.sock");
    // A stale socket file from a previous run must not stop start-up.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut child = Command::new(BIN)
        .arg("run")
        .arg("--config-dir")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .args(["--cert-lifetime", "10m", "--log-format", "json"])
        .arg("--write-dir")
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed if the test fails before it stops meshd itself.
    let mut guard = KillOnDrop(Some(child.id()));
    let s = sock.clone();
    wait_for("meshd to listen", move || {
        let s = s.clone();
        async move { std::os::unix::net::UnixStream::connect(&s).is_ok() }
    })
    .await;
    let _channel = channel(&sock).await;
    // --write-dir: the waypoint's objects and status.
    let objects = out.join("objects/shop.wp.yaml");
    let status = out.join("status/Gateway.shop.wp.json");
    wait_for("the waypoint's objects and status", move || {
        let (o, s) = (objects.clone(), status.clone());
        async move { o.exists() && s.exists() }
    })
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut log = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        (status, log)
    });
    let (status, log) = tokio::time::timeout(DEADLINE, exit)
        .await
        .expect("meshd did not exit")
        .unwrap();
    guard.0 = None;
    assert!(status.success(), "{log}");
    assert!(log.contains("meshd ready on unix:"), "{log}");
    assert!(!sock.exists(), "socket removed on shutdown");
}

/// SIGKILLs a child process by id when dropped, unless disarmed (its id taken out).
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) on a pid this test spawned and has not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
