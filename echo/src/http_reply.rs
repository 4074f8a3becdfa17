//! The HTTP echo reply: the JSON body the Gateway API conformance echo server (echo-basic)
//! answers every request with, plus the pure rules it applies to requests (header-name
//! canonicalization, `X-Echo-Set-Header`, `/status/NNN`). No I/O here: the server in the
//! binary (`http_serve`) fills these in; tests and other crates deserialize them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What echo-basic reports about a request (`RequestAssertions` in echo-basic.go), same field
/// names and meaning, plus `bodyBytes` (how many request-body bytes the server read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestAssertions {
    /// The request target as sent: path and query (absolute-form target kept whole on HTTP/1).
    pub path: String,
    /// Host header, or `:authority` on HTTP/2.
    pub host: String,
    pub method: String,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2.0` (Go's `r.Proto`).
    pub proto: String,
    /// Request headers by canonical name (Go style: `X-Foo-Bar`), values in arrival order;
    /// `Host` is not among them (it is `host`).
    pub headers: BTreeMap<String, Vec<String>>,
    /// The port the request arrived on (echo-basic reports its own HTTP port).
    #[serde(rename = "httpPort")]
    pub http_port: String,
    /// `$POD_NAMESPACE` (or `$NAMESPACE`).
    pub namespace: String,
    /// `$INGRESS_NAME`.
    pub ingress: String,
    /// `$SERVICE_NAME`.
    pub service: String,
    /// `$POD_NAME` (or `serve --name`).
    pub pod: String,
    /// Request-body bytes read (bodies are streamed and counted, never buffered whole).
    #[serde(rename = "bodyBytes", default)]
    pub body_bytes: u64,
}

impl RequestAssertions {
    /// First value of header `name` (any case), as echo-basic clients read it.
    pub fn header(&self, name: &str) -> Option<&str> {
        let key = canonical_header_key(name);
        self.headers
            .get(&key)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// echo-basic's JSON encoding (Go `json.MarshalIndent(v, "", " ")`).
    pub fn to_json_pretty(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b" ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        // Serializing plain strings and maps into a Vec cannot fail.
        if self.serialize(&mut ser).is_err() {
            out.clear();
        }
        out
    }
}

/// Go's `textproto.CanonicalMIMEHeaderKey`: `x-foo-bar` -> `X-Foo-Bar`; names with bytes that
/// are not token characters are returned unchanged, as Go does.
pub fn canonical_header_key(name: &str) -> String {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(token) {
        return name.to_owned();
    }
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

/// The response headers asked for by `X-Echo-Set-Header` values (each `name:value[,name:value]`),
/// in order; a name asked for twice gets its values joined with `,` as echo-basic does.
pub fn echo_set_headers<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for list in values {
        for kv in list.split(',') {
            let (name, value) = kv.trim().split_once(':').unwrap_or((kv.trim(), ""));
            let value = value.trim();
            match out.iter_mut().find(|(n, _)| n == name) {
                Some((_, existing)) => {
                    existing.push(',');
                    existing.push_str(value);
                }
                None => out.push((name.to_owned(), value.to_owned())),
            }
        }
    }
    out
}

/// echo-basic's `/status/` handler: `/status/NNN` (exactly three digits, nothing after) answers
/// NNN; anything else under `/status/` answers 400.
pub fn status_for_path(request_uri: &str) -> u16 {
    let Some(code) = request_uri.strip_prefix("/status/") else {
        return 400;
    };
    if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) {
        code.parse().unwrap_or(400)
    } else {
        400
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_keys_match_go() {
        assert_eq!(
            canonical_header_key("x-echo-set-header"),
            "X-Echo-Set-Header"
        );
        assert_eq!(canonical_header_key("USER-AGENT"), "User-Agent");
        assert_eq!(canonical_header_key("te"), "Te");
        assert_eq!(canonical_header_key("a b"), "a b");
    }

    #[test]
    fn echo_set_header_splits_and_joins() {
        let got = echo_set_headers(["X-A: 1, X-B:two", "X-A:3"]);
        assert_eq!(
            got,
            vec![
                ("X-A".to_owned(), "1,3".to_owned()),
                ("X-B".to_owned(), "two".to_owned())
            ]
        );
    }

    #[test]
    fn status_paths() {
        assert_eq!(status_for_path("/status/503"), 503);
        assert_eq!(status_for_path("/status/50"), 400);
        assert_eq!(status_for_path("/status/503?x=1"), 400);
    }

    #[test]
    fn json_uses_go_field_names_and_one_space_indent() {
        let a = RequestAssertions {
            path: "/p".into(),
            host: "h".into(),
            method: "GET".into(),
            proto: "HTTP/1.1".into(),
            headers: BTreeMap::from([("Accept".into(), vec!["*/*".into()])]),
            http_port: "80".into(),
            namespace: "ns".into(),
            ingress: String::new(),
            service: String::new(),
            pod: "p".into(),
            body_bytes: 0,
        };
        let text = String::from_utf8(a.to_json_pretty()).unwrap();
        assert!(text.starts_with("{\n \"path\": \"/p\""), "{text}");
        assert!(text.contains("\"httpPort\": \"80\""), "{text}");
        let back: RequestAssertions = serde_json::from_str(&text).unwrap();
        assert_eq!(back, a);
    }
}
