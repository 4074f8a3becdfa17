//! Retries, timeouts, faults and mirrors through the waypoint (see `common` for the harness),
//! against scripted backends that answer a set sequence (statuses, gRPC statuses, resets,
//! refused streams, stalls) and count what reaches them. Attempt counts are Istio's: `attempts`
//! retries after the first try. Percentages are checked over 2,000 requests within 6 standard
//! deviations of the binomial mean (a false failure about once in 10^9 runs). No timing is
//! asserted beyond lower bounds a sleep guarantees and deadlines that cannot be missed.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};

const H1: &str = "10.96.0.10:80";
const H2: &str = "10.96.0.10:81";

/// A VirtualService for `web` whose one rule has `extra` (retries, timeout, fault, mirror).
fn vs(extra: Value) -> Route<'static> {
    let mut rule = json!({"route": [{"destination": {"host": "web"}}]});
    if let (Some(r), Some(e)) = (rule.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    (
        "VirtualService",
        "web",
        json!({"hosts": ["web"], "http": [rule]}),
    )
}

fn retries(retry_on: &str, attempts: u32) -> Route<'static> {
    vs(json!({"retries": {"attempts": attempts, "retryOn": retry_on}}))
}

/// One request over HTTP/1.1 (port 80) or HTTP/2 (port 81); the status, `grpc-status` and
/// body text.
async fn call(m: &Mesh, h2: bool, req: Request<TestBody>) -> (StatusCode, Option<String>, String) {
    let resp = if h2 {
        let mut c = m.http2(H2).await;
        tokio::time::timeout(DEADLINE, c.send_request(req))
            .await
            .expect("response in time")
            .expect("response")
    } else {
        let mut c = m.http1(H1).await;
        send1(&mut c, req).await
    };
    let status = resp.status();
    let grpc = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, grpc, body_text(resp).await)
}

fn get_web() -> Request<TestBody> {
    get("/", "web")
}

