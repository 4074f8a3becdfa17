//! Answers the waypoint makes itself (no route, no healthy upstream, overflow, timeouts,
//! RBAC/JWT refusals, redirects, direct responses, injected aborts), shaped as Envoy's local
//! replies: plain text for HTTP clients, a trailers-only gRPC status for gRPC clients.
//! Owns only the answer's shape and finishing its record; `pipeline` and `attempts` decide
//! when to answer.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::pipeline::ResponseBody;
use crate::telemetry::{Flag, Kind, Metrics, Record};

/// A response made here (not by an endpoint); the record is finished now, with the status
/// the client gets (200 for a gRPC client, as Envoy records its gRPC local replies).
pub(crate) fn local(
    metrics: &Metrics,
    grpc: bool,
    mut record: Record,
    status: StatusCode,
    headers: HeaderMap,
    text: &str,
) -> Response<ResponseBody> {
    let (status, headers, text) = local_answer(grpc, status, headers, text);
    if let Kind::Http { status: s, .. } = &mut record.kind {
        *s = status.as_u16();
    }
    record.finish(metrics);
    local_response(status, headers, text)
}

pub(crate) fn local_response(
    status: StatusCode,
    headers: HeaderMap,
    text: &str,
) -> Response<ResponseBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(text.to_string()))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// A local answer's status, headers and body as the client receives it. Plain HTTP: as given,
/// `text/plain` when there is text. A gRPC request: Envoy's trailers-only gRPC reply — HTTP
/// 200, `content-type: application/grpc`, `grpc-status` mapped from the HTTP status,
/// `grpc-message` the percent-encoded text, no body — unless it already is one (an injected
/// gRPC abort).
pub(crate) fn local_answer(
    grpc: bool,
    status: StatusCode,
    mut headers: HeaderMap,
    text: &str,
) -> (StatusCode, HeaderMap, &str) {
    if !grpc {
        if !text.is_empty() {
            headers.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
        }
        return (status, headers, text);
    }
    if headers.contains_key("grpc-status") {
        return (status, headers, "");
    }
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        "grpc-status",
        http::HeaderValue::from(grpc_status_of(status)),
    );
    if let Ok(v) = http::HeaderValue::from_str(&grpc_message(text))
        && !text.is_empty()
    {
        headers.insert("grpc-message", v);
    }
    (StatusCode::OK, headers, "")
}

/// Whether the request is gRPC: `content-type` `application/grpc`, `application/grpc+<codec>`
/// or with parameters (Envoy's test; gRPC-Web is not gRPC here).
pub(crate) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

/// Envoy's `httpToGrpcStatus` (gRPC's http-grpc-status-mapping.md).
fn grpc_status_of(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// `grpc-message` encoding (gRPC's PROTOCOL-HTTP2.md): bytes outside printable ASCII and `%`
/// as `%XX`.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) const OVERFLOW_TEXT: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// A connection-pool limit overflowed: Envoy's immediate 503 `UO` with `x-envoy-overloaded`.
pub(crate) fn overflow(
    metrics: &Metrics,
    grpc: bool,
    mut record: Record,
) -> Response<ResponseBody> {
    record.flag = Some(Flag::UpstreamOverflow);
    let mut h = HeaderMap::new();
    h.insert("x-envoy-overloaded", http::HeaderValue::from_static("true"));
    local(
        metrics,
        grpc,
        record,
        StatusCode::SERVICE_UNAVAILABLE,
        h,
        OVERFLOW_TEXT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_are_recognised_by_content_type() {
        let h = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            is_grpc(&h)
        };
        assert!(h("application/grpc") && h("application/grpc+proto") && h("application/grpc;x=1"));
        assert!(!h("application/grpc-web") && !h("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn local_answers_to_grpc_follow_envoys_mapping() {
        for (http, grpc) in [
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (502, 14),
        ] {
            assert_eq!(grpc_status_of(StatusCode::from_u16(http).unwrap()), grpc);
        }
        assert_eq!(grpc_status_of(StatusCode::IM_A_TEAPOT), 2);
        let (status, h, body) =
            local_answer(true, StatusCode::FORBIDDEN, HeaderMap::new(), "a%b\n");
        assert_eq!((status, body), (StatusCode::OK, ""));
        assert_eq!(
            (&h["grpc-status"], &h["grpc-message"]),
            (&"7".parse().unwrap(), &"a%25b%0A".parse().unwrap())
        );
        // Plain HTTP is answered as given.
        let (status, h, body) = local_answer(false, StatusCode::FORBIDDEN, HeaderMap::new(), "no");
        assert_eq!(
            (status, body, h.contains_key("grpc-status")),
            (StatusCode::FORBIDDEN, "no", false)
        );
    }
}
