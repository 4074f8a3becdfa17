//! Request tracing: W3C `traceparent`/`tracestate` and B3 headers propagated (or started when
//! absent), Istio's `x-request-id` generated when absent, and one span per request exported
//! over OTLP/gRPC to the configured collector, sampled at the configured rate.
//!
//! Owns the trace headers and the request's span; the span ends with the request's
//! [`Record`] (its attributes are the record's facts), and export is `dataplane::spans`'s.
//! Does not decide anything about the request.
//!
//! Without a collector only `x-request-id` is added (as Istio always does); trace headers pass
//! untouched and nothing else is allocated. With one, the upstream request carries this hop's
//! span as its parent, in every format the request came with plus `traceparent` and B3 (multi
//! header) always, so a backend on either convention joins the trace. Sampling: a sampled
//! flag that arrived (`traceparent` flags, `x-b3-sampled`/`x-b3-flags`, `b3`) is honoured;
//! otherwise the request is sampled with the configured probability.

use std::time::Duration;

use dataplane::spans::{Attr, ExportSettings, Kind, Parent, SpanError, SpanExt, Spans, Status};
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use hyper::body::Incoming;

use crate::app::Ctx;
use crate::telemetry::Record;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
static B3: HeaderName = HeaderName::from_static("b3");
static B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
static B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
static B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Where spans go and how many requests get one.
#[derive(Clone, Debug)]
pub struct TraceSettings {
    /// The OTLP/gRPC collector, `host:port` or `http://host:port`.
    pub collector: String,
    /// Percent of requests sampled when the request does not say (0–100; Istio's default 1).
    pub sampling_percent: f64,
    /// How long finished spans wait to be sent in a batch.
    pub flush_every: Duration,
}

/// The waypoint's tracer: the exporter and the sampling rate.
#[derive(Debug)]
pub struct Tracing {
    spans: Spans,
    /// Probability in 0..=1.
    sampling: f64,
}

impl Tracing {
    /// Starts the exporter (needs a tokio runtime); `service` is the spans' `service.name`.
    pub fn start(settings: &TraceSettings, service: String) -> Result<Tracing, SpanError> {
        let spans = Spans::start(&ExportSettings {
            collector: settings.collector.clone(),
            service_name: service,
            flush_every: settings.flush_every,
        })?;
        Ok(Tracing {
            spans,
            sampling: (settings.sampling_percent / 100.0).clamp(0.0, 1.0),
        })
    }

    /// Sends what is queued and stops (blocks: call it off the async threads).
    pub fn shutdown(&self) {
        self.spans.shutdown();
    }
}

/// One request's trace context: this hop's ids and, when sampled, its span.
#[derive(Debug)]
pub struct Trace {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    sampled: bool,
    span: Option<dataplane::spans::Span>,
}

impl Trace {
    /// This hop's W3C `traceparent`.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            if self.sampled { "01" } else { "00" }
        )
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// Ends the span (if sampled) with the request's outcome as its attributes.
    pub(crate) fn end(self, r: &Record, status: u16, flags: &str) {
        let Some(mut span) = self.span else {
            return;
        };
        let crate::telemetry::Kind::Http {
            method,
            authority,
            path,
            protocol,
            ..
        } = &r.kind
        else {
            return;
        };
        let mut attrs = vec![
            Attr::new("component", "proxy"),
            Attr::new("http.method", method.clone()),
            Attr::new("http.url", format!("http://{authority}{path}")),
            Attr::new("http.protocol", *protocol),
            Attr::new("http.status_code", i64::from(status)),
            Attr::new("response_flags", flags.to_string()),
            Attr::new("upstream_cluster", r.upstream_cluster.clone()),
            Attr::new("upstream_address", r.upstream.clone()),
            Attr::new("peer.address", r.src_addr.clone()),
            Attr::new("peer.identity", r.src_principal.clone()),
            Attr::new("request_size", r.bytes_received() as i64),
            Attr::new("response_size", r.bytes_sent() as i64),
            Attr::new("route_name", r.route.clone()),
        ];
        if let Some(id) = r.request_id.as_ref().and_then(|v| v.to_str().ok()) {
            attrs.push(Attr::new("guid:x-request-id", id.to_string()));
        }
        span.set_attributes(attrs);
        if status >= 500 || status == 0 {
            span.set_status(Status::error(flags.to_string()));
        }
        span.end();
    }
}

/// What the request's headers said about its trace.
#[derive(Debug, Default, PartialEq, Eq)]
struct Caller {
    /// Trace id and span id of the caller's span.
    parent: Option<([u8; 16], [u8; 8])>,
    /// The caller's sampling decision, if it made one.
    sampled: Option<bool>,
    /// Whether the parent came from `traceparent` (then `tracestate` belongs to it).
    w3c: bool,
}

