//! `meshctl install` and `meshctl uninstall` as the real binary against the API server double:
//! everything in the built-in manifests applied with server-side apply (manager meshctl), the
//! wait for readiness (the test plays the kubelets and controllers, see `common`), the report
//! when something is not ready, CRDs that are not ours left alone, and the uninstall protocol
//! (the request is an annotation on the mesh-cni DaemonSet, never a ConfigMap anyone could
//! create; agents confirm by annotating their pods; a silent one is named and nothing is
//! deleted; no DaemonSet, no agents to wait for).

mod common;

use common::{Env, NS, Readiness, name, wait_for};
use meshctl::manifests::{self, Manifests};
use serde_json::{Value, json};

fn embedded() -> Manifests {
    Manifests::embedded("dev", manifests::DEV).unwrap()
}

fn live(env: &Env, o: &Value) -> Option<Value> {
    let ns = o["metadata"]["namespace"].as_str();
    env.get(
        o["apiVersion"].as_str().unwrap(),
        o["kind"].as_str().unwrap(),
        ns,
        name(o),
    )
}

fn applied_by_meshctl(o: &Value) -> bool {
    o["metadata"]["managedFields"].as_array().is_some_and(|m| {
        m.iter()
            .any(|e| e["manager"] == "meshctl" && e["operation"] == "Apply")
    })
}

/// Starts `meshctl install`, plays the kubelets once every workload exists, and waits.
fn install(env: &Env) -> common::Run {
    let m = embedded();
    let bg = env.spawn(&["install", "--timeout", "60s"]);
    let workloads: Vec<Value> = m.workloads().cloned().collect();
    wait_for("the workloads to be applied", || {
        workloads.iter().all(|w| live(env, w).is_some())
    });
    env.kubelet_ready();
    bg.wait()
}

