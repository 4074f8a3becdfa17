//! Conformance of the API server double against kube-rs 5's own client, watcher and reflector:
//! what meshd meets must behave as a real API server does for list, watch, bookmarks, the
//! in-stream 410 relist, selectors, the status subresource, optimistic concurrency and
//! server-side apply. Each test runs its own double (dropped at the end).

mod kubeapi_support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kubeapi_support::*;
use serde_json::json;
use testbed::kubeapi::RequestMatch;

const T: Duration = Duration::from_secs(10);

fn cm_state(server: &testbed::kubeapi::ApiServer) -> BTreeMap<String, String> {
    server_state(server, "v1", "ConfigMap", |_| true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_lists_then_follows_adds_modifies_and_deletes() {
    let server = start();
    for i in 0..3 {
        server
            .create(configmap(&format!("pre-{i}"), json!({}), "0"))
            .unwrap();
    }
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, NS);
    let r = Reflected::spawn(api, watcher::Config::default());
    r.ready().await;
    assert_eq!(r.state(), cm_state(&server), "initial list");
    assert_eq!(r.count(&Seen::Init), 1);

    server.create(configmap("live", json!({}), "1")).unwrap();
    server
        .put(configmap("pre-0", json!({}), "changed"))
        .unwrap();
    server.delete("v1", "ConfigMap", Some(NS), "pre-1").unwrap();
    wait_for(T, "store = server", || r.state() == cm_state(&server)).await;
    let live: Vec<Seen> = r
        .seen()
        .into_iter()
        .skip_while(|s| *s != Seen::InitDone)
        .skip(1)
        .filter(|s| !matches!(s, Seen::Error(_)))
        .collect();
    assert_eq!(
        live,
        vec![
            Seen::Apply("live".into()),
            Seen::Apply("pre-0".into()),
            Seen::Delete("pre-1".into())
        ]
    );
    let stored = r
        .store
        .state()
        .into_iter()
        .find(|c| c.name_any() == "pre-0")
        .and_then(|c| c.data.clone())
        .unwrap_or_default();
    assert_eq!(stored.get("v").map(String::as_str), Some("changed"));
    drop(r);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_page_size_lists_everything_in_pages() {
    let server = start();
    for i in 0..23 {
        server
            .create(configmap(&format!("cm-{i:02}"), json!({}), "x"))
            .unwrap();
    }
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, NS);
    let r = Reflected::spawn(api, watcher::Config::default().page_size(5));
    r.ready().await;
    assert_eq!(r.state(), cm_state(&server));
    assert_eq!(r.state().len(), 23);
    let lists: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|q| q.method == "GET" && q.path.ends_with("/configmaps"))
        .filter(|q| !q.query.contains("watch=true") && !q.query.contains("watch=1"))
        .collect();
    assert_eq!(lists.len(), 5, "23 objects in pages of 5: {lists:?}");
    assert!(lists.iter().all(|q| q.query.contains("limit=5")));
    assert_eq!(
        lists
            .iter()
            .filter(|q| q.query.contains("continue="))
            .count(),
        4
    );
    drop(r);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_carry_the_resource_version_forward_without_events() {
    let server = start();
    server.create(configmap("a", json!({}), "1")).unwrap();
    let client = client(&server).await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let start_rv = server.resource_version().to_string();
    let mut wp = WatchParams::default().timeout(30);
    wp.bookmarks = true;
    let mut stream = api.watch(&wp, &start_rv).await.unwrap().boxed();
    // Writes to another kind move the global resourceVersion; a ConfigMap watch sees them
    // only as bookmarks.
    for i in 0..3 {
        server.create(pod(&format!("p{i}"), Some("n1"))).unwrap();
    }
    let moved_to = server.resource_version();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let ev = tokio::time::timeout_at(deadline, stream.try_next())
            .await
            .expect("a bookmark past the pod writes within 10 s")
            .expect("watch stream healthy")
            .expect("watch stream open");
        match ev {
            WatchEvent::Bookmark(b) => {
                assert_eq!(b.types.kind, "ConfigMap");
                let rv: u64 = b.metadata.resource_version.parse().expect("numeric RV");
                if rv >= moved_to {
                    break;
                }
            }
            other => panic!("only bookmarks expected, got {other:?}"),
        }
    }

    // kube's watcher resumes from the bookmarked version: after compaction, no relist. Its
    // watches time out after 1 s, so it re-watches from whatever version it has.
    let r = Reflected::spawn(api, watcher::Config::default().timeout(1));
    r.ready().await;
    for i in 3..6 {
        server.create(pod(&format!("p{i}"), Some("n1"))).unwrap();
    }
    let moved_to = server.resource_version();
    wait_for(T, "a re-watch from a version past the pod writes", || {
        server.requests().iter().any(|q| {
            q.path.ends_with("/configmaps")
                && q.query.contains("watch=")
                && rv_of(&q.query).is_some_and(|rv| rv >= moved_to)
        })
    })
    .await;
    let inits = r.count(&Seen::Init);
    server.compact();
    server.drop_watches(true);
    server.create(configmap("after", json!({}), "1")).unwrap();
    wait_for(T, "the new object", || r.state() == cm_state(&server)).await;
    assert_eq!(
        r.count(&Seen::Init),
        inits,
        "a bookmarked watcher needs no relist"
    );
    drop(r);
    stop(server).await;
}