/// Starts (or continues) the request's trace: fixes its headers and notes the span in `record`.
pub fn on_request(ctx: &Ctx, req: &mut Request<Incoming>, record: &mut Record) {
    let headers = req.headers_mut();
    let id = request_id(headers);
    // Kept only for what reads it (a clone of a fresh value allocates).
    if ctx.tracing.is_some() || ctx.metrics.logs_access() {
        record.request_id = Some(id);
    }
    let Some(tracing) = &ctx.tracing else {
        return;
    };
    let incoming = extract(headers);
    let sampled = incoming
        .sampled
        .unwrap_or_else(|| rand::random::<f64>() < tracing.sampling);
    let (trace_id, span_id, span) = if sampled {
        let name = match &record.kind {
            crate::telemetry::Kind::Http {
                authority, path, ..
            } => format!("{authority}{path}"),
            crate::telemetry::Kind::Tcp { .. } => record.dst_service.clone(),
        };
        let parent = incoming.parent.map(|(trace_id, span_id)| Parent {
            trace_id,
            span_id,
            sampled: true,
        });
        let span =
            tracing
                .spans
                .start_span(name, Kind::Server, record.start_time(), parent, Vec::new());
        let ids = dataplane::spans::ids(&span);
        (ids.trace_id, ids.span_id, Some(span))
    } else {
        let trace_id = incoming
            .parent
            .map_or_else(rand::random::<[u8; 16]>, |p| p.0);
        (trace_id, rand::random::<[u8; 8]>(), None)
    };
    let trace = Trace {
        trace_id,
        span_id,
        sampled,
        span,
    };
    inject(headers, &trace, &incoming);
    record.trace = Some(trace);
}

/// The request's `x-request-id`, added (a UUID v4) when absent or empty.
fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID).filter(|v| !v.is_empty()) {
        return v.clone();
    }
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    let v = HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"));
    headers.insert(X_REQUEST_ID.clone(), v.clone());
    v
}

fn header<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name)?.to_str().ok().map(str::trim)
}

fn hex_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    (out != [0u8; N]).then_some(out)
}

