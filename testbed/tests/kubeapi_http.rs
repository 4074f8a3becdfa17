//! The API server double at the HTTP level: what kube-rs's watcher, kubectl and meshd's
//! writers rely on, checked with raw requests through a real HTTPS client (kube's, configured
//! from the double's kubeconfig) so status codes, `Status` bodies and the watch wire format
//! are what is asserted.

use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use testbed::kubeapi::{ApiOptions, ApiServer, RequestMatch};

/// Upper bound for anything a test waits for; reaching it is a failure.
const PATIENCE: Duration = Duration::from_secs(10);

fn start_with(opts: ApiOptions) -> ApiServer {
    let server = ApiServer::start(opts).expect("the double starts");
    server
        .create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "t"}}))
        .expect("namespace t");
    server
}

fn start() -> ApiServer {
    start_with(ApiOptions {
        bookmark_interval: Duration::from_millis(100),
        ..ApiOptions::default()
    })
}

async fn client_for(path: &std::path::Path) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(path).expect("kubeconfig readable");
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig usable");
    // kube 5 retries 429/503/504 itself (15 times, backing off up to 1000 s): these tests
    // look at the answers.
    cfg.default_retry = false;
    kube::Client::try_from(cfg).expect("client")
}

async fn client(server: &ApiServer) -> kube::Client {
    client_for(server.kubeconfig()).await
}

/// One request; the answer's code and JSON body (Null if not JSON).
async fn call(
    c: &kube::Client,
    method: &str,
    uri: &str,
    ctype: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", ctype)
        .body(kube::client::Body::from(bytes))
        .expect("request");
    let resp = c.send(req).await.expect("the double answers");
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn get(c: &kube::Client, uri: &str) -> (u16, Value) {
    call(c, "GET", uri, "application/json", None).await
}
async fn post(c: &kube::Client, uri: &str, body: Value) -> (u16, Value) {
    call(c, "POST", uri, "application/json", Some(body)).await
}
async fn put(c: &kube::Client, uri: &str, body: Value) -> (u16, Value) {
    call(c, "PUT", uri, "application/json", Some(body)).await
}

const CMS: &str = "/api/v1/namespaces/t/configmaps";

fn cm(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "t", "labels": labels}, "data": {"k": "v"}})
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {v}"))
}

/// How a watch stream ended.
#[derive(Debug, PartialEq)]
enum End {
    /// Chunked end: the client resumes.
    Clean,
    /// Cut mid-stream.
    Cut,
}

/// A watch response read line by line.
struct Watch {
    body: kube::client::Body,
    buf: Vec<u8>,
}