fn rv_of(query: &str) -> Option<u64> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_watch_relists_in_stream_with_no_spurious_deletion() {
    let server = start();
    for i in 0..5 {
        server
            .create(configmap(&format!("cm-{i}"), json!({}), "0"))
            .unwrap();
    }
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, NS);
    let r = Reflected::spawn(api, watcher::Config::default().disable_bookmarks());
    r.ready().await;

    // The watcher falls behind: its re-watch waits while the objects change and the history
    // it would resume from is compacted away.
    let watches = RequestMatch {
        method: Some("GET".into()),
        path_prefix: format!("/api/v1/namespaces/{NS}/configmaps"),
    };
    server.hold_requests(watches);
    server.drop_watches(true);
    server.put(configmap("cm-0", json!({}), "changed")).unwrap();
    server.delete("v1", "ConfigMap", Some(NS), "cm-1").unwrap();
    server.create(configmap("new", json!({}), "1")).unwrap();
    server.compact();
    server.clear_hooks();

    wait_for(T, "store = server after the relist", || {
        r.state() == cm_state(&server)
    })
    .await;
    assert_eq!(
        r.count(&Seen::Init),
        2,
        "the 410 made the watcher relist: {:?}",
        r.seen()
    );
    let http_410 = server
        .requests()
        .into_iter()
        .filter(|q| q.path.ends_with("/configmaps") && q.code == 410)
        .count();
    assert_eq!(
        http_410, 0,
        "an expired watch is answered 200, the 410 in-stream"
    );
    let in_stream = r.seen().into_iter().any(
        |s| matches!(s, Seen::Error(e) if e.contains("during watch") && e.contains("too old")),
    );
    assert!(
        in_stream,
        "the watcher met the 410 as a watch event: {:?}",
        r.seen()
    );
    // A relist replaces the store at InitDone; nothing that exists is ever reported deleted.
    let existing = cm_state(&server);
    for name in r.deleted() {
        assert!(
            !existing.contains_key(&name),
            "{name} reported deleted but exists"
        );
    }
    drop(r);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_watchers_see_objects_enter_and_leave() {
    let server = start();
    server
        .create(configmap("in", json!({"app":"x"}), "1"))
        .unwrap();
    server
        .create(configmap("out", json!({"app":"y"}), "1"))
        .unwrap();
    server.create(pod("on-n1", Some("n1"))).unwrap();
    server.create(pod("on-n2", Some("n2"))).unwrap();
    server.create(pod("unscheduled", None)).unwrap();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::all(client);
    let by_label = Reflected::spawn(cms, watcher::Config::default().labels("app=x"));
    let by_node = Reflected::spawn(pods, watcher::Config::default().fields("spec.nodeName=n1"));
    by_label.ready().await;
    by_node.ready().await;
    let labelled =
        |app: &'static str| move |o: &serde_json::Value| o["metadata"]["labels"]["app"] == app;
    assert_eq!(
        by_label.state(),
        server_state(&server, "v1", "ConfigMap", labelled("x"))
    );
    assert_eq!(by_label.state().keys().collect::<Vec<_>>(), ["in"]);
    assert_eq!(by_node.state().keys().collect::<Vec<_>>(), ["on-n1"]);

    // Relabelling moves objects in and out; scheduling a pod to n1 brings it in.
    server
        .put(configmap("in", json!({"app":"z"}), "1"))
        .unwrap();
    server
        .put(configmap("out", json!({"app":"x"}), "1"))
        .unwrap();
    server.put(pod("unscheduled", Some("n1"))).unwrap();
    server.delete("v1", "Pod", Some(NS), "on-n2").unwrap();
    wait_for(T, "label watcher follows", || {
        by_label.state().keys().collect::<Vec<_>>() == ["out"]
    })
    .await;
    wait_for(T, "node watcher follows", || {
        by_node.state().keys().collect::<Vec<_>>() == ["on-n1", "unscheduled"]
    })
    .await;
    assert_eq!(
        by_label.deleted(),
        ["in"],
        "leaving the selector is a deletion"
    );
    assert!(by_label.seen().contains(&Seen::Apply("out".into())));
    assert!(
        by_node.deleted().is_empty(),
        "n2's pod was never seen: {:?}",
        by_node.seen()
    );
    assert!(by_node.seen().contains(&Seen::Apply("unscheduled".into())));
    drop((by_label, by_node));
    stop(server).await;
}

