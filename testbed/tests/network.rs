//! Network behaviour of the testbed: every pod reaches every other pod over TCP (IPv4 and
//! IPv6, same node and across nodes), two clusters coexist in one process, and the host's own
//! network namespace is left exactly as it was.

mod common;

use std::process::Command;

use common::{check_full_mesh, check_tcp, privileged};
use testbed::{Cluster, ClusterConfig};

#[test]
fn every_pod_reaches_every_pod_v4_and_v6() {
    if !privileged() {
        return;
    }
    testbed::sweep_stale();
    let cluster = Cluster::new(ClusterConfig::default()).unwrap();
    for (node, name) in [(0, "a"), (0, "b"), (1, "c"), (1, "d")] {
        cluster.add_pod(node, name).unwrap();
    }
    let pods = cluster.pods();
    assert_eq!(pods.len(), 4);
    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[1].name, "node-1");
    assert!(pods.iter().all(|p| p.ip6.is_some()));
    check_full_mesh(&pods);

    // Nodes reach each other on the fabric too, and `run` sees the pod's own interface.
    let out = cluster
        .run(&pods[0].netns, &["ip", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&pods[0].ip4.to_string()), "{text}");
    assert!(text.contains(&pods[0].ip6.unwrap().to_string()), "{text}");
}

#[test]
fn ipv4_only_cluster_with_three_nodes() {
    if !privileged() {
        return;
    }
    let cluster = Cluster::new(ClusterConfig {
        nodes: 3,
        ipv6: false,
    })
    .unwrap();
    let pods: Vec<_> = (0..3)
        .map(|i| cluster.add_pod(i, &format!("p{i}")).unwrap())
        .collect();
    assert!(pods.iter().all(|p| p.ip6.is_none()));
    assert!(cluster.nodes().iter().all(|n| n.ip6.is_none()));
    check_full_mesh(&pods);
}

#[test]
fn two_clusters_at_once_do_not_collide() {
    if !privileged() {
        return;
    }
    // Built concurrently, with the same pod names.
    let build = || {
        std::thread::spawn(|| {
            let c = Cluster::new(ClusterConfig::default()).unwrap();
            c.add_pod(0, "web").unwrap();
            c.add_pod(1, "db").unwrap();
            c
        })
    };
    let (a, b) = (build(), build());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_ne!(a.run_id(), b.run_id());
    assert_ne!(a.dir(), b.dir());
    let names = |c: &Cluster| -> Vec<String> {
        c.pods()
            .iter()
            .map(|p| p.netns.name.clone())
            .chain(c.nodes().iter().map(|n| n.netns.name.clone()))
            .collect()
    };
    let (na, nb) = (names(&a), names(&b));
    assert!(na.iter().all(|n| !nb.contains(n)), "{na:?} vs {nb:?}");
    check_full_mesh(&a.pods());
    check_full_mesh(&b.pods());
    // Dropping one leaves the other working.
    let run_a = a.run_id().to_string();
    drop(a);
    assert!(common::leftovers_of(&run_a).is_empty());
    let pods = b.pods();
    check_tcp(&pods[0], &pods[1], pods[1].ip4.into());
}

fn host_snapshot() -> Vec<String> {
    let mut snap = Vec::new();
    for args in [
        &["-o", "link"][..],
        &["-o", "addr"],
        &["route"],
        &["-6", "route"],
        &["rule"],
    ] {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success());
        snap.push(format!(
            "ip {}:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    for key in [
        "net/ipv4/ip_forward",
        "net/ipv6/conf/all/forwarding",
        "net/ipv4/conf/all/rp_filter",
    ] {
        let value = std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
        snap.push(format!("{key} = {}", value.trim()));
    }
    snap
}

#[test]
fn host_namespace_is_untouched() {
    if !privileged() {
        return;
    }
    let before = host_snapshot();
    {
        let cluster = Cluster::new(ClusterConfig::default()).unwrap();
        let a = cluster.add_pod(0, "a").unwrap();
        let b = cluster.add_pod(1, "b").unwrap();
        check_tcp(&a, &b, b.ip6.unwrap().into());
        assert_eq!(
            host_snapshot(),
            before,
            "host changed while the cluster was up"
        );
        cluster.remove_pod("b").unwrap();
    }
    assert_eq!(
        host_snapshot(),
        before,
        "host changed after the cluster was dropped"
    );
}