impl Watch {
    async fn open(c: &kube::Client, uri: &str) -> Watch {
        let req = Request::get(uri)
            .body(kube::client::Body::empty())
            .expect("request");
        let resp = c.send(req).await.expect("the double answers");
        assert_eq!(resp.status().as_u16(), 200, "watch {uri} answered");
        Watch {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// The next event, or how the stream ended.
    async fn next_or_end(&mut self) -> Result<Value, End> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(serde_json::from_slice(&line).expect("a JSON event per line"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.body.frame()).await {
                Err(_) => panic!("no watch event within {PATIENCE:?}"),
                Ok(None) => {
                    assert!(self.buf.is_empty(), "partial line at end");
                    return Err(End::Clean);
                }
                Ok(Some(Err(_))) => return Err(End::Cut),
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
            }
        }
    }

    async fn next(&mut self) -> Value {
        self.next_or_end().await.expect("a watch event")
    }

    /// The next event that is not a BOOKMARK.
    async fn next_change(&mut self) -> Value {
        loop {
            let e = self.next().await;
            if e["type"] != "BOOKMARK" {
                return e;
            }
        }
    }
}

fn summary(e: &Value) -> (String, String) {
    (
        e["type"].as_str().unwrap_or_default().to_string(),
        e["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn pair(t: &str, n: &str) -> (String, String) {
    (t.to_string(), n.to_string())
}

#[tokio::test]
async fn list_carries_a_resource_version_and_pages_with_continue() {
    let server = start();
    let c = client(&server).await;
    let (code, empty) = get(&c, CMS).await;
    assert_eq!(code, 200);
    assert_eq!(empty["kind"], "ConfigMapList");
    assert!(
        rv_of(&empty) > 0,
        "an empty list still carries the current RV"
    );
    for n in ["e", "a", "d", "b", "c"] {
        assert_eq!(post(&c, CMS, cm(n, json!({}))).await.0, 201);
    }
    let (_, first) = get(&c, &format!("{CMS}?limit=2")).await;
    let mut names: Vec<String> = Vec::new();
    let mut page = first.clone();
    loop {
        assert_eq!(
            rv_of(&page),
            rv_of(&first),
            "every page carries the first page's RV"
        );
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 2);
        names.extend(
            items
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap().to_string()),
        );
        let Some(cont) = page["metadata"]["continue"].as_str() else {
            break;
        };
        let (code, next) = get(&c, &format!("{CMS}?limit=2&continue={cont}")).await;
        assert_eq!(code, 200, "{next}");
        page = next;
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    // A continue token that is garbage is refused, not a panic or a hang.
    let (code, status) = get(&c, &format!("{CMS}?limit=2&continue=zz")).await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
}

#[tokio::test]
async fn selectors_filter_lists() {
    let server = start();
    let c = client(&server).await;
    post(&c, CMS, cm("web", json!({"app": "web", "tier": "front"}))).await;
    post(&c, CMS, cm("db", json!({"app": "db"}))).await;
    post(&c, CMS, cm("bare", json!({}))).await;
    let names = |v: Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let q = |s: &str| format!("{CMS}?labelSelector={}", s.replace(' ', "%20"));
    assert_eq!(names(get(&c, &q("app=web")).await.1), ["web"]);
    assert_eq!(names(get(&c, &q("app!=web")).await.1), ["bare", "db"]);
    assert_eq!(names(get(&c, &q("app in (web,db)")).await.1), ["db", "web"]);
    assert_eq!(
        names(get(&c, &q("app notin (web)")).await.1),
        ["bare", "db"]
    );
    assert_eq!(names(get(&c, &q("!app")).await.1), ["bare"]);
    assert_eq!(names(get(&c, &q("tier")).await.1), ["web"]);
    let (_, all_ns) = get(
        &c,
        "/api/v1/configmaps?fieldSelector=metadata.namespace%3Dt,metadata.name!%3Ddb",
    )
    .await;
    assert_eq!(names(all_ns), ["bare", "web"]);
    let (code, s) = get(&c, &format!("{CMS}?fieldSelector=spec.nodeName%3Dx")).await;
    assert_eq!((code, s["reason"].as_str()), (400, Some("BadRequest")));
}

#[tokio::test]
async fn watch_replays_every_event_after_the_given_version_in_order_then_streams() {
    let server = start();
    let c = client(&server).await;
    let (_, a) = post(&c, CMS, cm("a", json!({}))).await;
    let from = rv_of(&a);
    let mut changed = a.clone();
    changed["data"]["k"] = json!("v2");
    assert_eq!(put(&c, &format!("{CMS}/a"), changed).await.0, 200);
    post(&c, CMS, cm("b", json!({}))).await;
    assert_eq!(
        call(&c, "DELETE", &format!("{CMS}/a"), "application/json", None)
            .await
            .0,
        200
    );

    let mut w = Watch::open(&c, &format!("{CMS}?watch=true&resourceVersion={from}")).await;
    let mut seen = Vec::new();
    let mut last_rv = from;
    for _ in 0..3 {
        let e = w.next_change().await;
        let rv = rv_of(&e["object"]);
        assert!(
            rv > last_rv,
            "events come in RV order: {rv} after {last_rv}"
        );
        last_rv = rv;
        seen.push(summary(&e));
    }
    assert_eq!(
        seen,
        [
            pair("MODIFIED", "a"),
            pair("ADDED", "b"),
            pair("DELETED", "a")
        ]
    );
    // Then live.
    post(&c, CMS, cm("c", json!({}))).await;
    assert_eq!(summary(&w.next_change().await), pair("ADDED", "c"));

    // Without a version: the current state as ADDED first.
    let mut w0 = Watch::open(&c, &format!("{CMS}?watch=1")).await;
    let initial = [summary(&w0.next().await), summary(&w0.next().await)];
    assert_eq!(initial, [pair("ADDED", "b"), pair("ADDED", "c")]);
}

#[tokio::test]
async fn selector_transitions_become_deleted_and_added() {
    let server = start();
    let c = client(&server).await;
    let (_, o) = post(&c, CMS, cm("x", json!({"app": "web"}))).await;
    let mut w = Watch::open(
        &c,
        &format!(
            "{CMS}?watch=true&labelSelector=app%3Dweb&resourceVersion={}",
            rv_of(&o)
        ),
    )
    .await;
    let relabel = |app: &str| json!({"metadata": {"labels": {"app": app}}});
    let merge = "application/merge-patch+json";
    post(&c, CMS, cm("other", json!({"app": "db"}))).await;
    call(&c, "PATCH", &format!("{CMS}/x"), merge, Some(relabel("db"))).await;
    let e = w.next_change().await;
    assert_eq!(
        summary(&e),
        pair("DELETED", "x"),
        "leaving the selector: {e}"
    );
    assert_eq!(e["object"]["metadata"]["labels"]["app"], "db");
    call(
        &c,
        "PATCH",
        &format!("{CMS}/x"),
        merge,
        Some(relabel("web")),
    )
    .await;
    assert_eq!(summary(&w.next_change().await), pair("ADDED", "x"));
    call(
        &c,
        "PATCH",
        &format!("{CMS}/x"),
        merge,
        Some(json!({"data": {"k": "v3"}})),
    )
    .await;
    assert_eq!(summary(&w.next_change().await), pair("MODIFIED", "x"));
}

#[tokio::test]
async fn a_too_old_version_gets_http_200_and_one_in_stream_410() {
    let server = start();
    let c = client(&server).await;
    let (_, a) = post(&c, CMS, cm("a", json!({}))).await;
    post(&c, CMS, cm("b", json!({}))).await;
    server.compact();
    let mut w = Watch::open(
        &c,
        &format!("{CMS}?watch=true&resourceVersion={}", rv_of(&a)),
    )
    .await;
    let e = w.next().await;
    assert_eq!(e["type"], "ERROR");
    assert_eq!(
        e["object"],
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "The resourceVersion for the provided watch is too old.",
               "reason": "Expired", "code": 410})
    );
    assert_eq!(w.next_or_end().await, Err(End::Clean));
    // From the current version it is fine.
    let now = server.resource_version();
    let mut ok = Watch::open(&c, &format!("{CMS}?watch=true&resourceVersion={now}")).await;
    post(&c, CMS, cm("c", json!({}))).await;
    assert_eq!(summary(&ok.next_change().await), pair("ADDED", "c"));
}