/// A B3 trace id: 16 or 32 hex digits (a 64-bit id is the low half of a 128-bit one).
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    match s.len() {
        32 => hex_id::<16>(s),
        16 => {
            let low = hex_id::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

/// B3's sampling state: `1`/`true` sampled, `0`/`false` not, `d` (debug) sampled.
fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// W3C `traceparent` (`version-traceid-parentid-flags`; version `ff` is invalid, later
/// versions may append fields), else B3 multi-header, else B3 single (`b3`).
fn extract(h: &HeaderMap) -> Caller {
    if let Some(tp) = header(h, &TRACEPARENT) {
        let mut parts = tp.split('-');
        if let (Some(v), Some(t), Some(p), Some(f)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
            && v.len() == 2
            && v != "ff"
            && (v != "00" || parts.next().is_none())
            && t.len() == 32
            && p.len() == 16
            && f.len() == 2
            && f.bytes().all(|b| b.is_ascii_hexdigit())
            && let Ok(flags) = u8::from_str_radix(f, 16)
            && let (Some(t), Some(p)) = (hex_id::<16>(t), hex_id::<8>(p))
        {
            return Caller {
                parent: Some((t, p)),
                sampled: Some(flags & 1 == 1),
                w3c: true,
            };
        }
    }
    let b3_sampling = header(h, &B3_FLAGS)
        .filter(|f| *f == "1")
        .map(|_| true)
        .or_else(|| header(h, &B3_SAMPLED).and_then(b3_sampled));
    if let (Some(t), Some(s)) = (header(h, &B3_TRACE), header(h, &B3_SPAN))
        && let (Some(t), Some(s)) = (b3_trace_id(t), hex_id::<8>(s))
    {
        return Caller {
            parent: Some((t, s)),
            sampled: b3_sampling,
            w3c: false,
        };
    }
    if let Some(b3) = header(h, &B3) {
        let mut parts = b3.split('-');
        match (parts.next(), parts.next()) {
            (Some(t), Some(s)) => {
                if let (Some(t), Some(s)) = (b3_trace_id(t), hex_id::<8>(s)) {
                    return Caller {
                        parent: Some((t, s)),
                        sampled: parts.next().and_then(b3_sampled),
                        w3c: false,
                    };
                }
            }
            (Some(only), None) => {
                return Caller {
                    parent: None,
                    sampled: b3_sampled(only),
                    w3c: false,
                };
            }
            _ => {}
        }
    }
    Caller {
        parent: None,
        sampled: b3_sampling,
        w3c: false,
    }
}

fn set(h: &mut HeaderMap, name: &HeaderName, value: &[u8]) {
    if let Ok(v) = HeaderValue::from_bytes(value) {
        h.insert(name.clone(), v);
    }
}

/// Lowercase hex of `bytes` into `out` (twice as long), on the stack.
fn hex_into<'a>(bytes: &[u8], out: &'a mut [u8]) -> &'a [u8] {
    if hex::encode_to_slice(bytes, out).is_err() {
        return b"";
    }
    out
}

/// Writes this hop's context into the request for the upstream: `traceparent` and B3
/// multi-header always, `b3` when the caller used it; `tracestate` kept only with the W3C
/// parent it belongs to. Formatted on the stack: one allocation per header value.
fn inject(h: &mut HeaderMap, t: &Trace, incoming: &Caller) {
    let (mut trace_buf, mut span_buf) = ([0u8; 32], [0u8; 16]);
    let trace_id = hex_into(&t.trace_id, &mut trace_buf);
    let span_id = hex_into(&t.span_id, &mut span_buf);
    let sampled: &[u8] = if t.sampled { b"1" } else { b"0" };
    let mut tp = [0u8; 55];
    tp[..3].copy_from_slice(b"00-");
    tp[3..35].copy_from_slice(trace_id);
    tp[35] = b'-';
    tp[36..52].copy_from_slice(span_id);
    tp[52..].copy_from_slice(if t.sampled { b"-01" } else { b"-00" });
    set(h, &TRACEPARENT, &tp);
    if !incoming.w3c {
        h.remove(&TRACESTATE);
    }
    set(h, &B3_TRACE, trace_id);
    set(h, &B3_SPAN, span_id);
    h.insert(
        B3_SAMPLED.clone(),
        HeaderValue::from_static(if t.sampled { "1" } else { "0" }),
    );
    h.remove(&B3_FLAGS);
    let mut parent_buf = [0u8; 16];
    let parent = incoming.parent.map(|p| hex_into(&p.1, &mut parent_buf));
    match parent {
        Some(p) => set(h, &B3_PARENT, p),
        None => {
            h.remove(&B3_PARENT);
        }
    }
    if h.contains_key(&B3) {
        let mut single = Vec::with_capacity(68);
        for part in [trace_id, b"-", span_id, b"-", sampled] {
            single.extend_from_slice(part);
        }
        if let Some(p) = parent {
            single.push(b'-');
            single.extend_from_slice(p);
        }
        set(h, &B3, &single);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const S: &str = "00f067aa0ba902b7";

    #[test]
    fn traceparent_gives_parent_and_sampled_flag() {
        let got = extract(&headers(&[("traceparent", &format!("00-{T}-{S}-01"))]));
        assert_eq!(got.parent.map(|p| hex::encode(p.0)), Some(T.to_string()));
        assert_eq!(got.parent.map(|p| hex::encode(p.1)), Some(S.to_string()));
        assert_eq!(got.sampled, Some(true));
        let got = extract(&headers(&[("traceparent", &format!("00-{T}-{S}-00"))]));
        assert_eq!(got.sampled, Some(false));
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            format!("ff-{T}-{S}-01"),
            format!("00-{}-{S}-01", "0".repeat(32)),
            format!("00-{T}-{}-01", "0".repeat(16)),
            format!("00-{T}-{S}-01-extra"),
            format!("00-{T}-{S}-zz"),
            format!("00-{T}-{S}"),
            "garbage".to_string(),
        ] {
            let got = extract(&headers(&[("traceparent", &bad)]));
            assert_eq!(got, Caller::default(), "{bad}");
        }
        // A later version may append fields.
        let got = extract(&headers(&[("traceparent", &format!("01-{T}-{S}-01-more"))]));
        assert!(got.parent.is_some());
    }

    #[test]
    fn b3_multi_and_single() {
        let got = extract(&headers(&[
            ("x-b3-traceid", &T[16..]),
            ("x-b3-spanid", S),
            ("x-b3-sampled", "1"),
        ]));
        let mut want = [0u8; 16];
        want[8..].copy_from_slice(&hex::decode(&T[16..]).unwrap());
        assert_eq!(got.parent, Some((want, hex_id::<8>(S).unwrap())));
        assert_eq!(got.sampled, Some(true));
        let got = extract(&headers(&[("b3", &format!("{T}-{S}-0"))]));
        assert_eq!(got.sampled, Some(false));
        assert!(got.parent.is_some());
        let got = extract(&headers(&[("b3", "d")]));
        assert_eq!((got.parent, got.sampled), (None, Some(true)));
        let got = extract(&headers(&[("x-b3-traceid", T), ("x-b3-spanid", S)]));
        assert_eq!(got.sampled, None, "no decision: deferred to our rate");
    }

    #[test]
    fn injected_headers_name_this_hop_with_the_caller_as_parent() {
        let mut h = headers(&[
            ("b3", &format!("{T}-{S}-1")),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let incoming = extract(&h);
        let t = Trace {
            trace_id: incoming.parent.unwrap().0,
            span_id: [7; 8],
            sampled: true,
            span: None,
        };
        inject(&mut h, &t, &incoming);
        assert_eq!(
            h["traceparent"],
            format!("00-{T}-0707070707070707-01").as_str()
        );
        assert_eq!(h["x-b3-parentspanid"], S);
        assert_eq!(h["x-b3-spanid"], "0707070707070707");
        assert_eq!(h["b3"], format!("{T}-0707070707070707-1-{S}").as_str());
        assert!(
            h.get("tracestate").is_none(),
            "tracestate without its traceparent"
        );
    }

    #[test]
    fn request_id_is_kept_or_made() {
        let mut h = headers(&[("x-request-id", "abc")]);
        assert_eq!(request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = request_id(&mut h);
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4", "UUID version 4: {s}");
        assert_eq!(h["x-request-id"], id);
    }
}
