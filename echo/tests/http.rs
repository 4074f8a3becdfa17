//! HTTP tests against `echo serve --http-port`: echo-basic's JSON reply over HTTP/1.1 (raw
//! keep-alive socket) and HTTP/2 cleartext (curl), `X-Echo-Set-Header`, `/status/NNN`,
//! `/health`, streamed chunked uploads, the WebSocket echo (`mesh-echo ws`), and the line
//! protocol served beside HTTP by one process.

mod common;

use std::io::{BufRead, Write};
use std::process::Command;

use common::{Server, connect, new_reader, read_line, run_echo, stdout_lines};
use echo::{RequestAssertions, WhoReply};

const ENV: &[(&str, &str)] = &[
    ("POD_NAME", "echo-v1-abc"),
    ("POD_NAMESPACE", "ns-a"),
    ("SERVICE_NAME", "echo"),
];

fn start() -> Server {
    Server::start_mixed(0, 1, None, ENV)
}

struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> RequestAssertions {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "reply is not echo JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body.
fn read_response(r: &mut impl BufRead) -> RawResponse {
    let status_line = read_line(r);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let line = read_line(r);
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':').expect("header line");
        headers.push((n.to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().expect("content-length"))
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("read body");
    RawResponse {
        status,
        headers,
        body,
    }
}

#[test]
fn http1_keep_alive_replies_in_echo_basic_shape() {
    let server = start();
    let mut s = connect(&server.http_v4());
    let mut r = new_reader(&s);
    // Two requests on one connection: keep-alive must hold.
    for (i, path) in ["/first?a=1&b=2", "/second//x"].iter().enumerate() {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: echo.ns-a:80\r\nx-custom: one\r\nX-CUSTOM: two\r\nuser-agent: t\r\n\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        let resp = read_response(&mut r);
        assert_eq!(resp.status, 200, "request {i}");
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
        let text = String::from_utf8(resp.body.clone()).unwrap();
        // Go's json.MarshalIndent(v, "", " "): fields in struct order, one-space indent.
        assert!(text.starts_with("{\n \"path\": "), "{text}");
        let want = RequestAssertions {
            path: (*path).to_owned(),
            host: "echo.ns-a:80".into(),
            method: "GET".into(),
            proto: "HTTP/1.1".into(),
            headers: [
                ("User-Agent".to_owned(), vec!["t".to_owned()]),
                (
                    "X-Custom".to_owned(),
                    vec!["one".to_owned(), "two".to_owned()],
                ),
            ]
            .into(),
            http_port: server.http_ports[0].to_string(),
            namespace: "ns-a".into(),
            ingress: String::new(),
            service: "echo".into(),
            pod: "echo-v1-abc".into(),
            body_bytes: 0,
        };
        assert_eq!(resp.json(), want);
    }
}

#[test]
fn echo_set_header_status_and_health() {
    let server = start();
    let addr = server.http_v4();
    let mut s = connect(&addr);
    let mut r = new_reader(&s);
    let req = "GET / HTTP/1.1\r\nHost: h\r\nX-Echo-Set-Header: X-Foo: bar, X-Two:2\r\nX-Echo-Set-Header: X-Foo:baz\r\n\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let resp = read_response(&mut r);
    assert_eq!(resp.header("x-foo"), Some("bar,baz"));
    assert_eq!(resp.header("x-two"), Some("2"));

    for (path, code, body) in [
        ("/status/503", 503, ""),
        ("/status/204", 204, ""),
        ("/status/12", 400, ""),
        ("/health", 200, "OK"),
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let resp = read_response(&mut r);
        assert_eq!(resp.status, code, "{path}");
        assert_eq!(resp.body, body.as_bytes(), "{path}");
    }
}

#[test]
fn chunked_upload_is_counted() {
    let server = start();
    let mut s = connect(&server.http_v4());
    let mut r = new_reader(&s);
    s.write_all(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = vec![b'x'; 10_000];
    for _ in 0..30 {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .unwrap();
        s.write_all(&chunk).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let resp = read_response(&mut r);
    let reply = resp.json();
    assert_eq!(reply.body_bytes, 300_000);
    assert_eq!(reply.method, "POST");
    // Go moves Transfer-Encoding out of the header map; so do we.
    assert_eq!(reply.header("transfer-encoding"), None);
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "/dev/stderr"])
        .args(args)
        .output()
        .expect("run curl (install the curl package)");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn h2c_prior_knowledge_with_curl() {
    let server = start();
    let url = format!("http://{}/h2/path?q=1", server.http_v4());
    let (body, head) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "X-Echo-Set-Header: X-From-Echo:yes",
        "--data-binary",
        "12345",
        &url,
    ]);
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(head.contains("x-from-echo: yes"), "{head}");
    let reply: RequestAssertions = serde_json::from_str(&body).unwrap();
    assert_eq!(reply.proto, "HTTP/2.0");
    assert_eq!(reply.path, "/h2/path?q=1");
    assert_eq!(reply.host, server.http_v4());
    assert_eq!(reply.method, "POST");
    assert_eq!(reply.body_bytes, 5);
    assert_eq!(reply.pod, "echo-v1-abc");
    assert_eq!(reply.header("x-echo-set-header"), Some("X-From-Echo:yes"));
}

