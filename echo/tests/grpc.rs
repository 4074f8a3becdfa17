//! gRPC tests: `mesh-echo grpc-call` (tonic) against `echo serve --http-port` (the hand-written
//! service): each method's replies, and that the requested grpc-status, grpc-message and custom
//! trailers arrive intact — after an OK unary reply and after a stream of replies.

mod common;

use common::{Server, run_echo, stdout_lines};
use serde_json::Value;

fn start() -> Server {
    Server::start_mixed(
        0,
        1,
        None,
        &[("POD_NAME", "grpc-pod"), ("POD_NAMESPACE", "ns-g")],
    )
}

/// Runs grpc-call; returns (exit success, reply lines, status lines).
fn call(server: &Server, args: &[&str]) -> (bool, Vec<Value>, Vec<Value>) {
    let addr = server.http_v4();
    let mut argv = vec!["grpc-call", "--addr", addr.as_str()];
    argv.extend_from_slice(args);
    let out = run_echo(&argv);
    let (mut replies, mut statuses) = (Vec::new(), Vec::new());
    for line in stdout_lines(&out) {
        let v: Value = serde_json::from_str(&line).expect("JSON line");
        if v.get("status").is_some() {
            statuses.push(v);
        } else {
            replies.push(v);
        }
    }
    if !out.status.success() {
        eprintln!("grpc-call stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), replies, statuses)
}

#[test]
fn unary_ok_with_custom_trailers_and_metadata() {
    let server = start();
    let (ok, replies, statuses) = call(
        &server,
        &[
            "--method",
            "unary",
            "--message",
            "m1",
            "--metadata",
            "x-req=abc",
            "--trailer",
            "x-trail=t1",
            "--trailer",
            "x-trail=t2",
            "--count",
            "2",
        ],
    );
    assert!(ok);
    assert_eq!(replies.len(), 2, "two unary calls, one reply each");
    assert_eq!(statuses.len(), 2);
    for r in &replies {
        assert_eq!(r["pod"], "grpc-pod");
        assert_eq!(r["namespace"], "ns-g");
        assert_eq!(r["message"], "m1");
        assert_eq!(r["method"], "/mesh.echo.v1.Echo/Unary");
        assert_eq!(r["authority"], server.http_v4());
        assert_eq!(r["metadata"]["x-req"], serde_json::json!(["abc"]));
    }
    for s in &statuses {
        assert_eq!(s["status"], 0);
        assert_eq!(s["trailers"]["x-trail"], serde_json::json!(["t1", "t2"]));
    }
}

#[test]
fn server_stream_then_error_status_with_trailers() {
    let server = start();
    let (ok, replies, statuses) = call(
        &server,
        &[
            "--method",
            "server-stream",
            "--count",
            "3",
            "--status",
            "5",
            "--status-message",
            "not here: é",
            "--trailer",
            "x-why=gone",
        ],
    );
    assert!(ok, "status 5 was asked for, so 5 is success");
    let idx: Vec<_> = replies
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 1, 2]);
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0]["status"], 5);
    assert_eq!(statuses[0]["code"], "NotFound");
    assert_eq!(statuses[0]["message"], "not here: é");
    assert_eq!(
        statuses[0]["trailers"]["x-why"],
        serde_json::json!(["gone"])
    );
}

#[test]
fn client_stream_counts_requests() {
    let server = start();
    let (ok, replies, statuses) = call(
        &server,
        &[
            "--method",
            "client-stream",
            "--count",
            "4",
            "--trailer",
            "x-n=4",
        ],
    );
    assert!(ok);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0]["received"], 4);
    assert_eq!(statuses[0]["status"], 0);
    assert_eq!(statuses[0]["trailers"]["x-n"], serde_json::json!(["4"]));
}

#[test]
fn bidi_replies_to_each_request() {
    // grpc-call sends each bidi request only after the previous reply: a server (or proxy)
    // that held replies until the client half-closed would stall the call until --timeout.
    let server = start();
    let (ok, replies, statuses) = call(
        &server,
        &[
            "--method",
            "bidi",
            "--count",
            "3",
            "--status",
            "9",
            "--trailer",
            "x-b=1",
            "--timeout",
            "5s",
        ],
    );
    assert!(ok, "bidi call stalled or failed: {statuses:?}");
    let seen: Vec<_> = replies
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["received"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [(0, 1), (1, 2), (2, 3)]);
    assert_eq!(statuses[0]["status"], 9);
    assert_eq!(statuses[0]["trailers"]["x-b"], serde_json::json!(["1"]));
}

#[test]
fn reserved_trailer_is_refused_and_client_exits_nonzero() {
    let server = start();
    // A grpc-* trailer would forge gRPC's own fields: the server ends INVALID_ARGUMENT, which
    // is not the OK the client asked for.
    let (ok, replies, statuses) = call(
        &server,
        &["--method", "unary", "--trailer", "grpc-status=0"],
    );
    assert!(!ok);
    assert_eq!(replies.len(), 1);
    assert_eq!(statuses[0]["status"], 3);
}
