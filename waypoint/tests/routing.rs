//! Routing through the waypoint with `meshcore::route` (see `common` for the harness): a
//! VirtualService's header rule and DestinationRule subsets choose pods by label; rewrites,
//! response headers, direct responses and "no rule matched" are seen by the client.

mod common;

use common::*;
use http::StatusCode;
use serde_json::json;

fn subsets() -> Route<'static> {
    (
        "DestinationRule",
        "web",
        json!({"host": "web", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ]}),
    )
}

#[tokio::test]
async fn header_rule_and_subsets_choose_pods_by_label() {
    let vs = (
        "VirtualService",
        "web",
        json!({"hosts": ["web"], "http": [
            {"match": [{"headers": {"x-user-group": {"exact": "beta"}}}],
             "route": [{"destination": {"host": "web", "subset": "v2"}}]},
            {"route": [{"destination": {"host": "web", "subset": "v1"}}]},
        ]}),
    );
    let m = mesh_of(
        &[
            ("web-v1", &[("version", "v1")]),
            ("web-v2", &[("version", "v2")]),
        ],
        &[subsets(), vs],
        |_| {},
    )
    .await;
    let mut c = m.http1(&format!("{WEB_VIP}:80")).await;
    for (group, want) in [
        (None, "web-v1"),
        (Some("beta"), "web-v2"),
        (Some("alpha"), "web-v1"),
    ] {
        for _ in 0..10 {
            let mut req = get("/", "web");
            if let Some(g) = group {
                req.headers_mut().insert("x-user-group", g.parse().unwrap());
            }
            let resp = send1(&mut c, req).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let pod = resp.headers().get("x-pod").cloned();
            body_text(resp).await;
            assert_eq!(pod.unwrap(), want, "x-user-group {group:?}");
        }
    }
}

#[tokio::test]
async fn rewrite_response_headers_direct_response_and_no_match() {
    let vs = (
        "VirtualService",
        "web",
        json!({"hosts": ["web.app.svc.cluster.local"], "http": [
            {"name": "legacy",
             "match": [{"uri": {"prefix": "/old"}}],
             "rewrite": {"uri": "/new"},
             "headers": {"response": {"set": {"x-route": "legacy"}}},
             "route": [{"destination": {"host": "web"}}]},
            {"match": [{"uri": {"exact": "/teapot"}}],
             "directResponse": {"status": 418, "body": {"string": "short and stout"}}},
        ]}),
    );
    let m = mesh_of(&[("web-0", &[])], &[vs], |_| {}).await;
    let mut c = m.http1(&format!("{WEB_VIP}:80")).await;

    let resp = send1(&mut c, get("/old/page?q=1", "web")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("x-route").unwrap(), "legacy");
    assert_eq!(
        body_text(resp).await,
        "path=/new/page version=HTTP/1.1 host=web"
    );

    let resp = send1(&mut c, get("/teapot", "web")).await;
    assert_eq!(resp.status(), StatusCode::IM_A_TEAPOT);
    assert_eq!(body_text(resp).await, "short and stout");

    // Routes exist for the service and none matches: 404, and the backend never sees it.
    let before = m.seen.peers.lock().unwrap().len();
    let resp = send1(&mut c, get("/elsewhere", "web")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    body_text(resp).await;
    assert_eq!(m.seen.peers.lock().unwrap().len(), before);
    let dump = m.config_dump().await;
    assert_eq!(
        dump["routes"]["diagnostics"],
        serde_json::json!([]),
        "{dump:#}"
    );
}

#[tokio::test]
async fn invalid_route_is_reported_and_left_out() {
    let bad = (
        "VirtualService",
        "web",
        json!({"hosts": ["web"], "http": [
            {"match": [{"uri": {"regex": "(unclosed"}}],
             "directResponse": {"status": 500}},
        ]}),
    );
    let m = mesh_of(&[("web-0", &[])], &[bad], |_| {}).await;
    let mut c = m.http1(&format!("{WEB_VIP}:80")).await;
    // Left out: the default route applies.
    let resp = send1(&mut c, get("/x", "web")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    body_text(resp).await;
    let dump = m.config_dump().await;
    let diags = dump["routes"]["diagnostics"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        diags
            .iter()
            .any(|d| d["resource"] == "VirtualService app/web"
                && d["field"].as_str().is_some_and(|f| f.contains("regex"))),
        "{dump:#}"
    );
}

fn all_to(subset: &str) -> Route<'static> {
    (
        "VirtualService",
        "web",
        json!({"hosts": ["web"], "http": [
            {"route": [{"destination": {"host": "web", "subset": subset}}]},
        ]}),
    )
}

/// How a canary controller drives a rollout: the route changes under a steady stream of
/// requests on one kept-alive connection; none fails and new requests follow the new route.
#[tokio::test]
async fn route_changes_apply_live_without_failing_a_request() {
    let m = mesh_of(
        &[
            ("web-v1", &[("version", "v1")]),
            ("web-v2", &[("version", "v2")]),
        ],
        &[subsets(), all_to("v1")],
        |_| {},
    )
    .await;
    let mut c = m.http1(&format!("{WEB_VIP}:80")).await;
    let mut pods = Vec::new();
    let ask = async |c: &mut _| {
        let resp = send1(c, get("/", "web")).await;
        assert_eq!(resp.status(), StatusCode::OK, "no request fails");
        let pod = resp.headers()["x-pod"].to_str().unwrap().to_string();
        body_text(resp).await;
        pod
    };
    for _ in 0..20 {
        pods.push(ask(&mut c).await);
    }
    assert!(pods.iter().all(|p| p == "web-v1"), "{pods:?}");
    m.set_routes(&[subsets(), all_to("v2")]);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while ask(&mut c).await != "web-v2" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new route never applied"
        );
    }
    for _ in 0..20 {
        assert_eq!(ask(&mut c).await, "web-v2");
    }
    assert_eq!(
        m.pods[0]
            .seen
            .http1_conns
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}
