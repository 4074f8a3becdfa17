//! The waypoint's L7 telemetry as a user sees it (see `common` for the harness): Istio's
//! request metrics read back with the official Prometheus parser, the JSON access log, trace
//! headers and `x-request-id` as the backend receives them, and spans as an independent OTLP
//! collector (Python, opentelemetry-proto over gRPC) receives them.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use serde_json::{Value, json};
use waypoint::config::{AccessLog, TraceSettings};

/// `web` answers under `/app`, `/headers` and `/echo`; anything else has no route (404 `NR`).
fn routes() -> Route<'static> {
    (
        "VirtualService",
        "web",
        json!({"hosts": ["web"], "http": [
            {"match": [{"uri": {"prefix": "/app"}}, {"uri": {"prefix": "/headers"}},
                       {"uri": {"exact": "/echo"}}],
             "route": [{"destination": {"host": "web"}}]},
        ]}),
    )
}

/// A file in the temp dir, removed when dropped (also when the test fails).
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        let r: u64 = rand::random();
        TempFile(std::env::temp_dir().join(format!("waypoint-{name}-{r:016x}")))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The samples named `name` whose labels include every pair of `want`.
fn matching<'a>(samples: &'a [Value], name: &str, want: &[(&str, &str)]) -> Vec<&'a Value> {
    samples
        .iter()
        .filter(|s| s["name"] == name && want.iter().all(|(k, v)| s["labels"][*k] == *v))
        .collect()
}

fn total(samples: &[Value], name: &str, want: &[(&str, &str)]) -> f64 {
    matching(samples, name, want)
        .iter()
        .filter_map(|s| s["value"].as_f64())
        .sum()
}

const WEB: &str = "web.app.svc.cluster.local";

