//! `meshctl check` as the real binary: pre-flight on a simulated node root (`--host-root`
//! missing BTF, cgroup2, bpffs; an old kernel) and on the cluster (node kernels, Cilium's
//! conflicting settings, Istio already installed), and post-install (every component and
//! every node's agents ready; the test plays the kubelets, see `common`). Each failure must say
//! what to do, and the exit code must say whether anything failed.

mod common;

use common::{Env, HostRoot, NS, Readiness, wait_for};
use meshctl::check::{capture, host::Capture};
use meshctl::manifests::{self, Manifests};
use serde_json::json;

/// The line for a check (mark and text) and the fix printed under it.
fn line<'a>(out: &'a str, text: &str) -> Option<(&'a str, Option<&'a str>)> {
    let lines: Vec<&str> = out.lines().collect();
    let i = lines.iter().position(|l| l.contains(text))?;
    let fix = lines
        .get(i + 1)
        .filter(|l| l.trim_start().starts_with('→'))
        .copied();
    Some((lines[i], fix))
}

/// How the built-in manifests make ztunnel capture decides whether a missing eBPF
/// prerequisite is a failure (eBPF only) or a warning (auto falls back to nftables).
fn mark_for_missing() -> (&'static str, i32) {
    match capture(&Manifests::embedded("dev", manifests::DEV).unwrap()) {
        Capture::Ebpf => ("✗", 1),
        _ => ("!", 0),
    }
}

#[test]
fn preflight_reports_missing_btf_cgroup2_and_bpffs_with_what_to_do() {
    let env = Env::start(&[("node-a", "6.1.0-18-amd64")]);
    let good = HostRoot::new("6.1.0-18-amd64", true, true, true);
    let run = env.run(&["check", "--pre-install", "--host-root", good.path()]);
    assert_eq!(run.code, 0, "{run:?}");
    for ok in [
        "✓ kernel 6.1.0-18-amd64",
        "✓ kernel BTF present",
        "✓ cgroup v2 mounted at /sys/fs/cgroup",
        "✓ bpffs mounted at /sys/fs/bpf",
    ] {
        assert!(run.stdout.contains(ok), "{ok}: {run:?}");
    }
    let (mark, code) = mark_for_missing();
    let cases = [
        (
            HostRoot::new("6.1.0", false, true, true),
            "no kernel BTF",
            "CONFIG_DEBUG_INFO_BTF=y",
        ),
        (
            HostRoot::new("6.1.0", true, false, true),
            "cgroup v2 is not mounted",
            "mount -t cgroup2",
        ),
        (
            HostRoot::new("6.1.0", true, true, false),
            "bpffs is not mounted",
            "mount -t bpf bpf /sys/fs/bpf",
        ),
        (
            HostRoot::new("5.4.0-150-generic", true, true, true),
            "kernel 5.4.0-150-generic is older than 5.15",
            "upgrade the node's kernel",
        ),
    ];
    for (root, text, fix) in cases {
        let run = env.run(&["check", "--pre-install", "--host-root", root.path()]);
        assert_eq!(run.code, code, "{text}: {run:?}");
        let (l, f) =
            line(&run.stdout, text).unwrap_or_else(|| panic!("{text} not reported: {run:?}"));
        assert!(l.starts_with(mark), "{l}");
        assert!(
            f.is_some_and(|f| f.contains(fix)),
            "{text}: no fix {fix:?}: {run:?}"
        );
    }
}