#[tokio::test]
async fn the_event_window_bounds_replay() {
    let server = start_with(ApiOptions {
        event_window: 3,
        ..ApiOptions::default()
    });
    let c = client(&server).await;
    let (_, first) = post(&c, CMS, cm("a", json!({}))).await;
    for n in ["b", "c", "d", "e"] {
        post(&c, CMS, cm(n, json!({}))).await;
    }
    let mut w = Watch::open(
        &c,
        &format!("{CMS}?watch=true&resourceVersion={}", rv_of(&first)),
    )
    .await;
    assert_eq!(w.next().await["object"]["code"], 410);
}

#[tokio::test]
async fn bookmarks_arrive_periodically_and_before_a_timeout_closes_the_stream() {
    let server = start();
    let c = client(&server).await;
    let now = server.resource_version();
    let mut w = Watch::open(
        &c,
        &format!(
            "{CMS}?watch=true&resourceVersion={now}&allowWatchBookmarks=true&timeoutSeconds=1"
        ),
    )
    .await;
    let b = w.next().await;
    assert_eq!(b["type"], "BOOKMARK");
    assert_eq!(
        b["object"],
        json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"resourceVersion": now.to_string()}})
    );
    let mut last = None;
    let end = loop {
        match w.next_or_end().await {
            Ok(e) => last = Some(e),
            Err(end) => break end,
        }
    };
    assert_eq!(end, End::Clean, "timeoutSeconds ends the stream cleanly");
    assert_eq!(last.expect("events before the end")["type"], "BOOKMARK");

    // With bookmarks far apart, the one before closing is still sent.
    let slow = start_with(ApiOptions {
        bookmark_interval: Duration::from_secs(3600),
        ..ApiOptions::default()
    });
    let sc = client(&slow).await;
    let mut w = Watch::open(
        &sc,
        &format!(
            "{CMS}?watch=true&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds=1",
            slow.resource_version()
        ),
    )
    .await;
    assert_eq!(w.next().await["type"], "BOOKMARK");
    assert_eq!(w.next_or_end().await, Err(End::Clean));

    // Without allowWatchBookmarks none come: the first event is the change.
    let mut quiet = Watch::open(&c, &format!("{CMS}?watch=true&resourceVersion={now}")).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let bookmark intervals pass
    post(&c, CMS, cm("z", json!({}))).await;
    assert_eq!(quiet.next().await["type"], "ADDED");
}

