//! The text the Istio echo client (`client URL ...`, which the Gateway API mesh conformance
//! suite runs inside a client pod and parses with utils/echo/parse.go) prints for one
//! response: `[i] StatusCode=…`, `[i] ResponseHeader=Name:value`, then the server's fields as
//! `[i body] Key=value` lines (`Hostname=` is the serving pod, `RequestHeader=` what it
//! received). Responses are separated by a blank line. Pure formatting; no I/O.

use std::fmt::Write as _;

use crate::RequestAssertions;

/// One response as the echo client saw it.
pub struct ClientResponse<'a> {
    pub index: usize,
    pub url: &'a str,
    /// HTTP status (gRPC: 200 for OK, else the gRPC code, as Istio's client reports it).
    pub status: u16,
    /// Response headers in order (HTTP only).
    pub headers: &'a [(String, String)],
    /// The server's description of the request, when the body was mesh-echo's echo reply.
    pub echo: Option<&'a RequestAssertions>,
    /// The body otherwise (printed line by line).
    pub raw_body: &'a str,
}

pub fn format_response(r: &ClientResponse<'_>) -> String {
    let i = r.index;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "[{i}] Url={}", r.url);
    let _ = writeln!(out, "[{i}] StatusCode={}", r.status);
    for (name, value) in r.headers {
        let _ = writeln!(
            out,
            "[{i}] ResponseHeader={}:{value}",
            crate::canonical_header_key(name)
        );
    }
    match r.echo {
        Some(e) => {
            let mut field = |k: &str, v: &str| {
                let _ = writeln!(out, "[{i} body] {k}={v}");
            };
            field("ServicePort", &e.http_port);
            field("Host", &e.host);
            field("URL", &e.path);
            field("Method", &e.method);
            field("Proto", &e.proto);
            for (name, values) in &e.headers {
                for v in values {
                    field("RequestHeader", &format!("{name}:{v}"));
                }
            }
            field("Namespace", &e.namespace);
            field("Hostname", &e.pod);
        }
        None => {
            for line in r.raw_body.lines().filter(|l| !l.is_empty()) {
                let _ = writeln!(out, "[{i} body] {line}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_reply_lines_parse_like_conformance_regexes() {
        let echo = RequestAssertions {
            path: "/v1".into(),
            host: "echo".into(),
            method: "GET".into(),
            proto: "HTTP/1.1".into(),
            headers: [("X-A".to_owned(), vec!["1".to_owned()])].into(),
            http_port: "8080".into(),
            namespace: "ns".into(),
            ingress: String::new(),
            service: String::new(),
            pod: "echo-v1-0".into(),
            body_bytes: 0,
        };
        let headers = vec![("x-header-set".to_owned(), "v1".to_owned())];
        let text = format_response(&ClientResponse {
            index: 0,
            url: "http://echo/v1",
            status: 200,
            headers: &headers,
            echo: Some(&echo),
            raw_body: "",
        });
        let first = |key: &str| {
            text.lines()
                .find_map(|l| l.split_once(&format!("{key}=")).map(|(_, v)| v.to_owned()))
        };
        assert_eq!(first("StatusCode").as_deref(), Some("200"));
        assert_eq!(first("Hostname").as_deref(), Some("echo-v1-0"));
        assert_eq!(first("Host").as_deref(), Some("echo"));
        assert_eq!(first("RequestHeader").as_deref(), Some("X-A:1"));
        assert_eq!(first("ResponseHeader").as_deref(), Some("X-Header-Set:v1"));
    }
}
