//! `meshctl waypoint` and `meshctl status` against the API (the double): apply creates the
//! Gateway and labels the namespace, list and status read the conditions meshd writes on the
//! Gateway's status (the test writes them as meshd's `writer_status` does), `--wait` returns
//! once Programmed, delete removes only waypoints; status shows enrolled pods by Istio's
//! redirection annotation.

mod common;

use common::{Env, wait_for};
use serde_json::json;

fn gateway(env: &Env, ns: &str, name: &str) -> Option<serde_json::Value> {
    env.get("gateway.networking.k8s.io/v1", "Gateway", Some(ns), name)
}

/// What meshd's leader writes on a waypoint it programmed.
fn meshd_programs(env: &Env, ns: &str, name: &str) {
    let mut gw = gateway(env, ns, name).unwrap();
    let cond = |t: &str| json!({"type": t, "status": "True", "reason": t, "message": "", "observedGeneration": gw["metadata"]["generation"], "lastTransitionTime": "2026-01-01T00:00:00Z"});
    gw["status"] = json!({"conditions": [cond("Accepted"), cond("Programmed")]});
    env.api.put(gw).unwrap();
}

#[test]
fn waypoint_apply_list_status_delete_against_the_api() {
    let env = Env::start(&[("node-a", "6.8.0")]);
    env.api.install_mesh_crds().unwrap();
    env.api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps", "labels": {"istio.io/dataplane-mode": "ambient"}}})).unwrap();

    let run = env.run(&[
        "waypoint",
        "apply",
        "-n",
        "apps",
        "--enroll-namespace",
        "--for",
        "all",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("waypoint apps/waypoint created"),
        "{run:?}"
    );
    let gw = gateway(&env, "apps", "waypoint").unwrap();
    assert_eq!(gw["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(gw["metadata"]["labels"]["istio.io/waypoint-for"], "all");
    let ns = env.get("v1", "Namespace", None, "apps").unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["istio.io/use-waypoint"],
        "waypoint"
    );
    assert_eq!(
        ns["metadata"]["labels"]["istio.io/dataplane-mode"], "ambient",
        "other labels kept"
    );

    let run = env.run(&["waypoint", "apply", "-n", "apps", "--for", "all"]);
    assert!(
        run.stdout.contains("waypoint apps/waypoint unchanged"),
        "{run:?}"
    );
    // A change replaces the Gateway read (at its resourceVersion), and back again.
    for for_ in ["service", "all"] {
        let run = env.run(&["waypoint", "apply", "-n", "apps", "--for", for_]);
        assert!(
            run.stdout.contains("waypoint apps/waypoint updated"),
            "{run:?}"
        );
        let gw = gateway(&env, "apps", "waypoint").unwrap();
        assert_eq!(gw["metadata"]["labels"]["istio.io/waypoint-for"], for_);
    }

    let run = env.run(&["waypoint", "list"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("apps       waypoint  all  Unknown (no status from meshd yet)"),
        "{run:?}"
    );

    // `--wait` waits for meshd's status.
    let mut bg = env.spawn(&[
        "waypoint",
        "status",
        "-n",
        "apps",
        "--wait",
        "--timeout",
        "30s",
    ]);
    assert!(bg.running());
    meshd_programs(&env, "apps", "waypoint");
    let run = bg.wait();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("Programmed  True"), "{run:?}");
    let run = env.run(&["waypoint", "list", "-n", "apps"]);
    assert!(run.stdout.contains("waypoint  all  Programmed"), "{run:?}");

    // A Gateway of another class is not a waypoint: listed never, deleted never.
    env.api.create(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "ingress", "namespace": "apps"}, "spec": {"gatewayClassName": "other", "listeners": []}})).unwrap();
    assert!(!env.run(&["waypoint", "list"]).stdout.contains("ingress"));
    let run = env.run(&["waypoint", "delete", "-n", "apps", "--all"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(gateway(&env, "apps", "waypoint").is_none());
    assert!(gateway(&env, "apps", "ingress").is_some());
    let run = env.run(&["waypoint", "delete", "-n", "apps", "ingress"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("is not a waypoint"), "{run:?}");
}

#[test]
fn status_shows_components_nodes_enrolled_pods_and_waypoints() {
    let env = Env::start(&[("node-a", "6.8.0"), ("node-b", "6.1.0")]);
    env.api.install_mesh_crds().unwrap();
    assert_eq!(env.run(&["install", "--no-wait"]).code, 0);
    env.kubelet_ready();
    env.api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps", "labels": {"istio.io/dataplane-mode": "ambient"}}})).unwrap();
    for (pod, captured) in [("web-1", true), ("web-2", true), ("job-1", false)] {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": "apps"}, "spec": {"containers": [{"name": "c", "image": "x"}]}});
        if captured {
            p["metadata"]["annotations"] = json!({"ambient.istio.io/redirection": "enabled"});
        }
        env.api.create(p).unwrap();
    }
    assert_eq!(env.run(&["waypoint", "apply", "-n", "apps"]).code, 0);
    wait_for("the waypoint", || {
        gateway(&env, "apps", "waypoint").is_some()
    });

    let run = env.run(&["status"]);
    assert_eq!(run.code, 0, "{run:?}");
    let out = &run.stdout;
    assert!(out.contains("DaemonSet   ztunnel   ✓ 2/2 ready"), "{out}");
    assert!(out.contains("node-b  6.1.0   ready"), "{out}");
    assert!(out.contains("apps       3     2         job-1"), "{out}");
    assert!(
        out.contains("apps       waypoint  service  Unknown"),
        "{out}"
    );
}