#[tokio::test]
async fn streaming_list_ends_its_initial_events_with_an_annotated_bookmark() {
    let server = start();
    let c = client(&server).await;
    post(&c, CMS, cm("a", json!({}))).await;
    post(&c, CMS, cm("b", json!({}))).await;
    let mut w = Watch::open(
        &c,
        &format!("{CMS}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0&allowWatchBookmarks=true"),
    )
    .await;
    assert_eq!(summary(&w.next().await), pair("ADDED", "a"));
    assert_eq!(summary(&w.next().await), pair("ADDED", "b"));
    let b = w.next().await;
    assert_eq!(b["type"], "BOOKMARK");
    assert_eq!(
        b["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
}

#[tokio::test]
async fn put_with_a_stale_resource_version_is_a_conflict() {
    let server = start();
    let c = client(&server).await;
    let leases = "/apis/coordination.k8s.io/v1/namespaces/t/leases";
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}});
    let (code, created) = post(&c, leases, lease).await;
    assert_eq!(code, 201);
    let mut mine = created.clone();
    mine["spec"]["holderIdentity"] = json!("b");
    let (code, won) = put(&c, &format!("{leases}/leader"), mine.clone()).await;
    assert_eq!(code, 200);
    assert!(rv_of(&won) > rv_of(&created));
    // A second writer holding the old version loses.
    mine["spec"]["holderIdentity"] = json!("c");
    let (code, status) = put(&c, &format!("{leases}/leader"), mine).await;
    assert_eq!(code, 409);
    assert_eq!(status["reason"], "Conflict");
    assert_eq!(status["kind"], "Status");
    assert_eq!(
        server
            .get("coordination.k8s.io/v1", "Lease", Some("t"), "leader")
            .unwrap()["spec"]["holderIdentity"],
        "b"
    );
}

#[tokio::test]
async fn status_subresource_and_generation_rules() {
    let server = start();
    let c = client(&server).await;
    let deps = "/apis/apps/v1/namespaces/t/deployments";
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                   "spec": {"replicas": 1}, "status": {"replicas": 7}});
    let (_, d) = post(&c, deps, d).await;
    assert_eq!(d["metadata"]["generation"], 1);
    // Main endpoint: status changes are ignored; a spec change bumps generation.
    let mut main = d.clone();
    main["spec"]["replicas"] = json!(2);
    main["status"] = json!({"replicas": 99});
    let (_, after) = put(&c, &format!("{deps}/d"), main).await;
    assert_eq!(after["spec"]["replicas"], 2);
    assert_ne!(after["status"]["replicas"], 99);
    assert_eq!(after["metadata"]["generation"], 2);
    // /status: only status changes, generation stays.
    let mut st = after.clone();
    st["spec"]["replicas"] = json!(5);
    st["status"] = json!({"replicas": 2});
    let (code, after) = put(&c, &format!("{deps}/d/status"), st).await;
    assert_eq!(code, 200);
    assert_eq!(after["status"]["replicas"], 2);
    assert_eq!(after["spec"]["replicas"], 2);
    assert_eq!(after["metadata"]["generation"], 2);
    // A label change is metadata: no generation bump.
    let (_, after) = call(
        &c,
        "PATCH",
        &format!("{deps}/d"),
        "application/merge-patch+json",
        Some(json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await;
    assert_eq!(after["metadata"]["generation"], 2);
    // Status patch through the main endpoint is dropped.
    let (_, after) = call(
        &c,
        "PATCH",
        &format!("{deps}/d"),
        "application/merge-patch+json",
        Some(json!({"status": {"replicas": 42}})),
    )
    .await;
    assert_eq!(after["status"]["replicas"], 2);
    // A kind without the subresource: status is ordinary, every non-metadata change counts.
    let (_, m) = post(&c, CMS, cm("g", json!({}))).await;
    let (_, m2) = call(
        &c,
        "PATCH",
        &format!("{CMS}/g"),
        "application/merge-patch+json",
        Some(json!({"data": {"k": "other"}})),
    )
    .await;
    assert_eq!(m["metadata"]["generation"], 1);
    assert_eq!(m2["metadata"]["generation"], 2);
    // An unchanged write is not a new version.
    let (_, m3) = put(&c, &format!("{CMS}/g"), m2.clone()).await;
    assert_eq!(rv_of(&m3), rv_of(&m2));
}

#[tokio::test]
async fn deleting_an_owner_collects_its_dependents_unless_orphaned() {
    let server = start();
    let c = client(&server).await;
    let (_, owner) = post(&c, CMS, cm("owner", json!({}))).await;
    let owned = |name: &str| {
        let mut d = cm(name, json!({}));
        d["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "ConfigMap",
            "name": "owner", "uid": owner["metadata"]["uid"], "controller": true}]);
        d
    };
    post(&c, CMS, owned("child")).await;
    let (_, grandchild_owner) = get(&c, &format!("{CMS}/child")).await;
    let mut gc = cm("grandchild", json!({}));
    gc["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "ConfigMap",
        "name": "child", "uid": grandchild_owner["metadata"]["uid"]}]);
    post(&c, CMS, gc).await;
    let mut w = Watch::open(
        &c,
        &format!(
            "{CMS}?watch=true&resourceVersion={}",
            server.resource_version()
        ),
    )
    .await;
    let (code, _) = call(
        &c,
        "DELETE",
        &format!("{CMS}/owner"),
        "application/json",
        None,
    )
    .await;
    assert_eq!(code, 200);
    let mut deleted = Vec::new();
    for _ in 0..3 {
        deleted.push(summary(&w.next_change().await));
    }
    assert_eq!(
        deleted,
        [
            pair("DELETED", "owner"),
            pair("DELETED", "child"),
            pair("DELETED", "grandchild")
        ]
    );
    assert_eq!(get(&c, &format!("{CMS}/grandchild")).await.0, 404);

    // Orphan: the dependent stays and loses the reference.
    let (_, owner) = post(&c, CMS, cm("owner2", json!({}))).await;
    let mut d = cm("kept", json!({}));
    d["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "ConfigMap",
        "name": "owner2", "uid": owner["metadata"]["uid"]}]);
    post(&c, CMS, d).await;
    let (code, _) = call(
        &c,
        "DELETE",
        &format!("{CMS}/owner2?propagationPolicy=Orphan"),
        "application/json",
        None,
    )
    .await;
    assert_eq!(code, 200);
    let (code, kept) = get(&c, &format!("{CMS}/kept")).await;
    assert_eq!(code, 200);
    assert!(
        kept["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(|r| r.is_empty())
    );
}