#[test]
fn preflight_finds_old_node_kernels_cilium_conflicts_and_istio() {
    let env = Env::start(&[("node-a", "6.8.0"), ("node-b", "5.10.0-28-cloud-amd64")]);
    let run = env.run(&["check", "--pre-install", "--no-host"]);
    assert_eq!(run.code, 1, "{run:?}");
    let (l, _) = line(&run.stdout, "older than 5.15").unwrap();
    assert!(
        l.starts_with('✗') && l.contains("node-b (5.10.0-28-cloud-amd64)") && !l.contains("node-a"),
        "{l}"
    );
    assert!(run.stdout.contains("CNI not recognised"), "{run:?}");

    let env = Env::start(&[("node-a", "6.8.0")]);
    env.api.create(json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "cilium", "namespace": "kube-system"}, "spec": {}})).unwrap();
    let config = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cilium-config", "namespace": "kube-system"},
        "data": {"kube-proxy-replacement": "true", "bpf-lb-sock-hostns-only": "false", "cni-exclusive": "true"}});
    env.api.put(config.clone()).unwrap();
    let run = env.run(&["check", "--pre-install", "--no-host"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout
            .contains("✓ CNI: Cilium (DaemonSet kube-system/cilium)"),
        "{run:?}"
    );
    let (l, fix) = line(&run.stdout, "socket load balancer runs in pods' namespaces").unwrap();
    assert!(
        l.starts_with('✗') && fix.unwrap().contains("socketLB.hostNamespaceOnly=true"),
        "{run:?}"
    );
    let (l, fix) = line(&run.stdout, "exclusive CNI").unwrap();
    assert!(
        l.starts_with('✗') && fix.unwrap().contains("cni.exclusive=false"),
        "{run:?}"
    );

    // Cilium configured as Istio's docs ask: nothing to fix.
    let mut fixed = config;
    fixed["data"] = json!({"kube-proxy-replacement": "true", "bpf-lb-sock-hostns-only": "true", "cni-exclusive": "false"});
    env.api.put(fixed).unwrap();
    let run = env.run(&["check", "--pre-install", "--no-host"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!run.stdout.contains('✗'), "{run:?}");

    // Istio's CRDs alone are fine; istiod and istio-cni are not.
    env.api.install_mesh_crds().unwrap();
    let run = env.run(&["check", "--pre-install", "--no-host"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        line(&run.stdout, "Istio's CRDs are installed")
            .unwrap()
            .0
            .starts_with('!')
    );
    env.api
        .create(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}),
        )
        .unwrap();
    env.api.create(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "istiod", "namespace": "istio-system"}, "spec": {}})).unwrap();
    env.api.create(json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "istio-cni-node", "namespace": "istio-system"}, "spec": {}})).unwrap();
    let run = env.run(&["check", "--pre-install", "--no-host"]);
    assert_eq!(run.code, 1, "{run:?}");
    let (l, fix) = line(&run.stdout, "Istio is installed").unwrap();
    assert!(
        l.starts_with('✗')
            && l.contains("Deployment istio-system/istiod")
            && l.contains("DaemonSet istio-system/istio-cni-node"),
        "{l}"
    );
    assert!(
        fix.unwrap()
            .contains("uninstall Istio's ambient components"),
        "{run:?}"
    );
}

#[test]
fn post_install_checks_every_component_and_every_node() {
    let env = Env::start(&[("node-a", "6.8.0"), ("node-b", "6.8.0")]);
    let run = env.run(&["check", "--no-host"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("! the mesh is not installed"),
        "{run:?}"
    );

    assert_eq!(env.run(&["install", "--no-wait"]).code, 0);
    let run = env.run(&["check", "--no-host"]);
    assert_eq!(run.code, 1, "not ready yet: {run:?}");
    assert!(
        run.stdout
            .contains("✗ ztunnel not ready on 2 of 2 nodes: node node-a: no ztunnel pod"),
        "{run:?}"
    );

    env.kubelet_ready();
    let run = env.run(&["check", "--no-host"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("✓ ztunnel ready on every node (2/2)"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("✓ mesh-cni ready on every node (2/2)"),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains("✓ Deployment mesh-system/meshd: 1/1 ready"),
        "{run:?}"
    );

    // node-b's agent stops being ready (its controller has not noticed yet: counts still say
    // ready): the node is named with why.
    let cni = env
        .get("apps/v1", "DaemonSet", Some(NS), "mesh-cni")
        .unwrap();
    env.pod_for(
        &cni,
        "mesh-cni-node-b",
        "node-b",
        Readiness::Waiting(
            "CrashLoopBackOff",
            "back-off 5m0s restarting failed container",
        ),
    );
    wait_for("the pod update", || {
        env.get("v1", "Pod", Some(NS), "mesh-cni-node-b")
            .is_some_and(|p| p["status"]["phase"] == "Pending")
    });
    let run = env.run(&["check", "--no-host"]);
    assert_eq!(run.code, 1, "{run:?}");
    let (l, fix) = line(&run.stdout, "mesh-cni not ready on 1 of 2 nodes").unwrap();
    assert!(
        l.starts_with('✗')
            && l.contains("pod mesh-cni-node-b on node node-b")
            && l.contains("CrashLoopBackOff"),
        "{l}"
    );
    assert!(fix.is_some(), "{run:?}");
}
