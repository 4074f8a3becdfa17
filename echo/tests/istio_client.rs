//! `mesh-echo client`: the Istio echo client's CLI, whose output the Gateway API mesh
//! conformance suite parses (utils/echo/parse.go: unanchored `Key=(.*)` first matches, blank
//! lines between batch responses). Checked here the way that parser reads it.

mod common;

use common::{Server, run_echo};

/// parse.go's reading of one response: the first `Key=` value anywhere in the text.
fn field(section: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    section
        .lines()
        .find_map(|l| l.split_once(&pat).map(|(_, v)| v.to_owned()))
}

fn all(section: &str, key: &str) -> Vec<String> {
    let pat = format!("{key}=");
    section
        .lines()
        .filter_map(|l| l.split_once(&pat).map(|(_, v)| v.to_owned()))
        .collect()
}

fn client(args: &[&str]) -> (bool, String) {
    let out = run_echo(&[&["client"], args].concat());
    (
        out.status.success(),
        String::from_utf8(out.stdout).expect("utf8"),
    )
}

#[test]
fn http_batch_reports_status_pod_and_headers_both_ways() {
    let server = Server::start_mixed(0, 1, None, &[("POD_NAME", "echo-v1-7f9")]);
    let (ok, out) = client(&[
        "http://echo/v1?q=1",
        "--addr",
        &server.http_v4(),
        "--method=GET",
        "-H",
        "X-Req:abc",
        "-H",
        "X-Echo-Set-Header:X-Header-Set:v1",
        "--count=3",
    ]);
    assert!(ok, "{out}");
    let sections: Vec<&str> = out.split("\n\n").filter(|s| !s.trim().is_empty()).collect();
    assert_eq!(sections.len(), 3, "{out}");
    for s in sections {
        assert_eq!(field(s, "StatusCode").as_deref(), Some("200"), "{s}");
        assert_eq!(field(s, "Hostname").as_deref(), Some("echo-v1-7f9"), "{s}");
        assert_eq!(field(s, "Host").as_deref(), Some("echo"), "{s}");
        assert!(
            all(s, "RequestHeader").contains(&"X-Req:abc".to_owned()),
            "{s}"
        );
        assert!(
            all(s, "ResponseHeader").contains(&"X-Header-Set:v1".to_owned()),
            "{s}"
        );
    }
}

#[test]
fn http_status_and_h2c_and_host_override() {
    let server = Server::start_mixed(0, 1, None, &[("POD_NAME", "p")]);
    let url = format!("http://{}/status/503", server.http_v4());
    let (ok, out) = client(&[&url]);
    assert!(ok, "a 503 is a response, not a failure");
    assert_eq!(field(&out, "StatusCode").as_deref(), Some("503"));

    let url = format!("http://{}/x", server.http_v4());
    let (ok, out) = client(&[&url, "--http2", "-H", "Host:echo-v2:8080"]);
    assert!(ok, "{out}");
    assert_eq!(field(&out, "Proto").as_deref(), Some("HTTP/2.0"));
    assert_eq!(field(&out, "Host").as_deref(), Some("echo-v2:8080"));
}

#[test]
fn grpc_url_reports_ok_as_200_and_the_pod() {
    let server = Server::start_mixed(0, 1, None, &[("POD_NAME", "echo-v2-1")]);
    let url = format!("grpc://{}", server.http_v4());
    let (ok, out) = client(&[&url, "-H", "x-md:1", "--count=2"]);
    assert!(ok, "{out}");
    assert_eq!(all(&out, "Hostname"), ["echo-v2-1", "echo-v2-1"]);
    assert_eq!(field(&out, "StatusCode").as_deref(), Some("200"));
    assert!(all(&out, "RequestHeader").contains(&"X-Md:1".to_owned()));
}

#[test]
fn no_server_is_a_failure() {
    let port = common::free_port();
    let (ok, out) = client(&[&format!("http://127.0.0.1:{port}/"), "--timeout=2s"]);
    assert!(!ok);
    assert!(out.is_empty());
}