#[test]
fn install_applies_everything_and_waits_until_ready() {
    let env = Env::start(&[("node-a", "6.1.0"), ("node-b", "6.8.0")]);
    let run = install(&env);
    assert_eq!(run.code, 0, "{run:?}");
    for o in &embedded().objects {
        let l = live(&env, o).unwrap_or_else(|| panic!("{} {} not applied", o["kind"], name(o)));
        assert!(
            applied_by_meshctl(&l),
            "{} {} not applied by meshctl",
            o["kind"],
            name(o)
        );
    }
    // Readiness as the controllers reported it, so install waited for it.
    assert!(
        run.stdout
            .contains("✓ DaemonSet mesh-system/ztunnel: 2/2 ready"),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains("✓ DaemonSet mesh-system/mesh-cni: 2/2 ready"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("✓ Deployment mesh-system/meshd"),
        "{run:?}"
    );
    // Again: nothing to create, and ready at once.
    let again = env.run(&["install", "--timeout", "10s"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(!again.stdout.contains(": created"), "{again:?}");
}

#[test]
fn install_reports_what_is_not_ready_and_why() {
    let env = Env::start(&[("node-a", "6.1.0"), ("node-b", "6.8.0")]);
    let applied = env.run(&["install", "--no-wait"]);
    assert_eq!(applied.code, 0, "{applied:?}");
    let meshd = env.get("apps/v1", "Deployment", Some(NS), "meshd").unwrap();
    let ztunnel = env
        .get("apps/v1", "DaemonSet", Some(NS), "ztunnel")
        .unwrap();
    env.kubelet_ready();
    // Then meshd cannot be scheduled and one ztunnel cannot pull its image.
    let mut d = env.get("apps/v1", "Deployment", Some(NS), "meshd").unwrap();
    d["status"]["readyReplicas"] = json!(0);
    d["status"]["availableReplicas"] = json!(0);
    env.api.put(d).unwrap();
    env.pod_for(
        &meshd,
        "meshd-0",
        "node-a",
        Readiness::Unschedulable("0/2 nodes are available: 2 Insufficient cpu."),
    );
    env.pod_for(
        &ztunnel,
        "ztunnel-node-b",
        "node-b",
        Readiness::Waiting(
            "ImagePullBackOff",
            "Back-off pulling image \"mesh/ztunnel:0.1.0\"",
        ),
    );
    let ds = env
        .get("apps/v1", "DaemonSet", Some(NS), "ztunnel")
        .unwrap();
    env.daemonset_status(&ds, 1);

    let run = env.run(&["install", "--timeout", "2s"]);
    assert_eq!(run.code, 1, "{run:?}");
    let err = &run.stderr;
    assert!(
        err.contains("Deployment mesh-system/meshd: ready 0/1"),
        "{err}"
    );
    assert!(
        err.contains(
            "pod meshd-0: Pending, Unschedulable: 0/2 nodes are available: 2 Insufficient cpu."
        ),
        "{err}"
    );
    assert!(
        err.contains("DaemonSet mesh-system/ztunnel: ready 1/2"),
        "{err}"
    );
    assert!(err.contains("pod ztunnel-node-b on node node-b: Pending, container main ImagePullBackOff: Back-off pulling image"), "{err}");
    assert!(!err.contains("mesh-cni"), "mesh-cni is ready: {err}");
}

/// Manifests with a CRD that Istio also installs and one only we do.
fn crd_manifests(dir: &std::path::Path) -> std::path::PathBuf {
    let crd = |group: &str, kind: &str, plural: &str| {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            // Ours are verbatim copies: upstream's labels, plus our marker.
            "metadata": {"name": format!("{plural}.{group}"), "labels": {"app": "istio-pilot", "release": "istio", "app.kubernetes.io/managed-by": "mesh"}},
            "spec": {"group": group, "scope": "Namespaced",
                "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]},
        })
    };
    let mut docs = vec![
        crd(
            "security.istio.io",
            "AuthorizationPolicy",
            "authorizationpolicies",
        ),
        crd("example.mesh.dev", "Thing", "things"),
        json!({"apiVersion": "example.mesh.dev/v1", "kind": "Thing", "metadata": {"name": "one", "namespace": NS, "labels": {"app.kubernetes.io/part-of": "mesh"}}}),
    ];
    docs.extend(embedded().objects);
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_json::to_string(d).unwrap())
        .collect();
    let path = dir.join("manifests.yaml");
    std::fs::write(&path, text.join("\n---\n")).unwrap();
    path
}

#[test]
fn crds_that_are_not_ours_are_never_overwritten_nor_deleted() {
    let env = Env::start(&[("node-a", "6.1.0")]);
    env.api.install_mesh_crds().unwrap();
    let istio = "authorizationpolicies.security.istio.io";
    let crd = |n: &str| {
        env.get(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            n,
        )
    };
    // Istio's, with the labels its chart gives it.
    let mut theirs = crd(istio).unwrap();
    theirs["metadata"]["labels"] = json!({"app": "istio-pilot", "release": "istio"});
    env.api.put(theirs).unwrap();
    let before = crd(istio).unwrap();
    // Istio's waypoint class, as istiod creates it.
    let class = || {
        env.get(
            "gateway.networking.k8s.io/v1",
            "GatewayClass",
            None,
            "istio-waypoint",
        )
    };
    env.api
        .create(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": "istio-waypoint"}, "spec": {"controllerName": "istio.io/mesh-controller"}}))
        .unwrap();
    let class_before = class().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = crd_manifests(dir.path());
    let file = file.to_str().unwrap();

    let installed = env.run(&["install", "--manifests", file, "--no-wait"]);
    assert_eq!(installed.code, 0, "{installed:?}");
    assert!(
        installed
            .stdout
            .contains(&format!("CRD {istio}: exists and is not ours")),
        "{installed:?}"
    );
    assert_eq!(
        crd(istio).unwrap()["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    assert!(applied_by_meshctl(&crd("things.example.mesh.dev").unwrap()));
    // The custom resource of our own CRD was applied after its CRD was served.
    assert!(
        env.get("example.mesh.dev/v1", "Thing", Some(NS), "one")
            .is_some()
    );

    env.kubelet_ready();
    let bg = env.spawn(&[
        "uninstall",
        "--manifests",
        file,
        "--crds",
        "--timeout",
        "30s",
    ]);
    agents_answer(&env, &["node-a"]);
    let run = bg.wait();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains(&format!(
            "CustomResourceDefinition {istio}: not ours, left as it is"
        )),
        "{run:?}"
    );
    assert_eq!(
        crd(istio).unwrap()["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    let skipped = "GatewayClass istio-waypoint: exists and is not ours: left as it is";
    assert!(installed.stdout.contains(skipped), "{installed:?}");
    let kept = "GatewayClass istio-waypoint: not ours, left as it is";
    assert!(run.stdout.contains(kept), "{run:?}");
    assert_eq!(
        class().unwrap()["metadata"]["resourceVersion"],
        class_before["metadata"]["resourceVersion"]
    );
    assert!(
        crd("things.example.mesh.dev").is_none(),
        "our CRD is deleted with --crds"
    );
}

/// The agents' DaemonSet, live.
fn agents_daemonset(env: &Env) -> Option<Value> {
    env.get("apps/v1", "DaemonSet", Some(NS), "mesh-cni")
}

/// Plays the node agents of `nodes`: once the mesh-cni DaemonSet carries the request, each
/// annotates its own mesh-cni pod as the agent does.
fn agents_answer(env: &Env, nodes: &[&str]) {
    wait_for("the uninstall annotation on the mesh-cni DaemonSet", || {
        agents_daemonset(env)
            .is_some_and(|ds| ds["metadata"]["annotations"]["mesh.dev/uninstall"] == "true")
    });
    for node in nodes {
        let mut pod = env
            .get("v1", "Pod", Some(NS), &format!("mesh-cni-{node}"))
            .unwrap();
        pod["metadata"]["annotations"]["mesh.dev/uninstalled"] = json!("true");
        env.api.put(pod).unwrap();
    }
}

#[test]
fn uninstall_waits_for_every_agent_then_removes_what_install_created() {
    let env = Env::start(&[("node-a", "6.1.0"), ("node-b", "6.8.0")]);
    env.api.install_mesh_crds().unwrap();
    assert_eq!(install(&env).code, 0);
    let crds_before = env
        .api
        .list("apiextensions.k8s.io/v1", "CustomResourceDefinition");
    let ds_before = agents_daemonset(&env).unwrap();

    // node-b's agent never answers: it is named, and nothing is deleted.
    let bg = env.spawn(&["uninstall", "--timeout", "2s"]);
    agents_answer(&env, &["node-a"]);
    let run = bg.wait();
    assert_eq!(run.code, 1, "{run:?}");
    // The request is on the DaemonSet (kept there for the silent node's agent), its pod
    // template untouched (no rollout); no ConfigMap, which anyone with ConfigMap rights in
    // the namespace could forge, is created.
    let ds = agents_daemonset(&env).unwrap();
    assert_eq!(ds["metadata"]["annotations"]["mesh.dev/uninstall"], "true");
    assert_eq!(ds["spec"], ds_before["spec"]);
    assert!(
        env.get("v1", "ConfigMap", Some(NS), "mesh-uninstall")
            .is_none()
    );
    assert!(
        run.stderr.contains("node node-b (pod mesh-cni-node-b)"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("node node-a"), "{run:?}");
    assert!(run.stderr.contains("nothing was deleted"), "{run:?}");
    for o in &embedded().objects {
        assert!(
            live(&env, o).is_some(),
            "{} {} deleted too early",
            o["kind"],
            name(o)
        );
    }

    // An older meshctl's trigger, left in the cluster: deleted with the rest.
    env.api
        .create(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "mesh-uninstall", "namespace": NS}}))
        .unwrap();
    let bg = env.spawn(&["uninstall", "--timeout", "30s"]);
    agents_answer(&env, &["node-b"]);
    let run = bg.wait();
    assert_eq!(run.code, 0, "{run:?}");
    // Everything but the CRDs (kept without --crds; Istio's here in any case).
    for o in embedded().others() {
        assert!(
            live(&env, o).is_none(),
            "{} {} left behind",
            o["kind"],
            name(o)
        );
    }
    assert!(
        env.get("v1", "ConfigMap", Some(NS), "mesh-uninstall")
            .is_none()
    );
    // Istio's CRDs (and any other) untouched.
    let crds_after = env
        .api
        .list("apiextensions.k8s.io/v1", "CustomResourceDefinition");
    assert_eq!(crds_before.len(), crds_after.len());
}

/// An install over an uninstall that no agent confirmed takes the request back and restarts
/// the agents (one that already uninstalled would otherwise stay passive, its node's new pods
/// uncaptured); an install with nothing to withdraw leaves the pod template alone.
#[test]
fn install_withdraws_an_unfinished_uninstall_and_restarts_the_agents() {
    let env = Env::start(&[("node-a", "6.1.0")]);
    env.api.install_mesh_crds().unwrap();
    assert_eq!(install(&env).code, 0);
    let template = |env: &Env| agents_daemonset(env).unwrap()["spec"]["template"].clone();
    let before = template(&env);
    assert_eq!(install(&env).code, 0);
    assert_eq!(
        template(&env),
        before,
        "a plain re-install restarted the agents"
    );

    let run = env.run(&["uninstall", "--timeout", "1s"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        agents_daemonset(&env).unwrap()["metadata"]["annotations"]["mesh.dev/uninstall"],
        "true"
    );
    // The restart is a new pod template: the rollout finishes once the kubelet (the double's
    // stand-in) has seen it.
    let bg = env.spawn(&["install", "--timeout", "60s"]);
    wait_for("the agents' pod template to change", || {
        template(&env) != before
    });
    env.kubelet_ready();
    let run = bg.wait();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("withdrew the uninstall request"),
        "{run:?}"
    );
    let ds = agents_daemonset(&env).unwrap();
    assert!(
        ds["metadata"]["annotations"]
            .get("mesh.dev/uninstall")
            .is_none(),
        "{ds}"
    );
    assert!(
        ds["spec"]["template"]["metadata"]["annotations"]["mesh.dev/restarted-at"].is_string(),
        "the agents' pods are not restarted: {ds}"
    );
}

#[test]
fn uninstall_without_the_agents_daemonset_waits_for_no_agent() {
    let env = Env::start(&[("node-a", "6.1.0")]);
    env.api.install_mesh_crds().unwrap();
    assert_eq!(install(&env).code, 0);
    env.api
        .delete("apps/v1", "DaemonSet", Some(NS), "mesh-cni")
        .unwrap();
    let run = env.run(&["uninstall", "--timeout", "30s"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("no mesh-cni DaemonSet: no agents to wait for"),
        "{run:?}"
    );
    for o in embedded().others() {
        assert!(
            live(&env, o).is_none(),
            "{} {} left behind",
            o["kind"],
            name(o)
        );
    }
}

#[test]
fn dry_run_changes_nothing() {
    let env = Env::start(&[("node-a", "6.1.0")]);
    let rv = env.api.resource_version();
    let run = env.run(&["install", "--dry-run"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("DaemonSet mesh-system/ztunnel: would create"),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains("CRD gateways.gateway.networking.k8s.io: would apply (new)"),
        "{run:?}"
    );
    assert_eq!(env.api.resource_version(), rv, "a dry run wrote to the API");
    assert!(env.get("v1", "Namespace", None, NS).is_none());
}