#[tokio::test]
async fn finalizers_hold_a_delete_until_removed() {
    let server = start();
    let c = client(&server).await;
    let mut o = cm("f", json!({}));
    o["metadata"]["finalizers"] = json!(["example.com/hold"]);
    post(&c, CMS, o).await;
    let (code, marked) = call(&c, "DELETE", &format!("{CMS}/f"), "application/json", None).await;
    assert_eq!(code, 200);
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(
        get(&c, &format!("{CMS}/f")).await.0,
        200,
        "still there while finalized"
    );
    let mut w = Watch::open(
        &c,
        &format!("{CMS}?watch=true&resourceVersion={}", rv_of(&marked)),
    )
    .await;
    call(
        &c,
        "PATCH",
        &format!("{CMS}/f"),
        "application/merge-patch+json",
        Some(json!({"metadata": {"finalizers": null}})),
    )
    .await;
    assert_eq!(summary(&w.next_change().await), pair("DELETED", "f"));
    assert_eq!(get(&c, &format!("{CMS}/f")).await.0, 404);
}

#[tokio::test]
async fn creating_in_a_missing_namespace_is_not_found_and_names_are_checked() {
    let server = start();
    let c = client(&server).await;
    let mut elsewhere = cm("a", json!({}));
    elsewhere["metadata"]["namespace"] = json!("nope");
    let (code, s) = post(&c, "/api/v1/namespaces/nope/configmaps", elsewhere).await;
    assert_eq!((code, s["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(s["message"], "namespaces \"nope\" not found");
    let (code, s) = post(&c, CMS, cm("a", json!({}))).await;
    assert_eq!(code, 201, "{s}");
    let (code, s) = post(&c, CMS, cm("a", json!({}))).await;
    assert_eq!((code, s["reason"].as_str()), (409, Some("AlreadyExists")));
    let mut generated = cm("", json!({}));
    generated["metadata"]["generateName"] = json!("gen-");
    let (code, g) = post(&c, CMS, generated).await;
    assert_eq!(code, 201);
    assert!(g["metadata"]["name"].as_str().unwrap().starts_with("gen-"));
    let (code, s) = post(&c, CMS, cm("Bad_Name", json!({}))).await;
    assert_eq!((code, s["reason"].as_str()), (422, Some("Invalid")));
}

#[tokio::test]
async fn services_get_distinct_cluster_ips_from_the_range() {
    let server = start_with(ApiOptions {
        service_cidr: "10.99.0.0/29".into(),
        ..ApiOptions::default()
    });
    let c = client(&server).await;
    let svcs = "/api/v1/namespaces/t/services";
    let svc = |name: &str, ip: Option<&str>| {
        let mut s = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                           "spec": {"ports": [{"port": 80}]}});
        if let Some(ip) = ip {
            s["spec"]["clusterIP"] = json!(ip);
        }
        s
    };
    let mut ips = Vec::new();
    for n in ["a", "b", "c"] {
        let (code, s) = post(&c, svcs, svc(n, None)).await;
        assert_eq!(code, 201, "{s}");
        let ip = s["spec"]["clusterIP"].as_str().unwrap().to_string();
        assert_eq!(s["spec"]["clusterIPs"], json!([ip]));
        assert!(ip.starts_with("10.99.0."), "{ip} in the range");
        ips.push(ip);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "never the same IP twice while taken");
    let (_, h) = post(&c, svcs, svc("headless", Some("None"))).await;
    assert_eq!(h["spec"]["clusterIP"], "None");
    let (code, s) = post(&c, svcs, svc("dup", Some(&ips[0]))).await;
    assert_eq!((code, s["reason"].as_str()), (422, Some("Invalid")));
    // The range has 6 hosts: after three more it is full.
    for n in ["d", "e", "f"] {
        assert_eq!(post(&c, svcs, svc(n, None)).await.0, 201);
    }
    assert_ne!(post(&c, svcs, svc("g", None)).await.0, 201);
}

