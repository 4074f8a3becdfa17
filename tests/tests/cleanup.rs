//! Nothing of the mesh stays in a pod or on a node (run as root), in both capture modes: a pod
//! whose sysctls were set to non-default values before it joined the mesh gets exactly those
//! values back — not the kernel defaults — when it is unenrolled, and again when its ztunnel is
//! killed and `ztunnel cleanup --node` runs; no nftables table, policy rule or route of ours
//! stays in it, and no bpffs pin, no eBPF link (cgroup or sk_lookup attachment) and no pod
//! record of that ztunnel stays on the node.

use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::leftovers::{ebpf_dir, link_exists, link_ids, pod_leftovers, run_in, sysctl};
use mesh_tests::manifests::{echo_pod, namespace};
use mesh_tests::privileged;

/// What enrollment changes in a pod, with the value each is set to before enrollment:
/// `tcp_tw_reuse` 0 (kernel default 2, ours 1) proves a restore is not a reset.
const PRE: [(&str, &str); 3] = [
    ("net.ipv4.tcp_tw_reuse", "0"),
    ("net.ipv4.tcp_fwmark_accept", "0"),
    ("net.ipv4.tcp_migrate_req", "0"),
];

fn manifests(ambient: bool) -> String {
    namespace("c", ambient) + &echo_pod("c", "app", 1, "app", &[8080])
}

/// `ztunnel cleanup --node node-1 [--dry-run]` in node 1's netns; its stdout.
fn cleanup(mesh: &LocalMesh, dry_run: bool) -> String {
    let node = mesh.cluster.nodes()[1].netns.clone();
    let mut argv = vec![
        mesh.bins.ztunnel.to_str().unwrap(),
        "cleanup",
        "--node",
        "node-1",
    ];
    if dry_run {
        argv.push("--dry-run");
    }
    let (ok, out) = run_in(mesh, &node, &argv);
    assert!(ok, "ztunnel cleanup: {out}");
    out
}

fn nothing_left(capture: &str) {
    let mesh = LocalMesh::start(MeshOptions {
        capture: capture.into(),
        ..MeshOptions::default()
    })
    .expect("start mesh");
    // Not in the mesh yet: set the pod's sysctls, then let it join.
    mesh.apply("00-c.yaml", &manifests(false)).unwrap();
    mesh.wait_listening("c", "app", 8080).unwrap();
    let pod = mesh.pod("c", "app").unwrap();
    for (key, value) in PRE {
        let (ok, out) = run_in(
            &mesh,
            &pod.netns,
            &["sysctl", "-w", &format!("{key}={value}")],
        );
        assert!(ok, "{out}");
    }
    let enroll = || {
        mesh.apply("00-c.yaml", &manifests(true)).unwrap();
        mesh.wait_enrolled("c", "app").unwrap();
        assert_eq!(mesh.pod("c", "app").unwrap().netns.name, pod.netns.name);
        assert_eq!(
            sysctl(&mesh, &pod, "net.ipv4.tcp_tw_reuse"),
            "1",
            "{capture}: enrollment sets tcp_tw_reuse"
        );
    };

    // 1. Unenrolled by a running ztunnel.
    enroll();
    mesh.apply("00-c.yaml", &manifests(false)).unwrap();
    mesh.wait_unenrolled("c", "app").unwrap();
    wait_for(Duration::from_secs(10), "the pod restored", || {
        Ok(pod_leftovers(&mesh, &pod, &PRE).is_empty())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{capture}: unenroll left {:?}: {e}",
            pod_leftovers(&mesh, &pod, &PRE)
        )
    });
    assert!(
        !cleanup(&mesh, true).contains("pod netns"),
        "{capture}: unenroll left the pod's record"
    );

    // 2. Enrolled again, ztunnel killed, `ztunnel cleanup --node`.
    enroll();
    let dir = ebpf_dir(&mesh, 1);
    assert_eq!(dir.is_some(), capture == "ebpf", "eBPF dir logged");
    let ids = dir.as_deref().map(link_ids).unwrap_or_default();
    if capture == "ebpf" {
        assert!(
            ids.len() >= 6,
            "expected 5 cgroup links and an sk_lookup link, got {ids:?}"
        );
    }
    assert!(
        cleanup(&mesh, true).contains("pod netns"),
        "{capture}: the enrolled pod has a record"
    );
    mesh.stop_ztunnel(1, false);
    assert!(
        !pod_leftovers(&mesh, &pod, &PRE).is_empty(),
        "{capture}: a killed ztunnel keeps capture (fails closed)"
    );
    cleanup(&mesh, false);
    let left = pod_leftovers(&mesh, &pod, &PRE);
    assert!(
        left.is_empty(),
        "{capture}: `ztunnel cleanup --node` left in the pod: {left:?}"
    );
    assert_eq!(
        cleanup(&mesh, true).trim(),
        "",
        "{capture}: cleanup left records or pins"
    );
    if let Some(dir) = dir {
        assert!(!std::path::Path::new(&dir).exists(), "cleanup left {dir}");
        wait_for(Duration::from_secs(10), "eBPF links to detach", || {
            Ok(ids.iter().all(|id| !link_exists(*id)))
        })
        .unwrap();
    }
}

#[test]
fn unenroll_and_cleanup_leave_nothing_ebpf() {
    if !privileged() {
        return;
    }
    nothing_left("ebpf");
}

#[test]
fn unenroll_and_cleanup_leave_nothing_nftables() {
    if !privileged() {
        return;
    }
    nothing_left("nftables");
}

/// Kubernetes cannot tell ztunnel an uninstall from a rolling update; the agent unenrolls every
/// pod first on uninstall. So a stopping ztunnel removes its node-global eBPF state exactly when
/// no pod is enrolled in it (and no newer ztunnel took it over): with a pod enrolled the state
/// stays (the pod fails closed until a ztunnel returns), without one nothing stays.
#[test]
fn stopping_with_no_pod_enrolled_leaves_no_ebpf_state() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions {
        capture: "ebpf".into(),
        ..MeshOptions::default()
    })
    .expect("start mesh");
    mesh.apply("00-c.yaml", &manifests(true)).unwrap();
    mesh.wait_enrolled("c", "app").unwrap();
    let dir = ebpf_dir(&mesh, 1).expect("eBPF dir logged");

    mesh.stop_ztunnel(1, true);
    assert!(
        std::path::Path::new(&dir).exists(),
        "a stop with a pod enrolled removed {dir}: the pod would go direct"
    );
    mesh.start_ztunnel(1).unwrap();
    mesh.wait_enrolled("c", "app").unwrap();

    mesh.apply("00-c.yaml", &manifests(false)).unwrap();
    mesh.wait_unenrolled("c", "app").unwrap();
    let ids = link_ids(&dir);
    assert!(ids.len() >= 5, "cgroup links pinned: {ids:?}");
    mesh.stop_ztunnel(1, true);
    assert!(
        !std::path::Path::new(&dir).exists(),
        "a ztunnel stopping with no pod enrolled left {dir}"
    );
    wait_for(Duration::from_secs(10), "eBPF links to detach", || {
        Ok(ids.iter().all(|id| !link_exists(*id)))
    })
    .unwrap();
}
