//! Failing on demand, with curl against `echo serve --http-port`: the pod-wide behaviour set by
//! `POST /control` (fail with a status, heal) and by `serve` flags (every N-th request), the
//! per-request `x-echo-fail` / `echo-delay` overrides (status, TCP reset, HTTP/2 stream reset,
//! stall, delay), bad control bodies answered 400 naming the field, and `--file` (a JWKS).

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::Server;

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl (install the curl package)")
}

/// The status code of one request (`-w %{http_code}`).
fn status(url: &str, extra: &[&str]) -> u16 {
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    args.extend(extra);
    args.push(url);
    let out = curl(&args);
    assert!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .parse()
        .expect("status")
}

fn control(s: &Server, body: &str) -> (u16, String) {
    let url = format!("http://{}/control", s.http_v4());
    let out = curl(&["-w", "\n%{http_code}", "-X", "POST", "-d", body, &url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.parse().expect("status"), body.to_owned())
}

fn report(s: &Server) -> serde_json::Value {
    let out = curl(&[&format!("http://{}/control", s.http_v4())]);
    serde_json::from_slice(&out.stdout).expect("control JSON")
}

#[test]
fn control_makes_the_pod_fail_then_heal() {
    let s = Server::start_http_with(&[]);
    let url = format!("http://{}/anything", s.http_v4());
    assert_eq!(status(&url, &[]), 200);
    let (code, body) = control(&s, r#"{"fail": 503}"#);
    assert_eq!(code, 200, "{body}");
    for _ in 0..3 {
        assert_eq!(status(&url, &[]), 503);
    }
    // Health checks and the control endpoint keep answering while the pod fails.
    assert_eq!(status(&format!("http://{}/health", s.http_v4()), &[]), 200);
    let r = report(&s);
    assert_eq!(r["fail"], 503);
    assert_eq!(r["requests"], 4, "{r}");
    let (code, _) = control(&s, r#"{"fail": "ok"}"#);
    assert_eq!(code, 200);
    let out = curl(&[&url]);
    let reply: echo::RequestAssertions =
        serde_json::from_slice(&out.stdout).expect("healed pod answers echo JSON");
    assert_eq!(reply.pod, "test-pod");
}

#[test]
fn serve_flags_fail_every_nth_request() {
    let s = Server::start_http_with(&["--fail", "500", "--fail-every", "2"]);
    let url = format!("http://{}/", s.http_v4());
    let codes: Vec<u16> = (0..6).map(|_| status(&url, &[])).collect();
    assert_eq!(codes, [200, 500, 200, 500, 200, 500]);
}

#[test]
fn per_request_status_reset_and_stall() {
    let s = Server::start_http_with(&[]);
    let base = format!("http://{}", s.http_v4());
    assert_eq!(status(&format!("{base}/?echo-fail=502"), &[]), 502);
    assert_eq!(
        status(&format!("{base}/"), &["-H", "x-echo-fail: 504"]),
        504
    );

    let reset = curl(&["-H", "x-echo-fail: reset", &format!("{base}/")]);
    let err = String::from_utf8_lossy(&reset.stderr);
    assert!(
        !reset.status.success() && err.contains("reset by peer"),
        "HTTP/1 reset must be a TCP RST: {err}"
    );
    let h2 = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "x-echo-fail: reset",
        &format!("{base}/"),
    ]);
    assert!(
        !h2.status.success(),
        "HTTP/2 reset must fail the stream: {}",
        String::from_utf8_lossy(&h2.stdout)
    );

    // A stalled request never answers; the client's own limit ends it.
    let stall = curl(&[
        "--max-time",
        "1",
        "-H",
        "x-echo-fail: stall",
        &format!("{base}/"),
    ]);
    assert_eq!(stall.status.code(), Some(28), "curl must time out (28)");
    // The server still serves others.
    assert_eq!(status(&format!("{base}/"), &[]), 200);
}

#[test]
fn delays_hold_the_answer_at_least_that_long() {
    let s = Server::start_http_with(&["--delay", "200ms"]);
    let base = format!("http://{}", s.http_v4());
    let t = Instant::now();
    assert_eq!(status(&format!("{base}/"), &[]), 200);
    assert!(t.elapsed() >= Duration::from_millis(200));
    let t = Instant::now();
    assert_eq!(status(&format!("{base}/?echo-delay=600ms"), &[]), 200);
    assert!(t.elapsed() >= Duration::from_millis(600));
    // A per-request delay that outlasts the client's limit.
    let out = curl(&[
        "--max-time",
        "1",
        "-H",
        "x-echo-delay: 5s",
        &format!("{base}/"),
    ]);
    assert_eq!(out.status.code(), Some(28));
}

#[test]
fn bad_control_bodies_and_overrides_are_400_naming_the_problem() {
    let s = Server::start_http_with(&[]);
    let (code, body) = control(&s, r#"{"fial": 503}"#);
    assert_eq!(code, 400);
    assert!(body.contains("fial"), "{body}");
    let (code, body) = control(&s, r#"{"fail": "explode"}"#);
    assert_eq!(code, 400);
    assert!(body.contains("explode"), "{body}");
    // The refused bodies changed nothing.
    assert_eq!(report(&s)["fail"], "ok");
    let url = format!("http://{}/?echo-delay=soon", s.http_v4());
    assert_eq!(status(&url, &[]), 400);
}

#[test]
fn file_routes_serve_a_jwks() {
    let dir = std::env::temp_dir().join(format!("echo-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).expect("write jwks");
    let route = format!("/.well-known/jwks.json={}", jwks.display());
    let s = Server::start_http_with(&["--file", &route]);
    let out = curl(&[
        "-D",
        "/dev/stderr",
        &format!("http://{}/.well-known/jwks.json", s.http_v4()),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(String::from_utf8_lossy(&out.stdout), r#"{"keys":[]}"#);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_ascii_lowercase()
            .contains("content-type: application/json")
    );
}
