//! End-to-end tests of the `echo` client subcommands (`who`, `bench-rr`,
//! `bench-conn`, `bench-bulk`) against a spawned `echo serve`, including the
//! failure modes of `who` (refused, timeout, bad reply).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;

use common::{Server, free_port, run_echo, stdout_lines};
use echo::{BenchReport, BulkReport, ClientInfo, ConnReport, RrReport, WhoReply};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn who_prints_client_view_then_replies() {
    let server = Server::start();
    let addr = server.v4();
    let out = run_echo(&[
        "who",
        "--addr",
        &addr,
        "--message",
        "hi there",
        "--count",
        "3",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 4, "{lines:?}");
    let info: ClientInfo = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(info.client_peer, addr);
    for line in &lines[1..] {
        let reply: WhoReply = serde_json::from_str(line).unwrap();
        assert_eq!(reply.peer, info.client_local);
        assert_eq!(reply.local, addr);
        assert_eq!(reply.port, server.port());
        assert_eq!(reply.served_by, "test-pod");
        assert_eq!(reply.message, "hi there");
    }
}

#[test]
fn who_over_ipv6() {
    let server = Server::start();
    let addr = format!("[::1]:{}", server.port());
    let out = run_echo(&["who", "--addr", &addr]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let lines = stdout_lines(&out);
    let info: ClientInfo = serde_json::from_str(&lines[0]).unwrap();
    let reply: WhoReply = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(info.client_peer, addr);
    assert_eq!(reply.peer, info.client_local);
    assert_eq!(reply.message, "hello");
}

#[test]
fn who_fails_clearly_when_refused() {
    let port = free_port(); // nothing listens here
    let out = run_echo(&[
        "who",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--timeout",
        "2s",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("refused"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn who_times_out_when_server_is_silent() {
    // Kernel completes the handshake from the backlog; nobody ever replies.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = run_echo(&["who", "--addr", &addr, "--timeout", "300ms"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("timed out after 300ms"), "{err}");
    drop(silent);
}

/// One-shot fake server: accepts one connection, reads the request, sends
/// `reply`, then waits for the client to close. Returns its address.
fn fake_server(reply: &'static [u8]) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        if reply.is_empty() {
            return; // close without replying
        }
        let _ = s.write_all(reply);
        let _ = s.read_to_end(&mut Vec::new());
    });
    (addr, handle)
}

#[test]
fn who_rejects_bad_reply() {
    let (addr, handle) = fake_server(b"not json\n");
    let out = run_echo(&["who", "--addr", &addr]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bad reply"), "{}", stderr(&out));
    handle.join().unwrap();
}

#[test]
fn who_reports_server_error_reply() {
    let (addr, handle) = fake_server(b"{\"error\":\"go away\"}\n");
    let out = run_echo(&["who", "--addr", &addr]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("returned an error: go away"),
        "{}",
        stderr(&out)
    );
    handle.join().unwrap();
}

#[test]
fn who_reports_early_close() {
    let (addr, handle) = fake_server(b"");
    let out = run_echo(&["who", "--addr", &addr]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("closed the connection"),
        "{}",
        stderr(&out)
    );
    handle.join().unwrap();
}

#[test]
fn who_rejects_message_with_newline() {
    let server = Server::start();
    let out = run_echo(&["who", "--addr", &server.v4(), "--message", "a\nb"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("line breaks"), "{}", stderr(&out));
}

fn single_json_line(out: &std::process::Output) -> String {
    assert!(out.status.success(), "stderr: {}", stderr(out));
    let lines = stdout_lines(out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    lines[0].clone()
}

#[test]
fn bench_rr_reports_latency() {
    let server = Server::start();
    let out = run_echo(&[
        "bench-rr",
        "--addr",
        &server.v4(),
        "--size",
        "1024",
        "--duration",
        "300ms",
        "--warmup",
        "100ms",
    ]);
    let line = single_json_line(&out);
    let report: RrReport = serde_json::from_str(&line).unwrap();
    assert!(report.count > 0, "{line}");
    assert!(
        report.p50_us > 0.0 && report.p50_us <= report.p90_us && report.p90_us <= report.p99_us
    );
    assert!(matches!(
        serde_json::from_str(&line).unwrap(),
        BenchReport::Rr(_)
    ));
}

#[test]
fn bench_conn_reports_rate() {
    let server = Server::start();
    let out = run_echo(&[
        "bench-conn",
        "--addr",
        &server.v4(),
        "--duration",
        "300ms",
        "--concurrency",
        "4",
    ]);
    let line = single_json_line(&out);
    let report: ConnReport = serde_json::from_str(&line).unwrap();
    assert!(report.count > 0, "{line}");
    assert_eq!(report.errors, 0, "{line}");
    assert!(report.per_sec > 0.0 && report.p50_us <= report.p99_us);
    assert!(matches!(
        serde_json::from_str(&line).unwrap(),
        BenchReport::Conn(_)
    ));
}

#[test]
fn bench_conn_at_a_rate_starts_exactly_the_scheduled_connections() {
    let server = Server::start();
    // 200/s for 250 ms: starts at 0, 5, ..., 245 ms. Unpaced, loopback does thousands.
    let out = run_echo(&[
        "bench-conn",
        "--addr",
        &server.v4(),
        "--duration",
        "250ms",
        "--concurrency",
        "4",
        "--rate",
        "200",
    ]);
    let line = single_json_line(&out);
    let report: ConnReport = serde_json::from_str(&line).unwrap();
    assert_eq!(report.errors, 0, "{line}");
    assert_eq!(report.count, 50, "{line}");
}

#[test]
fn bench_bulk_reports_verified_bytes() {
    let server = Server::start();
    let out = run_echo(&[
        "bench-bulk",
        "--addr",
        &server.v4(),
        "--duration",
        "300ms",
        "--streams",
        "2",
    ]);
    let line = single_json_line(&out);
    let report: BulkReport = serde_json::from_str(&line).unwrap();
    assert!(report.bytes > 0, "{line}");
    assert_eq!(report.bytes % (64 * 1024), 0);
    assert_eq!(report.streams, 2);
    assert!(report.gbit_per_s > 0.0);
    assert!(matches!(
        serde_json::from_str(&line).unwrap(),
        BenchReport::Bulk(_)
    ));
}

#[test]
fn bench_fails_without_server() {
    let port = free_port();
    let out = run_echo(&[
        "bench-conn",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--duration",
        "300ms",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no successful exchange"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
}
