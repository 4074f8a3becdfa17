//! Circuit breaking and outlier detection through a real waypoint (see `common` for the
//! harness), driven with controlled backends that hold requests until released or answer a
//! chosen status: each DestinationRule `connectionPool` limit answers 503 `UO` with
//! `x-envoy-overloaded` at exactly the configured concurrency; `outlierDetection` ejects
//! endpoints after consecutive errors, within maxEjectionPercent, panics below
//! minHealthPercent, and lets ejected endpoints return.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn dr(traffic_policy: Value) -> Route<'static> {
    (
        "DestinationRule",
        "ctl",
        json!({"host": "ctl", "trafficPolicy": traffic_policy}),
    )
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn pod(&self) -> Option<&str> {
        self.headers.get("x-pod").and_then(|v| v.to_str().ok())
    }

    fn assert_overflow(&self) {
        assert_eq!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            self.body
        );
        assert_eq!(self.headers.get("x-envoy-overloaded").unwrap(), "true");
        assert!(self.pod().is_none(), "answered by the waypoint, not a pod");
    }
}

/// `GET /` to `ctl` on a connection of its own.
async fn ask(m: Arc<Mesh>) -> Answer {
    let mut c = m.http1(&format!("{CTL_VIP}:80")).await;
    ask_on(&mut c).await
}

async fn ask_on(c: &mut hyper::client::conn::http1::SendRequest<TestBody>) -> Answer {
    let resp = send1(c, get("/", "ctl")).await;
    let (status, headers) = (resp.status(), resp.headers().clone());
    Answer {
        status,
        headers,
        body: body_text(resp).await,
    }
}

/// Starts `n` requests that the held backend keeps; they end when it is released.
fn start(m: &Arc<Mesh>, n: usize) -> Vec<tokio::task::JoinHandle<Answer>> {
    (0..n).map(|_| tokio::spawn(ask(m.clone()))).collect()
}

async fn all_ok(held: Vec<tokio::task::JoinHandle<Answer>>) {
    for h in held {
        let a = h.await.expect("request task");
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }
}