#[tokio::test]
async fn requests_without_a_known_token_are_unauthorized() {
    let server = start();
    let ca = std::env::temp_dir().join(format!("kubeapi-http-ca-{}", std::process::id()));
    std::fs::write(&ca, server.ca_pem()).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(&ca)
        .args([
            "-H",
            "Authorization: Bearer wrong",
            &format!("{}/api/v1/namespaces", server.url()),
        ])
        .output()
        .expect("curl runs");
    let _ = std::fs::remove_file(&ca);
    let status: Value = serde_json::from_slice(&out.stdout).expect("a Status body");
    assert_eq!(
        (status["code"].as_u64(), status["reason"].as_str()),
        (Some(401), Some("Unauthorized"))
    );
}

#[tokio::test]
async fn hooks_take_the_api_down_and_back_with_its_state_and_inject_failures() {
    let server = start();
    let url = server.url();
    let c = client(&server).await;
    post(&c, CMS, cm("kept", json!({}))).await;
    let mut open = Watch::open(
        &c,
        &format!(
            "{CMS}?watch=true&resourceVersion={}",
            server.resource_version()
        ),
    )
    .await;
    server.go_down();
    assert!(
        open.next_or_end().await.is_err(),
        "open connections are cut"
    );
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "connections are refused while down"
    );
    server.come_back();
    assert_eq!(server.url(), url);
    let deadline = Instant::now() + PATIENCE;
    let c2 = client(&server).await;
    let kept = loop {
        let req = Request::get(format!("{CMS}/kept"))
            .body(kube::client::Body::empty())
            .unwrap();
        match c2.send(req).await {
            Ok(r) => break r.status().as_u16(),
            Err(e) => assert!(Instant::now() < deadline, "not back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(kept, 200, "same state after coming back");

    server.fail_requests(
        RequestMatch {
            method: Some("GET".into()),
            path_prefix: "/api/v1/namespaces/t/configmaps".into(),
        },
        503,
    );
    let (code, s) = get(&c2, &format!("{CMS}/kept")).await;
    assert_eq!(
        (code, s["reason"].as_str()),
        (503, Some("ServiceUnavailable"))
    );
    assert_eq!(
        get(&c2, "/api/v1/namespaces/t").await.0,
        200,
        "other paths unaffected"
    );
    server.clear_hooks();
    assert_eq!(get(&c2, &format!("{CMS}/kept")).await.0, 200);
    let log = server.requests();
    assert!(
        log.iter()
            .any(|r| r.code == 503 && r.user == "admin" && r.path.ends_with("/kept"))
    );
}

#[tokio::test]
async fn held_requests_wait_until_cleared() {
    let server = start();
    let c = client(&server).await;
    server.hold_requests(RequestMatch {
        method: None,
        path_prefix: CMS.into(),
    });
    let c2 = c.clone();
    let held = tokio::spawn(async move { get(&c2, CMS).await.0 });
    // Another path is served meanwhile; the held one is not.
    assert_eq!(get(&c, "/api/v1/namespaces").await.0, 200);
    assert!(!held.is_finished());
    server.clear_hooks();
    assert_eq!(
        tokio::time::timeout(PATIENCE, held).await.unwrap().unwrap(),
        200
    );
}

#[tokio::test]
async fn drop_watches_ends_streams_cleanly_or_cuts_them() {
    let server = start();
    let c = client(&server).await;
    let rv = server.resource_version();
    let uri = format!("{CMS}?watch=true&resourceVersion={rv}");
    let mut w = Watch::open(&c, &uri).await;
    server.drop_watches(true);
    assert_eq!(w.next_or_end().await, Err(End::Clean));
    let mut w = Watch::open(&c, &uri).await;
    server.drop_watches(false);
    assert_eq!(w.next_or_end().await, Err(End::Cut));
}

/// Tests drop watches and then change what the client must miss (and re-list to learn): a
/// dropped watch sends no event and no bookmark made after `drop_watches` returned, however
/// the stream task and the change interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_sends_nothing_made_after_the_drop() {
    let server = start_with(ApiOptions {
        bookmark_interval: Duration::from_millis(1),
        ..ApiOptions::default()
    });
    let c = client(&server).await;
    for i in 0..200 {
        let rv = server.resource_version();
        let uri = format!("{CMS}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true");
        let mut w = Watch::open(&c, &uri).await;
        // Live events in flight when the drop comes.
        for j in 0..5 {
            server
                .create(cm(&format!("before-{i}-{j}"), json!({})))
                .unwrap();
        }
        let clean = i % 2 == 0;
        server.drop_watches(clean);
        let dropped_at = server.resource_version();
        server.create(cm(&format!("after-{i}"), json!({}))).unwrap();
        loop {
            match w.next_or_end().await {
                Ok(ev) => {
                    let at = rv_of(&ev["object"]);
                    assert!(
                        at <= dropped_at,
                        "round {i}: {} at version {at}, after the drop at {dropped_at}: {ev}",
                        ev["type"]
                    );
                }
                Err(end) => {
                    let want = if clean { End::Clean } else { End::Cut };
                    assert_eq!(end, want, "round {i}");
                    break;
                }
            }
        }
    }
}

#[tokio::test]
async fn custom_resources_are_served_in_every_version_with_a_status_subresource() {
    let server = start();
    server.install_mesh_crds().unwrap();
    let c = client(&server).await;
    let v1 = "/apis/gateway.networking.k8s.io/v1/namespaces/t/gateways";
    let gw = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                    "metadata": {"name": "w"}, "spec": {"gatewayClassName": "x"}});
    let (code, created) = post(&c, v1, gw).await;
    assert_eq!(code, 201, "{created}");
    let (code, beta) = get(
        &c,
        "/apis/gateway.networking.k8s.io/v1beta1/namespaces/t/gateways/w",
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(beta["apiVersion"], "gateway.networking.k8s.io/v1beta1");
    let (code, _) = call(
        &c,
        "PATCH",
        &format!("{v1}/w/status"),
        "application/merge-patch+json",
        Some(json!({"status": {"conditions": [{"type": "Accepted", "status": "True"}]}})),
    )
    .await;
    assert_eq!(code, 200);
    let (_, now) = get(&c, &format!("{v1}/w")).await;
    assert_eq!(now["status"]["conditions"][0]["type"], "Accepted");
    assert_eq!(now["metadata"]["generation"], 1);
    let (code, _) = get(
        &c,
        "/apis/gateway.networking.k8s.io/v1alpha9/namespaces/t/gateways",
    )
    .await;
    assert_eq!(code, 404);
    // Deleting the CRD takes its kind and objects away.
    let crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
    assert_eq!(
        call(
            &c,
            "DELETE",
            &format!("{crds}/gateways.gateway.networking.k8s.io"),
            "application/json",
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(get(&c, v1).await.0, 404);
}

#[tokio::test]
async fn server_side_apply_needs_a_field_manager_and_creates() {
    let server = start();
    let c = client(&server).await;
    let uri = format!("{CMS}/applied");
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"a": "1"}});
    let (code, s) = call(
        &c,
        "PATCH",
        &uri,
        "application/apply-patch+yaml",
        Some(body.clone()),
    )
    .await;
    assert_eq!((code, s["reason"].as_str()), (400, Some("BadRequest")));
    let (code, created) = call(
        &c,
        "PATCH",
        &format!("{uri}?fieldManager=meshd&force=true"),
        "application/apply-patch+yaml",
        Some(body),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["data"]["a"], "1");
    assert_eq!(created["metadata"]["managedFields"][0]["manager"], "meshd");
}