#[tokio::test]
async fn request_metrics_count_each_request_by_code_flag_and_bytes() {
    let m = mesh_of(&[("backend-0", &[])], &[routes()], |_| {}).await;
    let mut web = m.http1(&format!("{WEB_VIP}:80")).await;
    let mut ok_bytes = 0;
    for path in ["/app/a", "/app/bb", "/app/ccc"] {
        let resp = send1(&mut web, get(path, "web")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        ok_bytes += body_text(resp).await.len();
    }
    for path in ["/nope", "/other"] {
        let resp = send1(&mut web, get(path, "web")).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        body_text(resp).await;
    }
    let body = "x".repeat(1000);
    let resp = send1(
        &mut web,
        Request::post("/echo")
            .header("host", "web")
            .body(full(&body))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, body);
    let mut empty = m.http1(&format!("{EMPTY_VIP}:80")).await;
    let resp = send1(&mut empty, get("/", "empty")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    body_text(resp).await;

    let samples = prom_samples(&m.metrics().await);
    let web_ok = [
        ("destination_service", WEB),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("reporter", "waypoint"),
    ];
    let requests = "istio_requests_total";
    assert_eq!(total(&samples, requests, &web_ok), 4.0, "200s to web");
    assert_eq!(
        total(
            &samples,
            requests,
            &[
                ("destination_service", WEB),
                ("response_code", "404"),
                ("response_flags", "NR")
            ]
        ),
        2.0,
        "no-route 404s"
    );
    assert_eq!(
        total(
            &samples,
            requests,
            &[
                ("destination_service", "empty.app.svc.cluster.local"),
                ("response_code", "503"),
                ("response_flags", "UH")
            ]
        ),
        1.0,
        "no healthy upstream"
    );
    assert_eq!(total(&samples, requests, &[]), 7.0, "every request, once");
    // The client's identity and the destination pod's workload are labels; the rest unknown.
    let series = matching(&samples, requests, &web_ok);
    let labels = &series[0]["labels"];
    assert_eq!(labels["source_principal"], client_id().to_string());
    assert_eq!(labels["destination_workload"], "backend-0");
    assert_eq!(labels["source_workload"], "unknown");
    // Histograms: one observation per request; Istio's buckets; body bytes both ways.
    let dur = "istio_request_duration_milliseconds";
    assert_eq!(total(&samples, &format!("{dur}_count"), &web_ok), 4.0);
    assert_eq!(total(&samples, &format!("{dur}_count"), &[]), 7.0);
    let mut les: Vec<f64> = matching(&samples, &format!("{dur}_bucket"), &web_ok)
        .iter()
        .filter_map(|s| s["labels"]["le"].as_str()?.parse().ok())
        .filter(|le: &f64| le.is_finite())
        .collect();
    les.sort_by(f64::total_cmp);
    assert_eq!(
        les,
        [
            0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0
        ]
    );
    assert_eq!(
        total(&samples, "istio_request_bytes_sum", &web_ok),
        1000.0,
        "request body bytes"
    );
    assert_eq!(total(&samples, "istio_request_bytes_count", &web_ok), 4.0);
    assert_eq!(
        total(&samples, "istio_response_bytes_sum", &web_ok),
        (ok_bytes + 1000) as f64,
        "response body bytes"
    );
    assert_eq!(
        total(
            &samples,
            "istio_request_bytes_bucket",
            &[
                ("destination_service", WEB),
                ("response_code", "200"),
                ("le", "1000.0")
            ]
        ),
        4.0,
        "Istio's size buckets (1, 10, … 1e7): the 1000-byte body is in le=1000"
    );
    // The pod leaves the config: its series go (bounded cardinality under churn); the
    // series of a service that is still there, with no workload, stays.
    m.config
        .send_replace(Some(std::sync::Arc::new(store(&[], &[routes()]))));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let samples = loop {
        let samples = prom_samples(&m.metrics().await);
        if total(&samples, requests, &[("destination_workload", "backend-0")]) == 0.0 {
            break samples;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend-0's request series outlived it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        matching(
            &samples,
            "istio_response_bytes_sum",
            &[("destination_workload", "backend-0")]
        )
        .is_empty()
    );
    let empty_svc = [("destination_service", "empty.app.svc.cluster.local")];
    assert_eq!(total(&samples, requests, &empty_svc), 1.0);
    // Then the service goes too: its series follow.
    m.config.send_modify(|current| {
        let mut next = current.as_deref().cloned().unwrap_or_default();
        next.apply(meshcore::proto::config::ConfigUpdate {
            version: next.version + 1,
            removed_services: vec!["app/empty".into()],
            ..Default::default()
        });
        *current = Some(std::sync::Arc::new(next));
    });
    loop {
        let samples = prom_samples(&m.metrics().await);
        if matching(&samples, requests, &empty_svc).is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the removed service's request series stayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a waypoint that traces every request to `otlp` and logs access to `log`.
async fn traced_mesh(otlp: &OtlpReceiver, log: &TempFile, sampling: f64) -> Mesh {
    let collector = otlp.addr.to_string();
    let path = log.0.clone();
    mesh_of(&[("backend-0", &[])], &[routes()], move |c| {
        c.tracing = Some(TraceSettings {
            collector,
            sampling_percent: sampling,
            flush_every: Duration::from_millis(50),
        });
        c.access_log = AccessLog::File(path);
    })
    .await
}

/// Sends `GET /headers` with `headers`; returns what the backend received.
async fn backend_headers(
    c: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    headers: &[(&str, &str)],
) -> Value {
    let mut req = get("/headers?q=1", "web");
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let resp = send1(c, req).await;
    assert_eq!(resp.status(), StatusCode::OK, "no route for /headers?");
    serde_json::from_str(&body_text(resp).await).expect("the backend's headers")
}

/// `00-<trace>-<span>-<flags>` → (trace, span, flags).
fn traceparent(v: &Value) -> (String, String, String) {
    let s = v["traceparent"]
        .as_str()
        .expect("traceparent reached the backend");
    let p: Vec<&str> = s.split('-').collect();
    assert_eq!(p.len(), 4, "{s}");
    assert_eq!(p[0], "00", "{s}");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const S: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn one_span_per_request_continues_the_callers_trace_and_reaches_the_backend() {
    let otlp = OtlpReceiver::start().await;
    let log = TempFile::new("access.log");
    let m = traced_mesh(&otlp, &log, 100.0).await;
    let mut c = m.http1(&format!("{WEB_VIP}:80")).await;

    // 1. W3C parent, sampled: our span is its child; the backend's parent is our span.
    let seen = backend_headers(
        &mut c,
        &[
            ("traceparent", &format!("00-{T}-{S}-01")),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("x-request-id", "req-w3c"),
        ],
    )
    .await;
    let (trace, w3c_span, flags) = traceparent(&seen);
    assert_eq!((trace.as_str(), flags.as_str()), (T, "01"));
    assert_ne!(w3c_span, S, "the upstream's parent is the waypoint's span");
    assert_eq!(seen["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(
        seen["x-request-id"], "req-w3c",
        "an existing request id is kept"
    );
    assert_eq!(seen["x-b3-traceid"], T);
    assert_eq!(seen["x-b3-spanid"], w3c_span.as_str());
    assert_eq!(seen["x-b3-parentspanid"], S);

    // 2. No trace headers: a new trace; a request id (UUID v4) is made.
    let seen = backend_headers(&mut c, &[]).await;
    let (new_trace, new_span, flags) = traceparent(&seen);
    assert_eq!(flags, "01", "sampling 100%");
    assert_ne!(new_trace, T);
    let id = seen["x-request-id"].as_str().expect("x-request-id made");
    let uuid: Vec<&str> = id.split('-').collect();
    assert_eq!(
        uuid.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12],
        "{id}"
    );
    assert!(uuid[2].starts_with('4'), "UUID v4: {id}");

    // 3. B3 multi-header parent with a 64-bit trace id.
    let seen = backend_headers(
        &mut c,
        &[
            ("x-b3-traceid", &T[16..]),
            ("x-b3-spanid", S),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let (b3_trace, b3_span, _) = traceparent(&seen);
    assert_eq!(b3_trace, format!("{}{}", "0".repeat(16), &T[16..]));
    assert_eq!(seen["x-b3-parentspanid"], S);

    // 4. The caller said "not sampled": honoured (no span), the trace still propagates.
    let unsampled = "11111111111111111111111111111111";
    let seen = backend_headers(
        &mut c,
        &[("traceparent", &format!("00-{unsampled}-{S}-00"))],
    )
    .await;
    let (t, _, flags) = traceparent(&seen);
    assert_eq!((t.as_str(), flags.as_str()), (unsampled, "00"));
    assert_eq!(seen["x-b3-sampled"], "0");

    // 5. A marker, last: once its span is in, every earlier one is (one exporter, in order).
    let marker = "22222222222222222222222222222222";
    backend_headers(&mut c, &[("traceparent", &format!("00-{marker}-{S}-01"))]).await;
    let spans = otlp
        .wait_for("for the marker request", |s| s["trace_id"] == marker)
        .await;
    assert_eq!(spans.len(), 4, "one span per sampled request: {spans:#?}");
    let by_trace = |t: &str| {
        spans
            .iter()
            .find(|s| s["trace_id"] == t)
            .unwrap_or_else(|| panic!("no span of trace {t}: {spans:#?}"))
    };
    let w3c = by_trace(T);
    assert_eq!(w3c["span_id"], w3c_span.as_str());
    assert_eq!(w3c["parent_span_id"], S);
    assert_eq!(w3c["service"], "wp.app");
    assert_eq!(w3c["kind"], 2, "SPAN_KIND_SERVER");
    let a = &w3c["attributes"];
    assert_eq!(a["http.method"], "GET");
    assert_eq!(a["http.status_code"], 200);
    assert_eq!(a["http.url"], "http://web/headers");
    assert_eq!(a["upstream_cluster"], format!("outbound|80||{WEB}"));
    assert_eq!(a["response_flags"], "-");
    assert_eq!(a["guid:x-request-id"], "req-w3c");
    assert_eq!(a["peer.identity"], client_id().to_string());
    assert_eq!(w3c["name"], "web/headers");

    let fresh = by_trace(&new_trace);
    assert_eq!(fresh["span_id"], new_span.as_str());
    assert_eq!(fresh["parent_span_id"], "", "a new trace's root span");
    assert_eq!(fresh["attributes"]["guid:x-request-id"], id);

    let b3 = by_trace(&b3_trace);
    assert_eq!(b3["span_id"], b3_span.as_str());
    assert_eq!(b3["parent_span_id"], S);
    assert!(
        spans.iter().all(|s| s["trace_id"] != unsampled),
        "an unsampled request has no span"
    );

    // The access log: one JSON line per request, with the same ids.
    let text = std::fs::read_to_string(&log.0).expect("access log written");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 5, "{text}");
    let first = &lines[0];
    for (k, v) in [
        ("method", json!("GET")),
        ("path", json!("/headers")),
        ("protocol", json!("HTTP/1.1")),
        ("response_code", json!(200)),
        ("response_flags", json!("-")),
        ("x_request_id", json!("req-w3c")),
        ("authority", json!("web")),
        ("trace_id", json!(T)),
        ("upstream_cluster", json!(format!("outbound|80||{WEB}"))),
        ("downstream_peer_principal", json!(client_id().to_string())),
    ] {
        assert_eq!(first[k], v, "{k} in {first}");
    }
    assert_eq!(first["bytes_sent"].as_u64().map(|n| n > 0), Some(true));
    assert!(
        first["upstream_host"]
            .as_str()
            .is_some_and(|h| h.starts_with(&format!("{}:", m.backend_ip))),
        "{first}"
    );
    assert!(
        first["start_time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(lines[1]["x_request_id"], id);
}

#[tokio::test]
async fn sampling_zero_makes_no_spans_unless_the_caller_sampled() {
    let otlp = OtlpReceiver::start().await;
    let log = TempFile::new("access0.log");
    let m = traced_mesh(&otlp, &log, 0.0).await;
    let mut c = m.http1(&format!("{WEB_VIP}:80")).await;
    for _ in 0..20 {
        let seen = backend_headers(&mut c, &[]).await;
        let (_, _, flags) = traceparent(&seen);
        assert_eq!(flags, "00");
    }
    let marker = "33333333333333333333333333333333";
    backend_headers(&mut c, &[("traceparent", &format!("00-{marker}-{S}-01"))]).await;
    let spans = otlp
        .wait_for("for the marker", |s| s["trace_id"] == marker)
        .await;
    assert_eq!(
        spans.len(),
        1,
        "only the caller-sampled request: {spans:#?}"
    );
}
