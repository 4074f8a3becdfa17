//! High availability: meshd replicas elect one leader with the `meshd-leader` Lease of the API
//! server double. Exactly one leads; a killed leader is replaced within the lease duration; a
//! stopping leader releases the Lease so another takes over at once; a leader that cannot renew
//! stops leading before its Lease could expire for the others.

#[path = "common/kube_h4.rs"]
mod kube_h4;

use std::time::{Duration, Instant};

use kube_h4::{Replica, cluster, lease, quick, settings, wait_until};
use meshd::kube::LeaseTimings;
use testbed::kubeapi::RequestMatch;

fn leaders(replicas: &[&Replica]) -> Vec<String> {
    replicas
        .iter()
        .filter(|r| r.leading())
        .map(|r| r.name.clone())
        .collect()
}

#[test]
fn one_leader_and_a_killed_leader_is_replaced_within_the_lease_duration() {
    let api = cluster();
    let t = quick();
    let a = Replica::start(settings(&api, "meshd-0", t), false);
    let b = Replica::start(settings(&api, "meshd-1", t), false);
    wait_until("a leader", Duration::from_secs(10), || {
        leaders(&[&a, &b]).len() == 1
    });
    // It stays exactly one over several renewals.
    let until = Instant::now() + t.duration;
    while Instant::now() < until {
        assert_eq!(leaders(&[&a, &b]).len(), 1, "exactly one replica leads");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (dead, survivor) = if a.leading() { (a, b) } else { (b, a) };
    let dead_name = dead.name.clone();
    assert_eq!(lease(&api)["holderIdentity"], dead_name.as_str());
    let transitions = lease(&api)["leaseTransitions"].as_i64().unwrap_or(0);
    dead.kill();
    let killed = Instant::now();
    // Expiry is judged from when the survivor last saw the record change: at most the lease
    // duration plus a retry period or two after the kill.
    wait_until(
        "the survivor to lead",
        t.duration + t.retry_period * 4,
        || survivor.leading(),
    );
    let took = killed.elapsed();
    let l = lease(&api);
    assert_eq!(l["holderIdentity"], survivor.name.as_str());
    assert_eq!(l["leaseTransitions"].as_i64(), Some(transitions + 1));
    assert_eq!(l["leaseDurationSeconds"].as_i64(), Some(3));
    assert!(l["acquireTime"].is_string() && l["renewTime"].is_string());
    eprintln!(
        "failover after kill: {took:?} (lease duration {:?})",
        t.duration
    );
}

#[test]
fn a_stopping_leader_releases_the_lease_so_failover_is_immediate() {
    let api = cluster();
    // A long lease: only a release lets the other replica lead within the wait below.
    let t = LeaseTimings {
        duration: Duration::from_secs(60),
        renew_deadline: Duration::from_secs(40),
        retry_period: Duration::from_millis(300),
    };
    let mut a = Replica::start(settings(&api, "meshd-0", t), false);
    wait_until("meshd-0 to lead", Duration::from_secs(10), || a.leading());
    let b = Replica::start(settings(&api, "meshd-1", t), false);
    wait_until(
        "meshd-1 to see the lease taken",
        Duration::from_secs(5),
        || {
            api.requests()
                .iter()
                .any(|r| r.pod.as_deref() == Some("meshd-1") && r.path.contains("/leases"))
        },
    );
    assert!(!b.leading());
    a.stop();
    wait_until("meshd-0 to stop leading", Duration::from_secs(5), || {
        !a.leading()
    });
    wait_until(
        "meshd-1 to lead after the release",
        Duration::from_secs(10),
        || b.leading(),
    );
    assert_eq!(lease(&api)["holderIdentity"], "meshd-1");
}

#[test]
fn a_leader_that_cannot_renew_steps_down_before_its_lease_expires() {
    let api = cluster();
    let t = LeaseTimings {
        duration: Duration::from_secs(30),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(300),
    };
    let a = Replica::start(settings(&api, "meshd-0", t), false);
    wait_until("meshd-0 to lead", Duration::from_secs(10), || a.leading());
    // The API stops answering Lease requests: renewals hang.
    api.hold_requests(RequestMatch {
        method: None,
        path_prefix: "/apis/coordination.k8s.io/".into(),
    });
    let held = Instant::now();
    // Well before the 30 s lease could expire for anyone else.
    wait_until("meshd-0 to step down", Duration::from_secs(10), || {
        !a.leading()
    });
    eprintln!("stepped down {:?} after renewals stopped", held.elapsed());
    api.clear_hooks();
    // Once the API answers again it takes its own lease back.
    wait_until("meshd-0 to lead again", Duration::from_secs(10), || {
        a.leading()
    });
}

/// Two whole meshd replicas: only the leader renders the waypoint; stopping it (as SIGTERM
/// would) hands the Lease over at once, and the other then writes — never both.
#[test]
fn two_meshd_replicas_one_writes_and_a_stopped_leader_hands_over_at_once() {
    let api = cluster();
    let t = LeaseTimings {
        duration: Duration::from_secs(60),
        renew_deadline: Duration::from_secs(40),
        retry_period: Duration::from_millis(300),
    };
    let mut a = kube_h4::Daemon::start(settings(&api, "meshd-0", t));
    wait_until("meshd-0 to lead", Duration::from_secs(20), || {
        lease(&api)["holderIdentity"] == "meshd-0"
    });
    let b = kube_h4::Daemon::start(settings(&api, "meshd-1", t));
    let gw = |marker: &str| {
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "app", "annotations": {"m": marker}},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        })
    };
    api.create(gw("1")).expect("gateway");
    wait_until("the waypoint Deployment", Duration::from_secs(20), || {
        api.get("apps/v1", "Deployment", Some("app"), "waypoint")
            .is_some()
    });
    a.stop();
    let handed_over = api.requests().len();
    // Far sooner than the 60 s lease could expire: only a release explains it.
    wait_until(
        "meshd-1 to take the released lease",
        Duration::from_secs(20),
        || lease(&api)["holderIdentity"] == "meshd-1",
    );
    // The new leader writes: the Gateway deleted and re-created gets new objects.
    api.delete(
        "gateway.networking.k8s.io/v1",
        "Gateway",
        Some("app"),
        "waypoint",
    )
    .expect("delete");
    wait_until("the old objects to go", Duration::from_secs(20), || {
        api.get("apps/v1", "Deployment", Some("app"), "waypoint")
            .is_none()
    });
    let uid = api.create(gw("2")).expect("gateway")["metadata"]["uid"].clone();
    wait_until(
        "meshd-1 to render the new Gateway",
        Duration::from_secs(20),
        || {
            api.get("apps/v1", "Deployment", Some("app"), "waypoint")
                .is_some_and(|d| d["metadata"]["ownerReferences"][0]["uid"] == uid)
        },
    );
    let log = api.requests();
    let writes: Vec<(usize, &str)> = log
        .iter()
        .enumerate()
        .filter(|(_, r)| r.method != "GET" && !r.path.contains("/leases"))
        .filter(|(_, r)| r.path.contains("/apis/apps/") || r.path.contains("gateway"))
        .filter_map(|(i, r)| r.pod.as_deref().map(|p| (i, p)))
        .collect();
    assert!(writes.iter().any(|(_, p)| *p == "meshd-0"));
    assert!(writes.iter().any(|(_, p)| *p == "meshd-1"));
    for (i, p) in writes {
        match p {
            "meshd-0" => assert!(i < handed_over, "meshd-0 wrote after it stopped"),
            _ => assert!(i >= handed_over, "{p} wrote while meshd-0 led"),
        }
    }
    drop(b);
}