fn deployment(replicas: i32) -> serde_json::Value {
    json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d","namespace":NS},
           "spec":{"replicas":replicas,"selector":{"matchLabels":{"app":"d"}},
                   "template":{"metadata":{"labels":{"app":"d"}},
                               "spec":{"containers":[{"name":"app","image":"app:1"}]}}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_subresource_and_generation() {
    let server = start();
    let api: Api<Deployment> = Api::namespaced(client(&server).await, NS);
    let d: Deployment = serde_json::from_value(deployment(1)).unwrap();
    let created = api.create(&PostParams::default(), &d).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));

    let patch = json!({"status":{"replicas":1,"readyReplicas":1,"observedGeneration":1}});
    let st = api
        .patch_status("d", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(st.status.as_ref().and_then(|s| s.ready_replicas), Some(1));
    assert_eq!(
        st.metadata.generation,
        Some(1),
        "status writes keep the generation"
    );

    // The main endpoint ignores status; a spec change bumps the generation.
    let mut changed = st.clone();
    changed.spec.as_mut().unwrap().replicas = Some(3);
    changed.status.as_mut().unwrap().ready_replicas = Some(7);
    let after = api
        .replace("d", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_eq!(after.metadata.generation, Some(2));
    assert_eq!(
        after.status.as_ref().and_then(|s| s.ready_replicas),
        Some(1)
    );

    // /status ignores everything but status.
    let mut st2 = after.clone();
    st2.spec.as_mut().unwrap().replicas = Some(9);
    st2.status.as_mut().unwrap().ready_replicas = Some(3);
    let fin = api
        .replace_status("d", &PostParams::default(), &st2)
        .await
        .unwrap();
    assert_eq!(fin.spec.as_ref().and_then(|s| s.replicas), Some(3));
    assert_eq!(fin.status.as_ref().and_then(|s| s.ready_replicas), Some(3));
    assert_eq!(fin.metadata.generation, Some(2));
    stop(server).await;
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replace_with_a_stale_resource_version_conflicts() {
    let server = start();
    server.create(configmap("c", json!({}), "1")).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, NS);
    let read = api.get("c").await.unwrap();
    server
        .put(configmap("c", json!({}), "someone else"))
        .unwrap();
    let mut mine = read.clone();
    mine.data = Some([("v".to_string(), "mine".to_string())].into());
    let err = api
        .replace("c", &PostParams::default(), &mine)
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(409), "{err}");
    let now = server.get("v1", "ConfigMap", Some(NS), "c").unwrap();
    assert_eq!(now["data"]["v"], "someone else");
    // Re-read, re-apply: accepted.
    let mut fresh = api.get("c").await.unwrap();
    fresh.data = Some([("v".to_string(), "mine".to_string())].into());
    api.replace("c", &PostParams::default(), &fresh)
        .await
        .unwrap();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_creates_updates_and_detects_conflicts() {
    let server = start();
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, NS);
    let cfg = |k: &str, v: &str| {
        json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"s","namespace":NS},
               "data":{k: v}})
    };
    let meshd = PatchParams::apply("meshd").force();
    let created = api
        .patch("s", &meshd, &Patch::Apply(cfg("a", "1")))
        .await
        .unwrap();
    assert_eq!(
        created.data.unwrap().get("a").map(String::as_str),
        Some("1")
    );
    let mf = created.metadata.managed_fields.unwrap_or_default();
    assert_eq!(mf.len(), 1);
    assert_eq!(mf[0].manager.as_deref(), Some("meshd"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));

    // Re-applying without `a` removes it (meshd alone set it).
    let updated = api
        .patch("s", &meshd, &Patch::Apply(cfg("b", "2")))
        .await
        .unwrap();
    let data = updated.data.unwrap_or_default();
    assert_eq!(data.get("b").map(String::as_str), Some("2"));
    assert!(!data.contains_key("a"), "{data:?}");

    // Another manager changing meshd's field without force: 409; with force: it moves.
    let other = PatchParams::apply("other");
    let err = api
        .patch("s", &other, &Patch::Apply(cfg("b", "3")))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(409), "{err}");
    assert!(
        err.to_string().contains("meshd"),
        "the conflict names the owner: {err}"
    );
    let forced = api
        .patch("s", &other.clone().force(), &Patch::Apply(cfg("b", "3")))
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap().get("b").map(String::as_str), Some("3"));
    let back = Patch::Apply(cfg("b", "2"));
    let err = api
        .patch("s", &PatchParams::apply("meshd"), &back)
        .await
        .unwrap_err();
    assert_eq!(
        api_code(&err),
        Some(409),
        "meshd now conflicts with the new owner"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_survives_cut_streams_and_an_outage() {
    let server = start();
    for i in 0..4 {
        server
            .create(configmap(&format!("cm-{i}"), json!({}), "0"))
            .unwrap();
    }
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, NS);
    let r = Reflected::spawn(api, watcher::Config::default());
    r.ready().await;

    server.drop_watches(false);
    server
        .put(configmap("cm-0", json!({}), "after cut"))
        .unwrap();
    server.delete("v1", "ConfigMap", Some(NS), "cm-1").unwrap();
    wait_for(T, "store = server after a cut stream", || {
        r.state() == cm_state(&server)
    })
    .await;

    server.go_down();
    server
        .put(configmap("cm-2", json!({}), "during outage"))
        .unwrap();
    server
        .create(configmap("cm-9", json!({}), "during outage"))
        .unwrap();
    server.come_back();
    wait_for(
        Duration::from_secs(30),
        "store = server after the outage",
        || r.state() == cm_state(&server),
    )
    .await;
    assert_eq!(
        r.deleted(),
        ["cm-1"],
        "only the deleted object: {:?}",
        r.seen()
    );
    drop(r);
    stop(server).await;
}

/// kube's raw watch sees ADDED for objects created after its version, and the stream ends
/// cleanly at `timeoutSeconds`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_watch_ends_at_its_timeout() {
    let server = start();
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, NS);
    let rv = server.resource_version().to_string();
    let mut stream = api
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    server.create(configmap("x", json!({}), "1")).unwrap();
    let mut added = Vec::new();
    let ended = tokio::time::timeout(T, async {
        while let Some(ev) = stream.next().await {
            if let Ok(WatchEvent::Added(c)) = ev {
                added.push(c.name_any());
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch ended at its timeout");
    assert_eq!(added, ["x"]);
    stop(server).await;
}