/// Waits until the waypoint has `n` requests queued for a connection to `ctl`.
async fn until_pending(m: &Mesh, n: u64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let dump = m.config_dump().await;
        let pending = dump["circuitBreakers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["destination"]
                    .as_str()
                    .is_some_and(|s| s.contains("app/ctl"))
            })
            .filter_map(|d| d["pending"].as_u64())
            .sum::<u64>();
        if pending == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {n} pending: {dump}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn http2_max_requests_overflows_at_exactly_the_limit() {
    let (m, c) = mesh_controlled(
        &["ctl-0"],
        &[dr(
            json!({"connectionPool": {"http": {"http2MaxRequests": 3}}}),
        )],
    )
    .await;
    let m = Arc::new(m);
    c[0].hold();
    let held = start(&m, 3);
    c[0].until("3 requests in flight", |c| {
        c.in_flight.load(Ordering::SeqCst) == 3
    })
    .await;
    ask(m.clone()).await.assert_overflow();
    assert_eq!(c[0].requests.load(Ordering::SeqCst), 3);
    let metrics = m.metrics().await;
    assert_eq!(
        requests_with(&metrics, r#"response_flags="UO""#),
        1,
        "{metrics}"
    );
    c[0].release();
    all_ok(held).await;
    // The places are free again once those responses ended.
    assert_eq!(ask(m.clone()).await.status, StatusCode::OK);
    assert_eq!(c[0].max_in_flight.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn max_connections_queue_up_to_max_pending_then_overflow() {
    let (m, c) = mesh_controlled(
        &["ctl-0"],
        &[dr(json!({"connectionPool": {
            "tcp": {"maxConnections": 2},
            "http": {"http1MaxPendingRequests": 1},
        }}))],
    )
    .await;
    let m = Arc::new(m);
    c[0].hold();
    let mut held = start(&m, 2);
    c[0].until("2 requests in flight", |c| {
        c.in_flight.load(Ordering::SeqCst) == 2
    })
    .await;
    // The third finds both connections busy and waits for one.
    held.extend(start(&m, 1));
    until_pending(&m, 1).await;
    ask(m.clone()).await.assert_overflow();
    let metrics = m.metrics().await;
    assert_eq!(
        requests_with(&metrics, r#"response_flags="UO""#),
        1,
        "{metrics}"
    );
    c[0].release();
    all_ok(held).await;
    // Never more than two connections, the waiting request took one that was released.
    assert_eq!(c[0].conns.load(Ordering::SeqCst), 2);
    assert_eq!(c[0].max_in_flight.load(Ordering::SeqCst), 2);
    assert_eq!(c[0].requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn max_requests_per_connection_one_means_no_keep_alive() {
    let (m, c) = mesh_controlled(
        &["ctl-0"],
        &[dr(
            json!({"connectionPool": {"http": {"maxRequestsPerConnection": 1}}}),
        )],
    )
    .await;
    let m = Arc::new(m);
    let mut client = m.http1(&format!("{CTL_VIP}:80")).await;
    for _ in 0..3 {
        assert_eq!(ask_on(&mut client).await.status, StatusCode::OK);
    }
    c[0].until("3 connections, each closed", |c| {
        c.closed.load(Ordering::SeqCst) == 3
    })
    .await;
    assert_eq!(c[0].conns.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn idle_upstream_connections_close_after_the_idle_timeout() {
    let (m, c) = mesh_controlled(
        &["ctl-0"],
        &[dr(
            json!({"connectionPool": {"http": {"idleTimeout": "200ms"}}}),
        )],
    )
    .await;
    let m = Arc::new(m);
    assert_eq!(ask(m.clone()).await.status, StatusCode::OK);
    c[0].until("the idle connection closed", |c| {
        c.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    // A new request gets a new connection.
    assert_eq!(ask(m.clone()).await.status, StatusCode::OK);
    assert_eq!(c[0].conns.load(Ordering::SeqCst), 2);
}

/// Outlier detection that ejects after 3 consecutive 5xx for an hour, plus `extra`.
fn ejecting(extra: Value) -> Route<'static> {
    let mut od = json!({"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "1h"});
    if let (Some(od), Some(extra)) = (od.as_object_mut(), extra.as_object()) {
        od.extend(extra.clone());
    }
    dr(json!({"outlierDetection": od}))
}

/// Requests on `client` until every pod in `failing` has answered 3 times (at most 300).
async fn drive_until_three_each(
    client: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    c: &[Arc<Control>],
    failing: &[usize],
) {
    for _ in 0..300 {
        if failing
            .iter()
            .all(|i| c[*i].requests.load(Ordering::SeqCst) >= 3)
        {
            return;
        }
        ask_on(client).await;
    }
    panic!("the failing pods never got 3 requests each");
}

fn ejected(dump: &Value) -> Vec<String> {
    dump["balancer"]["outlierDetection"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["ejected"].as_array().into_iter().flatten())
        .filter_map(|e| e["endpoint"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn consecutive_5xx_eject_the_failing_pod() {
    let (m, c) = mesh_controlled(
        &["ctl-0", "ctl-1"],
        &[ejecting(json!({"maxEjectionPercent": 100}))],
    )
    .await;
    c[0].answer(500);
    let mut client = m.http1(&format!("{CTL_VIP}:80")).await;
    drive_until_three_each(&mut client, &c, &[0]).await;
    for _ in 0..30 {
        let a = ask_on(&mut client).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.pod(), Some("ctl-1"));
    }
    assert_eq!(c[0].requests.load(Ordering::SeqCst), 3);
    assert_eq!(
        ejected(&m.config_dump().await),
        [format!("{}:{CTL_PORT}", m.pods[0].ip)]
    );
}

#[tokio::test]
async fn all_ejected_is_no_healthy_upstream_without_min_health_percent() {
    let (m, c) = mesh_controlled(
        &["ctl-0", "ctl-1"],
        &[ejecting(json!({"maxEjectionPercent": 100}))],
    )
    .await;
    c[0].answer(500);
    c[1].answer(500);
    let mut client = m.http1(&format!("{CTL_VIP}:80")).await;
    drive_until_three_each(&mut client, &c, &[0, 1]).await;
    for _ in 0..10 {
        let a = ask_on(&mut client).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.body, "no healthy upstream");
    }
    let metrics = m.metrics().await;
    assert_eq!(
        requests_with(&metrics, r#"response_flags="UH""#),
        10,
        "{metrics}"
    );
    assert_eq!(c[0].requests.load(Ordering::SeqCst), 3);
    assert_eq!(c[1].requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn below_min_health_percent_the_waypoint_panics_and_uses_every_pod() {
    let (m, c) = mesh_controlled(
        &["ctl-0", "ctl-1"],
        &[ejecting(
            json!({"maxEjectionPercent": 100, "minHealthPercent": 50}),
        )],
    )
    .await;
    c[0].answer(500);
    c[1].answer(500);
    let mut client = m.http1(&format!("{CTL_VIP}:80")).await;
    drive_until_three_each(&mut client, &c, &[0, 1]).await;
    // Both ejected (0% healthy, below 50%): requests go to the pods anyway.
    assert_eq!(ejected(&m.config_dump().await).len(), 2);
    for _ in 0..20 {
        let a = ask_on(&mut client).await;
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(a.pod().is_some());
    }
}

#[tokio::test]
async fn at_most_max_ejection_percent_of_the_pods_are_ejected() {
    let names = ["ctl-0", "ctl-1", "ctl-2", "ctl-3"];
    let (m, c) = mesh_controlled(&names, &[ejecting(json!({"maxEjectionPercent": 50}))]).await;
    for ctl in &c {
        ctl.answer(500);
    }
    let mut client = m.http1(&format!("{CTL_VIP}:80")).await;
    for _ in 0..200 {
        ask_on(&mut client).await;
    }
    // Two of four (50%) are out and stay at the 3 requests that ejected them; the other two
    // keep getting requests though they fail just as much.
    let mut counts: Vec<usize> = c
        .iter()
        .map(|c| c.requests.load(Ordering::SeqCst))
        .collect();
    counts.sort();
    assert_eq!(counts[..2], [3, 3], "{counts:?}");
    assert!(counts[2] > 3 && counts[3] > 3, "{counts:?}");
    assert_eq!(ejected(&m.config_dump().await).len(), 2);
}

#[tokio::test]
async fn an_ejected_pod_returns_on_its_own_and_a_second_ejection_lasts_twice_as_long() {
    let (m, c) = mesh_controlled(
        &["ctl-0", "ctl-1"],
        &[dr(json!({"outlierDetection": {
            "consecutive5xxErrors": 3, "interval": "50ms", "baseEjectionTime": "2s",
            "maxEjectionPercent": 100,
        }}))],
    )
    .await;
    c[0].answer(500);
    let mut client = m.http1(&format!("{CTL_VIP}:80")).await;
    drive_until_three_each(&mut client, &c, &[0]).await;
    let dump = m.config_dump().await;
    let first = &dump["balancer"]["outlierDetection"][0]["ejected"][0];
    assert_eq!(first["ejectionTimeMs"], 2000, "{dump}");
    c[0].answer(200);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while c[0].requests.load(Ordering::SeqCst) == 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ejected pod never came back"
        );
        ask_on(&mut client).await;
    }
    // It fails again at once (long before a base ejection time would forgive the first
    // ejection): ejected for 2 × base.
    c[0].answer(500);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let dump = m.config_dump().await;
        let e = &dump["balancer"]["outlierDetection"][0]["ejected"][0];
        if !e.is_null() {
            assert_eq!(e["ejectionTimeMs"], 4000, "{dump}");
            assert_eq!(e["ejections"], 2, "{dump}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ejected again: {dump}"
        );
        ask_on(&mut client).await;
    }
}

#[tokio::test]
async fn max_retries_limits_the_retries_in_flight() {
    let vs = (
        "VirtualService",
        "ctl",
        json!({"hosts": ["ctl"], "http": [{
            "route": [{"destination": {"host": "ctl"}}],
            "retries": {"attempts": 2, "retryOn": "5xx"},
        }]}),
    );
    let (m, c) = mesh_controlled(
        &["ctl-0"],
        &[
            dr(json!({"connectionPool": {"http": {"maxRetries": 1}}})),
            vs,
        ],
    )
    .await;
    let m = Arc::new(m);
    c[0].hold();
    // The first request fails once; its retry is held by the backend.
    c[0].fail_first.store(1, Ordering::SeqCst);
    let held = start(&m, 1);
    c[0].until("a retry in flight", |c| {
        c.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(c[0].requests.load(Ordering::SeqCst), 2);
    // The second fails too, and may not retry: the one retry allowed is taken. Its own 500
    // comes back at once.
    c[0].fail_first.store(1, Ordering::SeqCst);
    let a = ask(m.clone()).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(c[0].requests.load(Ordering::SeqCst), 3);
    c[0].release();
    all_ok(held).await;
}

async fn echo(t: &mut meshcore::hbone::H2Stream, b: &[u8]) {
    t.write_all(b).await.expect("write");
    let mut got = vec![0; b.len()];
    tokio::time::timeout(DEADLINE, t.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(got, b);
}

#[tokio::test]
async fn tcp_connections_wait_for_max_connections_then_overflow() {
    let (m, _c) = mesh_controlled(
        &["ctl-0"],
        &[dr(json!({"connectionPool": {
            "tcp": {"maxConnections": 1},
            "http": {"http1MaxPendingRequests": 1},
        }}))],
    )
    .await;
    let authority = format!("{CTL_VIP}:9000");
    let mut first = m.connect(&authority).await.expect("CONNECT");
    echo(&mut first, b"one").await;
    // The second waits for the first's connection to close.
    let mut second = m.connect(&authority).await.expect("CONNECT");
    second.write_all(b"two").await.expect("write");
    until_pending(&m, 1).await;
    // The third finds the queue full: refused (the tunnel reset, or closed without an answer).
    if let Ok(mut third) = m.connect(&authority).await {
        let _ = third.write_all(b"three").await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, third.read_to_end(&mut got))
            .await
            .expect("closed in time");
        assert!(got.is_empty(), "{got:?}");
    }
    let metrics = m.metrics().await;
    assert!(
        metrics.contains(r#"response_flags="UO""#),
        "the refused connection is counted as UO:\n{metrics}"
    );
    drop(first);
    let mut got = vec![0; 3];
    tokio::time::timeout(DEADLINE, second.read_exact(&mut got))
        .await
        .expect("second connected once the first closed")
        .expect("echo");
    assert_eq!(got, b"two");
}

#[tokio::test]
async fn connect_timeout_bounds_connecting_to_a_hung_pod() {
    let m = mesh().await;
    let routes = [(
        "DestinationRule",
        "silent",
        json!({"host": "silent", "trafficPolicy": {"connectionPool": {
            "tcp": {"connectTimeout": "100ms"},
        }}}),
    )];
    let accepted = silent_pod(&m, &routes).await;
    let mut c = m.http1(&format!("{SILENT_VIP}:80")).await;
    // Istio's default is 10 s per attempt (and the default policy retries connect failures
    // twice): an answer within 5 s means the DestinationRule's 100 ms applied.
    let resp = tokio::time::timeout(Duration::from_secs(5), c.send_request(get("/", "silent")))
        .await
        .expect("answered within 5 s")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(accepted.load(Ordering::SeqCst) >= 1, "the pod was dialled");
    let metrics = m.metrics().await;
    assert_eq!(
        // UF, with URX once the default retries are spent.
        requests_with(&metrics, r#"response_flags="UF"#),
        1,
        "{metrics}"
    );
}

#[tokio::test]
async fn tcp_idle_timeout_closes_a_quiet_connection() {
    let (m, _c) = mesh_controlled(
        &["ctl-0"],
        &[dr(
            json!({"connectionPool": {"tcp": {"idleTimeout": "200ms"}}}),
        )],
    )
    .await;
    let mut tunnel = m
        .connect(&format!("{CTL_VIP}:9000"))
        .await
        .expect("CONNECT");
    echo(&mut tunnel, b"hello").await;
    // Then nothing: the waypoint closes it (Istio's default would wait an hour).
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, tunnel.read_to_end(&mut rest))
        .await
        .expect("closed for idleness");
    assert!(rest.is_empty(), "{rest:?}");
}
