//! meshd's Kubernetes source against the API server double: nothing is served before every
//! kind is listed in full; expired (410) and dropped watches and an outage never delete what
//! exists, and the published sets converge to the API; a CRD installed late is read; a bad
//! object is reported once and keeps its last good version.
//!
//! The tests run one at a time ([`serial`]): they read meshd's log, which is one per process.

mod common;
#[path = "common/kube.rs"]
mod kube_support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{DEADLINE, Meshd, request, wait_for};
use kube_support::*;
use meshcore::proto::config::config_service_client::ConfigServiceClient;
use meshcore::proto::config::{ConfigUpdate, SubscribeRequest};
use meshd::daemon::RunOptions;
use meshd::kube::kinds;
use meshd::kube::source::KubeSource;
use testbed::kubeapi::ApiServer;
use tonic::Streaming;

/// Re-lists and reconnections wait out kube's backoff (0.8 s doubling, with jitter).
const CONVERGE: Duration = Duration::from_secs(45);

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    logs(); // capture from the first test on
    SERIAL.lock().await
}

/// Where the log is now; [`logged_since`] counts only what comes after.
fn mark() -> usize {
    logs().lock().unwrap().len()
}

fn logged_since(mark: usize, parts: &[&str]) -> usize {
    let text = logs().lock().unwrap();
    text.get(mark..)
        .unwrap_or_default()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

/// The API path of a kind's collection.
fn path(k: &kinds::Kind) -> String {
    let r = &k.resource;
    if r.group.is_empty() {
        format!("/api/{}/{}", r.version, r.plural)
    } else {
        format!("/apis/{}/{}/{}", r.group, r.version, r.plural)
    }
}

/// Waits until every kind but `except` is being watched (its list done, its watch open).
async fn watched_except(api: &ApiServer, except: &str) {
    wait_for("every other kind to be listed and watched", || async {
        kinds::watched()
            .iter()
            .filter(|k| k.name() != except)
            .all(|k| {
                requests_to(api, &path(k))
                    .iter()
                    .any(|(w, c)| *w && *c == 200)
            })
    })
    .await;
}

/// Waits until the pods' watch is open and delivering (a watch is dropped only if open).
async fn pods_watched(api: &ApiServer, rec: &Recorder, marker: &str) {
    wait_for("the pods' watch to be open", || async {
        requests_to(api, "/api/v1/pods").last() == Some(&(true, 200))
    })
    .await;
    api.create(pod(marker, "node-d", "10.9.0.1")).unwrap();
    let key = format!("Pod/shop/{marker}");
    wait_for("an event through it", || async {
        rec.latest().contains(&key)
    })
    .await;
}

async fn converge(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < CONVERGE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_published_before_every_kind_is_listed() {
    let _serial = serial().await;
    let api = cluster(true);
    for i in 0..3 {
        api.create(pod(&format!("p{i}"), "node-a", &format!("10.1.0.{i}")))
            .unwrap();
    }
    api.create(service("web")).unwrap();
    api.create(policy("deny", "DENY")).unwrap();
    api.hold_requests(gets("/api/v1/pods"));
    let s = settings(&api);
    let client = meshd::kube::client(&s).await.unwrap();
    let start = tokio::spawn(async move { KubeSource::start(client, &s).await });
    watched_except(&api, "Pod").await;
    assert!(
        !start.is_finished(),
        "the source published before the pods were listed"
    );
    api.clear_hooks();
    let (_source, rx) = tokio::time::timeout(DEADLINE, start)
        .await
        .expect("the source did not start once the pods were listed")
        .unwrap()
        .unwrap();
    let first = keys(&rx.borrow());
    assert!(first.contains("Pod/shop/p2"), "{first:?}");
    assert_eq!(first, api_keys(&api), "the first set is the API's");
}

/// A source watching a cluster under a steady trickle of changes, with objects that exist all
/// along and some that are deleted while meshd does not see it (see [`Churned::finish`]).
struct Churned {
    api: Arc<ApiServer>,
    rec: Recorder,
    _source: KubeSource,
    /// Present all along: no published set may lack any of them.
    stable: BTreeSet<String>,
    stop: Arc<AtomicBool>,
    churn: std::thread::JoinHandle<()>,
}

const PODS: &str = "/api/v1/pods";

async fn churned() -> Churned {
    let api = Arc::new(cluster(true));
    for i in 0..20 {
        api.create(pod(&format!("s{i}"), "node-a", &format!("10.2.0.{i}")))
            .unwrap();
    }
    api.create(service("web")).unwrap();
    for i in 0..5 {
        api.create(policy(&format!("stable-{i}"), "DENY")).unwrap();
    }
    let stable = api_keys(&api);
    for i in 0..3 {
        api.create(pod(&format!("gone-{i}"), "node-b", &format!("10.3.0.{i}")))
            .unwrap();
    }
    api.create(policy("gone", "DENY")).unwrap();
    let (source, rx) = source(&api).await;
    let rec = Recorder::start(rx);
    assert!(rec.latest().contains("Pod/shop/gone-0"));
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (api, stop) = (api.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let _ = api.create(pod(&format!("churn-{i}"), "node-c", "10.4.0.1"));
                if i >= 3 {
                    let _ = api.delete("v1", "Pod", Some("shop"), &format!("churn-{}", i - 3));
                }
                let action = if i.is_multiple_of(2) { "DENY" } else { "ALLOW" };
                let _ = api.put(policy("churn", action));
                i += 1;
                // Pacing only (a steady trickle of events), not synchronization.
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    Churned {
        api,
        rec,
        _source: source,
        stable,
        stop,
        churn,
    }
}

impl Churned {
    /// Requests to list pods since request `after` answered `code`.
    fn lists(&self, after: usize, code: u16) -> usize {
        requests_to(&self.api, PODS)[after..]
            .iter()
            .filter(|(w, c)| !*w && *c == code)
            .count()
    }

    /// Ends every watch (`clean`ly, or cut) and, before they can resume, deletes `gone-<n>`
    /// (and at n = 0 the `gone` policy), creates a pod and compacts the history: the watches
    /// resume from a version that has expired (410), and only a re-list can tell what went.
    /// Returns the number of pods requests before.
    async fn expire_watches(&self, n: usize, clean: bool) -> usize {
        let api = &self.api;
        pods_watched(api, &self.rec, &format!("mark-{n}")).await;
        let before = requests_to(api, PODS).len();
        api.hold_requests(gets("/"));
        api.drop_watches(clean);
        api.delete("v1", "Pod", Some("shop"), &format!("gone-{n}"))
            .unwrap();
        if n == 0 {
            api.delete(
                "security.istio.io/v1",
                "AuthorizationPolicy",
                Some("shop"),
                "gone",
            )
            .unwrap();
        }
        api.create(pod(&format!("unseen-{n}"), "node-d", "10.9.0.2"))
            .unwrap();
        api.compact();
        api.clear_hooks();
        before
    }

    /// An outage during which `gone-2` is deleted and the history compacted.
    fn delete_during_outage(&self) {
        let api = &self.api;
        api.go_down();
        api.delete("v1", "Pod", Some("shop"), "gone-2").unwrap();
        api.compact();
        api.come_back();
    }

    /// Stops the churn; the published sets must converge to the API's and never have lacked
    /// a stable object.
    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.churn.join().unwrap();
        converge("the published set to equal the API's", || {
            self.rec.latest() == api_keys(&self.api)
        })
        .await;
        self.rec.assert_always_held(&self.stable);
        let last = self.rec.latest();
        assert!(!last.contains("Pod/shop/gone-0"), "{last:?}");
        assert!(!last.contains("AuthorizationPolicy/shop/gone"), "{last:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_dropped_watches_never_delete_what_exists() {
    let _serial = serial().await;
    let c = churned().await;
    // An expired history and dropped watches (a clean end, and a cut connection).
    for (n, clean) in [true, false].into_iter().enumerate() {
        let before = c.expire_watches(n, clean).await;
        converge("the pods to be re-listed", || c.lists(before, 200) > 0).await;
    }
    c.delete_during_outage();
    c.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_whose_lists_fail_keeps_what_was_listed() {
    let _serial = serial().await;
    let c = churned().await;
    let before = c.expire_watches(0, true).await;
    wait_for(
        "the pods' watch to resume (and learn it expired)",
        || async { requests_to(&c.api, PODS)[before..].iter().any(|(w, _)| *w) },
    )
    .await;
    // The watcher waits out its backoff before listing: time enough to make the lists fail.
    c.api.fail_requests(gets(PODS), 500);
    converge("two failed lists of pods", || c.lists(before, 500) >= 2).await;
    c.api.clear_hooks();
    c.finish().await;
}

fn uids(u: &ConfigUpdate) -> BTreeSet<String> {
    u.workloads.iter().map(|w| w.uid.clone()).collect()
}

async fn next(stream: &mut Streaming<ConfigUpdate>, within: Duration) -> ConfigUpdate {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("timed out waiting for a config update")
        .expect("stream failed")
        .expect("stream ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshd_serves_only_a_full_view_and_keeps_serving_while_the_api_is_down() {
    let _serial = serial().await;
    let api = cluster(true);
    api.create(pod("p0", "node-a", "10.5.0.1")).unwrap();
    api.create(pod("p1", "node-b", "10.5.0.2")).unwrap();
    api.create(service("p0")).unwrap();
    api.hold_requests(gets("/api/v1/pods"));
    let s = settings(&api);
    let starting = tokio::spawn(Meshd::start_with(&[], move |_| RunOptions {
        kube: Some(s),
        ..Default::default()
    }));
    watched_except(&api, "Pod").await;
    assert!(
        !starting.is_finished(),
        "meshd served before the pods were listed"
    );
    api.clear_hooks();
    let meshd = starting.await.unwrap();
    let mut client = ConfigServiceClient::new(meshd.channel().await);
    let token = meshd.token("node-a");
    let subscribe = || {
        request(
            SubscribeRequest {
                node: "node-a".into(),
                ..Default::default()
            },
            Some(&token),
        )
    };
    let mut stream = client.subscribe(subscribe()).await.unwrap().into_inner();
    let snap = next(&mut stream, DEADLINE).await;
    let both = BTreeSet::from(["shop/p0".to_string(), "shop/p1".to_string()]);
    assert_eq!(uids(&snap), both, "the first view is the full one");

    let m = mark();
    api.go_down();
    wait_for("meshd to notice the API is down", || async {
        logged_since(m, &["cannot watch Pod (v1)"]) > 0
    })
    .await;
    let mut late = client.subscribe(subscribe()).await.unwrap().into_inner();
    let snap2 = next(&mut late, DEADLINE).await;
    assert_eq!(
        uids(&snap2),
        both,
        "a node subscribing during the outage gets the last view"
    );
    // Changes made while meshd cannot see them arrive once the API is back.
    api.create(pod("p2", "node-a", "10.5.0.3")).unwrap();
    api.delete("v1", "Pod", Some("shop"), "p1").unwrap();
    api.come_back();
    let mut seen = BTreeSet::new();
    let mut removed = BTreeSet::new();
    while !(seen.contains("shop/p2") && removed.contains("shop/p1")) {
        let u = next(&mut stream, CONVERGE).await;
        seen.extend(uids(&u));
        removed.extend(u.removed_workloads.iter().cloned());
        assert!(!u.snapshot, "the stream was never reset: {u:?}");
    }
    assert!(!removed.contains("shop/p0"), "p0 was removed: {removed:?}");
    meshd.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_missing_at_start_is_reported_once_and_read_when_installed() {
    let _serial = serial().await;
    let api = cluster(false);
    api.create(pod("p0", "node-a", "10.6.0.1")).unwrap();
    let m = mark();
    let (_source, rx) = tokio::time::timeout(DEADLINE, source(&api))
        .await
        .expect("an absent CRD blocked the first publish");
    let rec = Recorder::start(rx);
    assert!(rec.latest().contains("Pod/shop/p0"));
    let missing = [
        "no AuthorizationPolicy CRD",
        "Istio's CRDs are not installed",
    ];
    assert_eq!(logged_since(m, &missing), 1, "{}", logs().lock().unwrap());
    api.install_mesh_crds().unwrap();
    api.create(policy("late", "DENY")).unwrap();
    converge("the policy of a CRD installed after start", || {
        rec.latest().contains("AuthorizationPolicy/shop/late")
    })
    .await;
    assert_eq!(logged_since(m, &missing), 1, "reported once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_object_is_reported_once_and_keeps_its_last_good_version() {
    let _serial = serial().await;
    let api = cluster(true);
    api.create(pod("web", "node-a", "10.7.0.1")).unwrap();
    api.create(service("web")).unwrap();
    api.create(policy("good", "DENY")).unwrap();
    api.create(http_route("r", 80)).unwrap();
    let (_source, rx) = source(&api).await;
    let m = mark();
    api.create(policy("bad", "REJECT")).unwrap();
    api.put(policy("good", "NOPE")).unwrap();
    api.put(http_route("r", 0)).unwrap();
    let bad = [
        "Kubernetes API (AuthorizationPolicy shop/bad): spec.action",
        "not applied",
    ];
    let good = [
        "Kubernetes API (AuthorizationPolicy shop/good): spec.action",
        "keeping its last good version",
    ];
    let route = ["(HTTPRoute shop/r)", "keeping its last good version"];
    wait_for("the three errors to be reported", || async {
        [&bad[..], &good[..], &route[..]]
            .iter()
            .all(|p| logged_since(m, p) == 1)
    })
    .await;
    let mut rx2 = rx.clone();
    wait_for("the route to be marked refused", || {
        let held = rx2
            .borrow_and_update()
            .routes
            .get("HTTPRoute/shop/r")
            .is_some_and(|r| r.rejected.is_some());
        async move { held }
    })
    .await;
    let set = rx.borrow().clone();
    assert!(set.pods.contains_key("shop/web") && set.services.contains_key("shop/web"));
    assert!(!set.policies.contains_key("AuthorizationPolicy/shop/bad"));
    let kept = &set.policies["AuthorizationPolicy/shop/good"];
    assert_eq!(
        kept.spec["action"], "DENY",
        "the last good version stays in force"
    );
    let r = &set.routes["HTTPRoute/shop/r"];
    assert_eq!(r.spec["rules"][0]["backendRefs"][0]["port"], 80);

    // A re-list sees the same versions again: nothing is reported twice.
    let before = requests_to(&api, "/apis/security.istio.io/v1/authorizationpolicies").len();
    api.compact();
    api.drop_watches(true);
    converge("the policies to be re-listed", || {
        requests_to(&api, "/apis/security.istio.io/v1/authorizationpolicies")[before..]
            .iter()
            .any(|(w, c)| !*w && *c == 200)
    })
    .await;
    // A fix made after the re-list is applied; by then the re-list has been taken in.
    api.put(policy("good", "ALLOW")).unwrap();
    let mut rx3 = rx.clone();
    wait_for("the fixed policy", || {
        let fixed = rx3.borrow_and_update().policies["AuthorizationPolicy/shop/good"].spec["action"]
            == "ALLOW";
        async move { fixed }
    })
    .await;
    assert_eq!(
        logged_since(m, &["AuthorizationPolicy shop/good is valid again"]),
        1
    );
    for p in [&bad[..], &good[..], &route[..]] {
        assert_eq!(logged_since(m, p), 1, "{p:?} reported more than once");
    }
}