#[test]
fn websocket_echo_with_ws_client() {
    let server = start();
    let url = format!("ws://{}/ws", server.http_v4());
    let out = run_echo(&["ws", "--url", &url, "--message", "hi there", "--count", "3"]);
    assert!(
        out.status.success(),
        "ws failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_lines(&out), vec!["hi there"; 3]);
}

#[test]
fn ws_client_fails_against_a_non_websocket_server() {
    // The line protocol answers the upgrade request with an error line: no success, no output.
    let server = Server::start_mixed(1, 0, Some("p"), &[]);
    let url = format!("ws://{}/ws", server.v4());
    let out = run_echo(&["ws", "--url", &url, "--timeout", "2s"]);
    assert!(!out.status.success());
    assert!(stdout_lines(&out).is_empty());
}

#[test]
fn line_protocol_and_http_in_one_process() {
    let server = Server::start_mixed(1, 1, Some("both"), &[]);
    let mut s = connect(&server.v4());
    let mut r = new_reader(&s);
    s.write_all(b"WHO hi\n").unwrap();
    let who: WhoReply = serde_json::from_str(&read_line(&mut r)).unwrap();
    assert_eq!(who.served_by, "both");
    assert_eq!(who.message, "hi");

    let mut h = connect(&server.http_v4());
    let mut hr = new_reader(&h);
    h.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut hr).json().pod, "both");
}

#[test]
fn serve_without_any_port_is_a_usage_error() {
    let out = run_echo(&["serve"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn echo_advanced_flags_serve_http_grpc_and_tcp() {
    let (server, tls) = Server::start_advanced(&[("POD_NAME", "echo-v2-xyz")]);
    // --port: HTTP with echo-basic replies.
    let mut h = connect(&server.http_v4());
    let mut hr = new_reader(&h);
    h.write_all(b"GET /adv HTTP/1.1\r\nHost: echo\r\n\r\n")
        .unwrap();
    let reply = read_response(&mut hr).json();
    assert_eq!(
        (reply.pod.as_str(), reply.path.as_str()),
        ("echo-v2-xyz", "/adv")
    );
    // --grpc: the gRPC echo service.
    let grpc = format!("127.0.0.1:{}", server.http_ports[1]);
    let out = run_echo(&["grpc-call", "--addr", &grpc, "--method", "unary"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout_lines(&out)[0].contains("\"pod\":\"echo-v2-xyz\""));
    // --tcp: the line protocol.
    let mut t = connect(&server.v4());
    let mut tr = new_reader(&t);
    t.write_all(b"WHO x\n").unwrap();
    let who: WhoReply = serde_json::from_str(&read_line(&mut tr)).unwrap();
    assert_eq!(who.served_by, "echo-v2-xyz");
    // --tls: not served (no certificates), and said so.
    let log = server.log_text();
    assert!(log.contains("TLS ports are not served"), "{log}");
    assert!(log.contains(&tls.to_string()), "{log}");
}