fn grpc_req() -> Request<TestBody> {
    Request::post("http://web/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(""))
        .unwrap()
}

/// `routes` in force, one backend pod following `acts` then `then`; one request; what the
/// client got and how many attempts the pod saw.
async fn attempts_for(
    routes: &[Route<'_>],
    h2: bool,
    acts: &[Act],
    then: Act,
) -> ((StatusCode, Option<String>, String), usize) {
    let script = Script::new(acts, then);
    let m = scripted_mesh(&[("web-0", script.clone())], &[], routes).await;
    let req = if h2 { grpc_req() } else { get_web() };
    let got = call(&m, h2, req).await;
    (got, script.hits())
}

#[tokio::test]
async fn each_retry_on_policy_makes_istios_number_of_attempts() {
    use Act::*;
    // (retryOn, HTTP/2?, what the pod does, attempts Istio makes): attempts: 2 ⇒ 3 at most.
    let cases: &[(&str, bool, Act, usize)] = &[
        ("5xx", false, Status(503), 3),
        ("5xx", false, Status(500), 3),
        ("5xx", false, Reset, 3),
        ("5xx", false, Status(409), 1),
        ("gateway-error", false, Status(502), 3),
        ("gateway-error", false, Status(504), 3),
        ("gateway-error", false, Status(500), 1),
        ("retriable-4xx", false, Status(409), 3),
        ("retriable-4xx", false, Status(404), 1),
        ("retriable-4xx", false, Status(503), 1),
        ("reset", false, Reset, 3),
        ("reset", false, Status(503), 1),
        ("connect-failure", false, Reset, 1),
        ("connect-failure", false, Status(503), 1),
        ("refused-stream", true, Refuse, 3),
        ("refused-stream", true, Reset, 1),
        ("418,503", false, Status(418), 3),
        ("418,503", false, Status(503), 3),
        ("418", false, Status(500), 1),
        ("cancelled", true, Grpc(1), 3),
        ("deadline-exceeded", true, Grpc(4), 3),
        ("resource-exhausted", true, Grpc(8), 3),
        ("internal", true, Grpc(13), 3),
        ("unavailable", true, Grpc(14), 3),
        ("unavailable", true, Grpc(13), 1),
        ("cancelled,internal", true, Grpc(14), 1),
        ("5xx", true, Refuse, 3),
    ];
    for &(retry_on, h2, act, want) in cases {
        let (_, seen) = attempts_for(&[retries(retry_on, 2)], h2, &[], act).await;
        assert_eq!(seen, want, "retryOn {retry_on}, pod answers {act:?}");
    }
}

#[tokio::test]
async fn retried_status_that_recovers_reaches_the_client_and_exhausted_gives_the_last() {
    use Act::*;
    let ((status, _, body), seen) = attempts_for(
        &[retries("5xx", 3)],
        false,
        &[Status(503), Reset],
        Status(200),
    )
    .await;
    assert_eq!((status, seen), (StatusCode::OK, 3));
    assert_eq!(body, "scripted 200");
    // Retries used up on a retriable status: that last response, as the endpoint sent it,
    // flagged URX.
    let script = Script::new(&[Status(500)], Status(502));
    let m = scripted_mesh(&[("web-0", script.clone())], &[], &[retries("5xx", 1)]).await;
    let (status, _, body) = call(&m, false, get_web()).await;
    assert_eq!((status, script.hits()), (StatusCode::BAD_GATEWAY, 2));
    assert_eq!(body, "scripted 502");
    wait_for_flag(&m, "URX", 1).await;
    // Resets all the way: Envoy's 503 with the cause and URX.
    let script = Script::new(&[], Reset);
    let m = scripted_mesh(&[("web-0", script.clone())], &[], &[retries("reset", 1)]).await;
    let (status, _, body) = call(&m, false, get_web()).await;
    assert_eq!(
        (status, script.hits()),
        (StatusCode::SERVICE_UNAVAILABLE, 2)
    );
    assert!(
        body.contains("reset reason: connection termination"),
        "{body}"
    );
    wait_for_flag(&m, "UC,URX", 1).await;
    // attempts: 0 turns retries off.
    let (_, seen) = attempts_for(&[retries("5xx", 0)], false, &[], Status(503)).await;
    assert_eq!(seen, 1);
}

#[tokio::test]
async fn default_policy_retries_connect_failure_refused_stream_unavailable_cancelled_only() {
    use Act::*;
    // No `retries` on the route, and no route at all: Istio's default, 2 retries.
    for routes in [vec![vs(json!({}))], vec![]] {
        for (h2, act, want) in [
            (false, Status(503), 1),
            (false, Reset, 1),
            (true, Refuse, 3),
            (true, Grpc(14), 3),
            (true, Grpc(1), 3),
            (true, Grpc(13), 1),
        ] {
            let (_, seen) = attempts_for(&routes, h2, &[], act).await;
            assert_eq!(seen, want, "{act:?} with routes {routes:?}");
        }
    }
    // Connect failure: the pod's app port is closed; each attempt is one CONNECT to its ztunnel.
    let dead = Script::dead();
    let m = scripted_mesh(&[("web-0", dead)], &[], &[]).await;
    let (status, _, _) = call(&m, false, get_web()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(m.pods[0].seen.peers.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn connect_failure_policy_retries_a_closed_port() {
    let m = scripted_mesh(
        &[("web-0", Script::dead())],
        &[],
        &[retries("connect-failure", 4)],
    )
    .await;
    let (status, _, body) = call(&m, false, get_web()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("connection failure"), "{body}");
    assert_eq!(m.pods[0].seen.peers.lock().unwrap().len(), 5);
}

/// A POST of `len` bytes.
fn post(len: usize) -> Request<TestBody> {
    Request::post("/upload")
        .header("host", "web")
        .body(
            http_body_util::Full::new(Bytes::from(vec![b'x'; len]))
                .map_err(|n: std::convert::Infallible| match n {})
                .boxed(),
        )
        .unwrap()
}

#[tokio::test]
async fn a_body_within_the_buffer_is_replayed_whole_and_a_larger_one_is_not_retried() {
    let limit = waypoint::retry::REQUEST_BUFFER_LIMIT;
    for (len, want) in [
        (0, 3),
        (10_000, 3),
        (limit, 3),
        (limit + 1, 1),
        (3 * limit, 1),
    ] {
        let script = Script::new(&[], Act::Status(503));
        let m = scripted_mesh(&[("web-0", script.clone())], &[], &[retries("5xx", 2)]).await;
        let (status, _, _) = call(&m, false, post(len)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(script.hits(), want, "body of {len} bytes");
        // Every attempt got the whole body.
        assert_eq!(*script.bodies.lock().unwrap(), vec![len; want]);
    }
}

#[tokio::test]
async fn upgrades_are_never_retried() {
    let script = Script::new(&[], Act::Status(503));
    let m = scripted_mesh(&[("web-0", script.clone())], &[], &[retries("5xx", 2)]).await;
    let req = Request::get("/ws")
        .header("host", "web")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(full(""))
        .unwrap();
    let (status, _, _) = call(&m, false, req).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(script.hits(), 1);
}

#[tokio::test]
async fn retries_go_to_another_endpoint_first() {
    let bad = Script::new(&[], Act::Status(503));
    let good = Script::new(&[], Act::Status(200));
    let m = scripted_mesh(
        &[("web-bad", bad.clone()), ("web-good", good.clone())],
        &[],
        &[retries("5xx", 1)],
    )
    .await;
    for i in 0..40 {
        let (status, _, _) = call(&m, false, get_web()).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
    }
    assert_eq!(good.hits(), 40);
    assert!(bad.hits() > 0, "the bad pod was tried first sometimes");
}

#[tokio::test]
async fn route_timeout_is_504_covers_all_retries_and_is_not_retried() {
    // The pod never answers. 3 s for the whole exchange, 1 s per try: the k-th try cannot
    // start before k s, so at most 3 tries fit, and the route timeout ends them with a 504.
    let script = Script::new(&[], Act::Stall);
    let route = vs(json!({"timeout": "3s",
        "retries": {"attempts": 10, "perTryTimeout": "1s", "retryOn": "5xx"}}));
    let m = scripted_mesh(&[("web-0", script.clone())], &[], &[route]).await;
    let (status, _, body) = call(&m, false, get_web()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "upstream request timeout");
    let seen = script.hits();
    assert!((2..=3).contains(&seen), "{seen} tries");
    // The route timeout ended it, not the retry limit.
    wait_for_flag(&m, "UT", 1).await;

    // Without a per-try timeout the only try runs into the route timeout: not retried.
    let script = Script::new(&[], Act::Stall);
    let route = vs(json!({"timeout": "500ms", "retries": {"attempts": 5, "retryOn": "5xx"}}));
    let m = scripted_mesh(&[("web-0", script.clone())], &[], &[route]).await;
    let (status, _, body) = call(&m, false, get_web()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "upstream request timeout");
    assert_eq!(script.hits(), 1);
}

#[tokio::test]
async fn per_try_timeout_triggers_a_retry_when_retry_on_covers_it() {
    use Act::*;
    let per_try =
        |on: &str| vs(json!({"retries": {"attempts": 2, "perTryTimeout": "300ms", "retryOn": on}}));
    // 5xx, gateway-error and reset retry a timed-out try.
    for on in ["5xx", "gateway-error", "reset"] {
        let ((status, _, _), seen) =
            attempts_for(&[per_try(on)], false, &[Stall], Status(200)).await;
        assert_eq!((status, seen), (StatusCode::OK, 2), "retryOn {on}");
    }
    // connect-failure does not: the timed-out try is the answer, a 504.
    let ((status, _, body), seen) =
        attempts_for(&[per_try("connect-failure")], false, &[Stall], Status(200)).await;
    assert_eq!((status, seen), (StatusCode::GATEWAY_TIMEOUT, 1));
    assert_eq!(body, "upstream request timeout");
}

/// Waits until `/metrics` counts `n` requests with response flag `flag`.
async fn wait_for_flag(m: &Mesh, flag: &str, n: u64) {
    let label = format!("response_flags=\"{flag}\"");
    let end = Instant::now() + DEADLINE;
    loop {
        let got = requests_with(&m.metrics().await, &label);
        if got == n {
            return;
        }
        assert!(
            Instant::now() < end,
            "{got} requests flagged {flag}, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bounds of a count of Binomial(`n`, `p`) within 6 standard deviations of its mean.
fn six_sigma(n: usize, p: f64) -> std::ops::RangeInclusive<usize> {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    ((mean - 6.0 * sd).floor().max(0.0) as usize)..=((mean + 6.0 * sd).ceil() as usize)
}

const N: usize = 2000;

#[tokio::test]
async fn fault_percentages_over_2000_requests_land_within_six_sigma() {
    let script = Script::new(&[], Act::Status(200));
    let route = vs(json!({"fault": {
        "delay": {"fixedDelay": "1ms", "percentage": {"value": 20.0}},
        "abort": {"httpStatus": 418, "percentage": {"value": 30.0}}}}));
    let m = scripted_mesh(&[("web-0", script.clone())], &[], &[route]).await;
    let mut c = m.http1(H1).await;
    let mut aborted = 0;
    for _ in 0..N {
        let resp = send1(&mut c, get_web()).await;
        let status = resp.status();
        let body = body_text(resp).await;
        match status.as_u16() {
            418 => {
                assert_eq!(body, "fault filter abort");
                aborted += 1;
            }
            200 => {}
            s => panic!("status {s}"),
        }
    }
    assert!(six_sigma(N, 0.3).contains(&aborted), "{aborted} aborted");
    // An aborted request never reaches the pod.
    assert_eq!(script.hits(), N - aborted);
    // Drawn independently: delayed alone, delayed and aborted (Envoy's `DI,FI`), aborted alone.
    let metrics = m.metrics().await;
    for (flags, p) in [("DI", 0.2 * 0.7), ("DI,FI", 0.2 * 0.3), ("FI", 0.8 * 0.3)] {
        let n = requests_with(&metrics, &format!("response_flags=\"{flags}\"")) as usize;
        assert!(six_sigma(N, p).contains(&n), "{n} flagged {flags}");
    }
}

#[tokio::test]
async fn delay_and_abort_combine_and_grpc_aborts_are_trailers_only() {
    let script = Script::new(&[], Act::Status(200));
    let route = vs(json!({"fault": {
        "delay": {"fixedDelay": "300ms", "percentage": {"value": 100.0}},
        "abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 100.0}}}}));
    let m = scripted_mesh(&[("web-0", script.clone())], &[], &[route]).await;
    let start = Instant::now();
    let (status, grpc, _) = call(&m, true, grpc_req()).await;
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "delayed first"
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(grpc.as_deref(), Some("14"));
    assert_eq!(script.hits(), 0);

    // A delay alone delays and then forwards.
    let route = vs(json!({"fault": {
        "delay": {"fixedDelay": "300ms", "percentage": {"value": 100.0}}}}));
    m.set_routes(&[route]);
    let end = Instant::now() + DEADLINE;
    while script.hits() == 0 {
        assert!(Instant::now() < end, "the new route never applied");
        let start = Instant::now();
        let (status, _, _) = call(&m, false, get_web()).await;
        if status == StatusCode::OK {
            assert!(start.elapsed() >= Duration::from_millis(300));
        }
    }
}

/// The mirror tests share the waypoint's process-wide bound on mirrors in flight: one at a time.
static MIRROR_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until no mirror request is in flight, so the mirror pods' counts are final.
async fn mirrors_settled() {
    let end = Instant::now() + DEADLINE + waypoint::mirror::TIMEOUT;
    while waypoint::mirror::in_flight() > 0 {
        assert!(Instant::now() < end, "mirrors still in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn mirror_gets_its_percentage_with_a_shadow_host_and_the_body() {
    let _one = MIRROR_TESTS.lock().await;
    let web = Script::new(&[], Act::Status(200));
    let shadow = Script::new(&[], Act::Status(500));
    let route = vs(json!({"mirror": {"host": "mirror"}, "mirrorPercentage": {"value": 25.0}}));
    let m = scripted_mesh(
        &[("web-0", web.clone())],
        &[("mirror-0", shadow.clone())],
        &[route],
    )
    .await;
    let mut c = m.http1(H1).await;
    for _ in 0..N {
        let resp = send1(&mut c, post(5)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        body_text(resp).await;
    }
    mirrors_settled().await;
    assert_eq!(web.hits(), N);
    let mirrored = shadow.hits();
    assert!(
        six_sigma(N, 0.25).contains(&mirrored),
        "{mirrored} mirrored"
    );
    assert!(
        shadow
            .hosts
            .lock()
            .unwrap()
            .iter()
            .all(|h| h == "web-shadow")
    );
    // Each copy carried the whole body.
    assert_eq!(*shadow.bodies.lock().unwrap(), vec![5; mirrored]);
    // The mirror's 500s are nobody's business: no retries of the client's request either.
    assert!(web.hosts.lock().unwrap().iter().all(|h| h == "web"));
}

#[tokio::test]
async fn a_dead_or_stalled_mirror_changes_nothing_for_clients() {
    let _one = MIRROR_TESTS.lock().await;
    let web = Script::new(&[], Act::Status(200));
    let stalled = Script::new(&[], Act::Stall);
    let dead = Script::dead();
    let routes = [vs(
        json!({"mirrors": [{"destination": {"host": "mirror"}}]}),
    )];
    // More requests than mirrors may be in flight: the stalled ones fill the bound.
    let n = waypoint::mirror::MAX_IN_FLIGHT + 100;
    for mirror in [stalled.clone(), dead] {
        let m = scripted_mesh(&[("web-0", web.clone())], &[("mirror-0", mirror)], &routes).await;
        let mut c = m.http1(H1).await;
        for i in 0..n {
            // Far sooner than a stalled mirror gives up: the client never waits for one.
            let resp =
                tokio::time::timeout(waypoint::mirror::TIMEOUT / 2, c.send_request(get_web()))
                    .await
                    .expect("answered without waiting for the mirror")
                    .expect("response");
            assert_eq!(resp.status(), StatusCode::OK, "request {i}");
            assert_eq!(body_text(resp).await, "scripted 200");
        }
        let mirror_pod = &m.pods[1];
        assert!(
            !mirror_pod.seen.peers.lock().unwrap().is_empty(),
            "requests were mirrored"
        );
        mirrors_settled().await;
    }
    assert!(stalled.hits() > 0);
    assert_eq!(web.hits(), 2 * n);
}

#[tokio::test]
async fn a_retry_beyond_max_retries_is_not_made_and_the_last_answer_is_flagged_uo() {
    use Act::*;
    // maxRetries: 1. The first request's retry stalls and so holds the only retry place; the
    // second request's 503 then cannot be retried: the client gets that 503, flagged UO.
    let script = Script::new(&[Status(503), Stall, Status(503)], Status(200));
    let dr = (
        "DestinationRule",
        "web",
        json!({"host": "web", "trafficPolicy": {"connectionPool": {"http": {"maxRetries": 1}}}}),
    );
    let m = scripted_mesh(&[("web-0", script.clone())], &[], &[dr, retries("5xx", 2)]).await;
    let mut first = m.http1(H1).await;
    let stuck = tokio::spawn(async move { first.send_request(get_web()).await.map(|_| ()) });
    let end = Instant::now() + DEADLINE;
    while script.hits() < 2 {
        assert!(
            Instant::now() < end,
            "the first request's retry never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, body) = call(&m, false, get_web()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "scripted 503");
    assert_eq!(script.hits(), 3);
    wait_for_flag(&m, "UO", 1).await;
    stuck.abort();
}

#[tokio::test]
async fn httproute_request_and_backend_request_timeouts_end_in_504() {
    use Act::*;
    let httproute = |timeouts: Value| {
        (
            "HTTPRoute",
            "web",
            json!({"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                   "rules": [{"timeouts": timeouts,
                              "backendRefs": [{"name": "web", "port": 80}]}]}),
        )
    };
    // The whole exchange: a stalled pod is cut at 500 ms with a 504.
    let ((status, _, body), seen) =
        attempts_for(&[httproute(json!({"request": "500ms"}))], false, &[], Stall).await;
    assert_eq!((status, seen), (StatusCode::GATEWAY_TIMEOUT, 1));
    assert_eq!(body, "upstream request timeout");
    // A rule without `retry`: Istio makes backendRequest the limit of the exchange (the
    // client's 20 s patience ends long before the 60 s request timeout); nothing retries it.
    let ((status, _, _), seen) = attempts_for(
        &[httproute(
            json!({"request": "60s", "backendRequest": "300ms"}),
        )],
        false,
        &[Stall],
        Status(200),
    )
    .await;
    assert_eq!((status, seen), (StatusCode::GATEWAY_TIMEOUT, 1));
}

/// A gRPC call (HTTP/2, `application/grpc`) to `path`: the HTTP status, `grpc-status`,
/// `grpc-message` and how many body bytes came.
async fn grpc_call(m: &Mesh, path: &str) -> (StatusCode, Option<String>, Option<String>, usize) {
    let mut req = grpc_req();
    *req.uri_mut() = format!("http://web{path}").parse().unwrap();
    let mut c = m.http2(H2).await;
    let resp = tokio::time::timeout(DEADLINE, c.send_request(req))
        .await
        .expect("response in time")
        .expect("response");
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (grpc, message) = (header("grpc-status"), header("grpc-message"));
    let status = resp.status();
    (status, grpc, message, body_text(resp).await.len())
}

/// `istio_requests_total` samples with all of `labels`.
fn requests_with_all(metrics: &str, labels: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test]
async fn grpc_clients_get_the_waypoints_own_answers_as_grpc_statuses() {
    use Act::*;
    // /slow.S/* is cut at 300 ms, /hold.S/* never answers, anything else has no route; one
    // request in flight at most (http2MaxRequests 1); DENY on /denied.S/*.
    let route = (
        "VirtualService",
        "web",
        json!({"hosts": ["web"], "http": [
            {"match": [{"uri": {"prefix": "/slow.S/"}}], "timeout": "300ms",
             "route": [{"destination": {"host": "web"}}]},
            {"match": [{"uri": {"prefix": "/hold.S/"}}],
             "route": [{"destination": {"host": "web"}}]},
        ]}),
    );
    let dr = (
        "DestinationRule",
        "web",
        json!({"host": "web",
               "trafficPolicy": {"connectionPool": {"http": {"http2MaxRequests": 1}}}}),
    );
    let script = Script::new(&[], Stall);
    let m = scripted_mesh(&[("web-0", script.clone())], &[], &[route, dr]).await;
    let ok = StatusCode::OK;
    let some = |s: &str| Some(s.to_string());

    // No route: UNIMPLEMENTED (Envoy's 404 has no text, so no message).
    assert_eq!(
        grpc_call(&m, "/none.S/Call").await,
        (ok, some("12"), None, 0)
    );
    // The route timeout: UNAVAILABLE with Envoy's text.
    assert_eq!(
        grpc_call(&m, "/slow.S/Call").await,
        (ok, some("14"), some("upstream request timeout"), 0)
    );
    // One request held in flight: the next overflows, UNAVAILABLE.
    let mut held = m.http2(H2).await;
    let mut req = grpc_req();
    *req.uri_mut() = "http://web/hold.S/Call".parse().unwrap();
    let stuck = tokio::spawn(async move { held.send_request(req).await.map(|_| ()) });
    let end = Instant::now() + DEADLINE;
    while script.hits() < 2 {
        assert!(Instant::now() < end, "the held request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let overflow =
        "upstream connect error or disconnect/reset before headers. reset reason: overflow";
    assert_eq!(
        grpc_call(&m, "/slow.S/Call").await,
        (ok, some("14"), some(overflow), 0)
    );
    stuck.abort();
    // RBAC: PERMISSION_DENIED, once the policy is in force.
    m.set_policies(vec![policy_resource(
        "AuthorizationPolicy",
        "app",
        "deny",
        json!({"targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
               "action": "DENY",
               "rules": [{"to": [{"operation": {"paths": ["/denied.S/*"]}}]}]}),
    )]);
    let end = Instant::now() + DEADLINE;
    let denied = loop {
        let got = grpc_call(&m, "/denied.S/Call").await;
        if got.1.as_deref() != Some("12") || Instant::now() > end {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(denied, (ok, some("7"), some("RBAC: access denied"), 0));

    // Recorded as Envoy records gRPC local replies: code 200, the cause in the flags.
    let metrics = m.metrics().await;
    for flag in ["NR", "UT", "UO", "RBAC"] {
        let n = requests_with_all(
            &metrics,
            &[
                "response_code=\"200\"",
                &format!("response_flags=\"{flag}\""),
            ],
        );
        assert!(n >= 1, "no 200 flagged {flag}: {metrics}");
    }
}

/// The body of `resp` as it arrives: the bytes, and whether it ended in an error (a reset
/// stream or a cut connection) rather than its proper end.
async fn read_body(resp: http::Response<hyper::body::Incoming>) -> (Vec<u8>, bool) {
    let mut body = resp.into_body();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, body.frame()).await {
            Err(_) => panic!("the body neither ended nor failed in time"),
            Ok(None) => return (got, false),
            Ok(Some(Err(_))) => return (got, true),
            Ok(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    got.extend_from_slice(d);
                }
            }
        }
    }
}

#[tokio::test]
async fn route_and_per_try_timeouts_cut_a_response_whose_body_stalls() {
    // The pod sends its headers and a first chunk, then nothing. Envoy's timeouts last until
    // the response is complete: once the headers are out, expiry can only reset the stream.
    let route_timeout = vs(json!({"timeout": "500ms"}));
    let per_try = vs(json!({"retries": {"attempts": 2, "perTryTimeout": "500ms",
                                        "retryOn": "5xx"}}));
    for (route, h2) in [
        (&route_timeout, false),
        (&route_timeout, true),
        (&per_try, false),
    ] {
        let script = Script::new(&[], Act::StallBody);
        let m = scripted_mesh(
            &[("web-0", script.clone())],
            &[],
            std::slice::from_ref(route),
        )
        .await;
        let resp = if h2 {
            let mut c = m.http2(H2).await;
            tokio::time::timeout(DEADLINE, c.send_request(grpc_req()))
                .await
                .expect("response in time")
                .expect("response")
        } else {
            let mut c = m.http1(H1).await;
            send1(&mut c, get_web()).await
        };
        assert_eq!(resp.status(), StatusCode::OK, "{route:?} h2 {h2}");
        let (got, failed) = read_body(resp).await;
        assert_eq!(got, b"partial", "{route:?} h2 {h2}");
        assert!(failed, "the stream must end in an error: {route:?} h2 {h2}");
        // Not retried: the response had started.
        assert_eq!(script.hits(), 1, "{route:?} h2 {h2}");
        wait_for_flag(&m, "UT", 1).await;
    }
}

/// A request body fed by the test, chunk by chunk; it ends when the sender is dropped.
struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Fed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

#[tokio::test]
async fn the_route_timeout_starts_when_the_client_has_sent_its_whole_request() {
    // Envoy's route timeout runs from the end of the downstream request: a client stream
    // that takes longer than the timeout is not cut while it is still sending.
    let script = Script::new(&[], Act::Status(200));
    let route = vs(json!({"timeout": "300ms",
        "retries": {"attempts": 1, "perTryTimeout": "300ms", "retryOn": "5xx"}}));
    let m = scripted_mesh(&[("web-0", script.clone())], &[], &[route]).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (head, _) = grpc_req().into_parts();
    let req = Request::from_parts(head, BodyExt::boxed(Fed(rx)));
    let mut c = m.http2(H2).await;
    let call = tokio::spawn(async move { c.send_request(req).await });
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    // The client is slow: its stream stays open for more than the timeouts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // (Fails if the waypoint already gave up on the request; the response tells why.)
    let _ = tx.send(Bytes::from_static(b"last")).await;
    drop(tx);
    let resp = tokio::time::timeout(DEADLINE, call)
        .await
        .expect("response in time")
        .unwrap()
        .expect("response");
    // The backend's answer, not the waypoint's (a gRPC timeout would be 200 + grpc-status 14).
    assert_eq!(
        (resp.status(), resp.headers().get("grpc-status")),
        (StatusCode::OK, None)
    );
    assert_eq!(script.hits(), 1);
    assert_eq!(*script.bodies.lock().unwrap(), vec![9]);
    wait_for_flag(&m, "-", 1).await;
}

#[tokio::test]
async fn a_response_cut_by_the_timeout_counts_against_its_pod_in_outlier_detection() {
    // web-0 sends headers and stalls its body; one such timeout ejects it (Envoy reports a
    // timed-out response to outlier detection as a 504 even after its headers came).
    let stalls = Script::new(&[], Act::StallBody);
    let good = Script::new(&[], Act::Status(200));
    let dr = (
        "DestinationRule",
        "web",
        json!({"host": "web", "trafficPolicy": {"outlierDetection": {
            "consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "1h",
            "maxEjectionPercent": 100}}}),
    );
    let route = vs(json!({"timeout": "300ms"}));
    let m = scripted_mesh(
        &[("web-0", stalls.clone()), ("web-1", good.clone())],
        &[],
        &[dr, route],
    )
    .await;
    let mut sent = 0;
    while stalls.hits() == 0 {
        assert!(sent < 200, "web-0 never got a request");
        let mut c = m.http1(H1).await;
        let resp = send1(&mut c, get_web()).await;
        read_body(resp).await;
        sent += 1;
    }
    for _ in 0..20 {
        let mut c = m.http1(H1).await;
        let (body, failed) = read_body(send1(&mut c, get_web()).await).await;
        assert!(
            !failed && body == b"scripted 200",
            "web-0 was tried again: not ejected"
        );
    }
    assert_eq!(stalls.hits(), 1);
}