#[tokio::test]
async fn token_request_and_review_round_trip_and_authenticate() {
    let server = start();
    let c = client(&server).await;
    post(
        &c,
        "/api/v1/namespaces/t/serviceaccounts",
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "zt"}}),
    )
    .await;
    let (_, pod) = post(&c, "/api/v1/namespaces/t/pods", json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "zt-1"}, "spec": {"nodeName": "n1", "serviceAccountName": "zt", "containers": []}})).await;
    let (code, tr) = post(
        &c,
        "/api/v1/namespaces/t/serviceaccounts/zt/token",
        json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["mesh-ca"], "expirationSeconds": 3600,
                 "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "zt-1"}}}),
    )
    .await;
    assert_eq!(code, 201, "{tr}");
    let token = tr["status"]["token"].as_str().unwrap().to_string();
    assert!(tr["status"]["expirationTimestamp"].is_string());
    let (code, review) = post(
        &c,
        "/apis/authentication.k8s.io/v1/tokenreviews",
        json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": token, "audiences": ["mesh-ca"]}}),
    )
    .await;
    assert_eq!(code, 201);
    let st = &review["status"];
    assert_eq!(st["authenticated"], true, "{review}");
    assert_eq!(st["user"]["username"], "system:serviceaccount:t:zt");
    assert_eq!(
        st["user"]["extra"]["authentication.kubernetes.io/pod-uid"],
        json!([pod["metadata"]["uid"]])
    );
    assert_eq!(
        st["user"]["extra"]["authentication.kubernetes.io/node-name"],
        json!(["n1"])
    );
    // The token authenticates requests as the service account (and its pod).
    let kc = server.kubeconfig_for(&token).unwrap();
    let sa_client = client_for(&kc).await;
    assert_eq!(get(&sa_client, CMS).await.0, 200);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.user == "system:serviceaccount:t:zt" && r.pod.as_deref() == Some("zt-1"))
    );
    // A token for a pod that does not exist is refused.
    let (code, _) = post(
        &c,
        "/api/v1/namespaces/t/serviceaccounts/zt/token",
        json!({
        "spec": {"boundObjectRef": {"kind": "Pod", "name": "ghost"}}}),
    )
    .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn malformed_requests_get_status_errors() {
    let server = start();
    let c = client(&server).await;
    let req = Request::post(CMS)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(b"{not json".to_vec()))
        .unwrap();
    let resp = c.send(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let big = vec![b' '; 4 * 1024 * 1024];
    let req = Request::post(CMS)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(big))
        .unwrap();
    let resp = c.send(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert_eq!(get(&c, "/apis/nope.example.com/v1/things").await.0, 404);
    assert_eq!(
        call(
            &c,
            "PATCH",
            &format!("{CMS}/x"),
            "text/plain",
            Some(json!({}))
        )
        .await
        .0,
        404
    );
    post(&c, CMS, cm("x", json!({}))).await;
    assert_eq!(
        call(
            &c,
            "PATCH",
            &format!("{CMS}/x"),
            "text/plain",
            Some(json!({}))
        )
        .await
        .0,
        415
    );
    // A timeout no clock can add is no timeout, not a crash.
    let huge = format!(
        "{CMS}?watch=true&timeoutSeconds={}&resourceVersion={}",
        u64::MAX,
        server.resource_version()
    );
    let mut w = Watch::open(&c, &huge).await;
    post(&c, CMS, cm("after-huge", json!({}))).await;
    assert_eq!(summary(&w.next_change().await).1, "after-huge");
    // Bodies shaped to make the server write into a non-object: refused, connection intact.
    let (code, _) = post(&c, CMS, json!({"kind": "ConfigMap", "metadata": "x"})).await;
    assert_eq!(code, 400);
    let (code, _) = call(
        &c,
        "PATCH",
        &format!("{CMS}/x?fieldManager=m"),
        "application/apply-patch+yaml",
        Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": 5})),
    )
    .await;
    assert_eq!(code, 400);
    post(
        &c,
        "/api/v1/namespaces/t/serviceaccounts",
        json!({"metadata": {"name": "sa"}}),
    )
    .await;
    let (code, _) = post(
        &c,
        "/api/v1/namespaces/t/serviceaccounts/sa/token",
        json!({"spec": [1]}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        get(&c, &format!("{CMS}?watch=true&resourceVersion=abc"))
            .await
            .0,
        400
    );
}
