//! ztunnel started in-process the way the binary starts it ([`app::build`] from a typed
//! [`Config`], then [`App::run`](ztunnel::app::App::run)) against an in-process meshd: it comes
//! up, turns ready once meshd's config is in, serves metrics, and stops cleanly on request,
//! closing its listeners.
//!
//! Owns the tests of [`ztunnel::app`]. nftables capture with no pods enrolled, so nothing on
//! the host is changed; listens on 127.0.0.1 only.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd::daemon::{self, RunConfig};
use meshd::settings::Listen;
use meshd::translate::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use ztunnel::app::{self, Exit};
use ztunnel::capture::{CaptureMode, EbpfLog};
use ztunnel::outbound::MissingWaypoint;
use ztunnel::settings::Config;

const DEADLINE: Duration = Duration::from_secs(15);
const NODE: &str = "node-0";

/// A port the kernel just handed out and released: free unless someone races us for it.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One HTTP/1.1 GET: the status code and body, or the connection error.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await?;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_in_process_turns_ready_serves_metrics_and_stops_cleanly() {
    app::prepare().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    std::fs::create_dir(&config_dir).unwrap();
    let state = dir.path().join("state");
    let sock = dir.path().join("meshd.sock");
    let (stop_meshd, meshd_stopped) = oneshot::channel::<()>();
    tokio::spawn(daemon::run(
        RunConfig {
            config_dir,
            state_dir: state.clone(),
            listen: Listen::Unix(sock.clone()),
            settings: Settings {
                trust_domain: "cluster.local".into(),
                cluster_domain: "cluster.local".into(),
            },
            root_namespace: "istio-system".into(),
            cert_lifetime: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(50),
        },
        async move {
            let _ = meshd_stopped.await;
        },
    ));
    let start = Instant::now();
    while tokio::net::UnixStream::connect(&sock).await.is_err() {
        assert!(
            start.elapsed() < DEADLINE,
            "meshd did not listen on {sock:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let token_file = dir.path().join("token");
    let token = meshd::state::node_authority(&state)
        .unwrap()
        .token(NODE, Duration::from_secs(600));
    std::fs::write(&token_file, token).unwrap();

    let (admin_addr, metrics_addr, ready_addr) = (free_addr(), free_addr(), free_addr());
    let config = Config {
        node: NODE.into(),
        meshd: format!("unix:{}", sock.display()),
        token_file: token_file.display().to_string(),
        meshd_ca: None,
        meshd_name: "meshd.cluster.local".into(),
        capture: CaptureMode::Nftables,
        fast_path: false,
        ebpf_log: EbpfLog::Off,
        ebpf_instance: None,
        unenroll_on_exit: true,
        drain_timeout: 5,
        root_namespace: "istio-system".into(),
        admin_addr,
        metrics_addr,
        ready_addr,
        log_format: "text".into(),
        mass_removal_hold: 10,
        missing_waypoint: MissingWaypoint::Bypass,
        kernel_tls: dataplane::record_encryption::KernelTlsSetting::Auto,
        trace_collector: None,
        trace_sampling: 100.0,
        enrollment: ztunnel::pods::EnrollmentSource::Config,
        zds_socket: dataplane::zds::DEFAULT_SOCKET.into(),
        trust_domain: "cluster.local".into(),
        max_connections: None,
        max_connections_per_source: None,
        worker_threads: None,
    };
    let app = app::build(config, Box::new(|_| Ok(()))).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));

    // Ready once the config snapshot from meshd is in (no pods: no certificates to wait for).
    let start = Instant::now();
    loop {
        match get(ready_addr, "/healthz/ready").await {
            Ok((200, _)) => break,
            other => assert!(
                start.elapsed() < DEADLINE,
                "ztunnel not ready on {ready_addr}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get(metrics_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("ztunnel_capture_mode{mode=\"nftables\"} 1"),
        "metrics without the capture mode:\n{body}"
    );

    stop.send(()).unwrap();
    let exit = tokio::time::timeout(DEADLINE, running)
        .await
        .expect("ztunnel stopped")
        .unwrap();
    assert_eq!(exit, Exit::Stopped);
    // Its listeners are closed: a next ztunnel can take the ports.
    assert!(get(ready_addr, "/healthz/ready").await.is_err());
    let _ = stop_meshd.send(());
}
