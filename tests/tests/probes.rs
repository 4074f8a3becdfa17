//! Kubelet probes to captured STRICT pods (run as root), in both capture modes: a connection
//! the node itself opens to the pod's app port is refused without the node's probe SNAT table
//! (STRICT refuses plaintext) and served with it — the app sees the probe address — while
//! plaintext from another pod, and another pod spoofing the probe address, are still refused.
//!
//! Until mesh-cni's agent installs `mesh_cni::probe_snat` on each node in local mode, the test
//! installs it itself, in the pod's node's network namespace (and removes it, even on failure).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_cni::probe_snat::{self, ProbeSnat};
use mesh_tests::manifests::{echo_pod, namespace};
use mesh_tests::privileged;
use meshcore::enrollment::{PROBE_SNAT_V4, PROBE_SNAT_V6};

/// `p/app` (STRICT) on node 1; `plain/other` (not in the mesh) on node 1 too.
fn manifests() -> String {
    namespace("p", true)
        + &namespace("plain", false)
        + &echo_pod("p", "app", 1, "app", &[8080])
        + &echo_pod("plain", "other", 1, "default", &[8080])
        + r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: p}
spec:
  mtls: {mode: STRICT}
"#
}

/// From `netns`, a WHO to `addr`: (who served it, the peer the app saw), or why nothing did.
fn who_from(netns: &testbed::Netns, addr: SocketAddr) -> Result<(String, String), String> {
    netns
        .enter(move || {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            (&s).write_all(b"WHO probe\n")
                .map_err(|e| format!("write: {e}"))?;
            let mut line = String::new();
            BufReader::new(&s)
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|_| format!("no reply ({line:?})"))?;
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            Ok((field("served_by"), field("peer")))
        })
        .map_err(|e| e.to_string())?
}

/// Removes the node's probe SNAT table when dropped (also when the test fails).
struct SnatGuard(testbed::Netns);

impl SnatGuard {
    fn install(node: &testbed::Netns, ips: Vec<IpAddr>) -> SnatGuard {
        node.enter(move || -> Result<(), probe_snat::ProbeSnatError> {
            ProbeSnat::new()?.add(&ips)
        })
        .expect("enter the node")
        .expect("install the probe SNAT table");
        SnatGuard(node.clone())
    }

    fn remove(&self) {
        self.0
            .enter(probe_snat::remove_table)
            .expect("enter the node")
            .expect("remove the probe SNAT table");
    }
}

impl Drop for SnatGuard {
    fn drop(&mut self) {
        let _ = self.0.enter(probe_snat::remove_table);
    }
}

fn run_in(mesh: &LocalMesh, netns: &testbed::Netns, argv: &[&str]) -> String {
    let out = mesh.cluster.run(netns, argv).unwrap();
    assert!(
        out.status.success(),
        "{argv:?} in {}: {}",
        netns.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn probes_reach_strict_pods(capture: &str) {
    let mesh = LocalMesh::start(MeshOptions {
        capture: capture.into(),
        ..MeshOptions::default()
    })
    .expect("start mesh");
    mesh.apply("00-probes.yaml", &manifests()).unwrap();
    mesh.wait_listening("p", "app", 8080).unwrap();
    mesh.wait_listening("plain", "other", 8080).unwrap();
    mesh.wait_enrolled("p", "app").unwrap();
    let app = mesh.pod("p", "app").unwrap();
    let other = mesh.pod("plain", "other").unwrap();
    let node = mesh.cluster.nodes()[app.node].netns.clone();
    let mut targets = vec![SocketAddr::new(app.ip4.into(), 8080)];
    if let Some(ip6) = app.ip6 {
        targets.push(SocketAddr::new(ip6.into(), 8080));
    }

    // Without the node's table (whoever installed it): the node's plaintext is refused.
    node.enter(probe_snat::remove_table).unwrap().unwrap();
    wait_for(Duration::from_secs(15), "STRICT in force", || {
        Ok(targets.iter().all(|t| who_from(&node, *t).is_err()))
    })
    .unwrap();

    // With it: the node's connections arrive from the probe address, straight at the app.
    let guard = SnatGuard::install(&node, targets.iter().map(SocketAddr::ip).collect());
    for t in &targets {
        let (served_by, peer) = who_from(&node, *t)
            .unwrap_or_else(|e| panic!("{capture}: a probe from the node to {t} failed: {e}"));
        assert_eq!(served_by, "app", "{capture}: probe to {t}");
        let peer: SocketAddr = peer.parse().expect("the app's peer address");
        let want: IpAddr = if t.is_ipv4() {
            PROBE_SNAT_V4.into()
        } else {
            PROBE_SNAT_V6.into()
        };
        assert_eq!(peer.ip().to_canonical(), want, "{capture}: probe to {t}");
    }

    // Another pod's plaintext is still refused.
    for t in &targets {
        let got = who_from(&other.netns, *t);
        assert!(
            got.is_err(),
            "{capture}: plaintext from a non-mesh pod reached STRICT {t}: {got:?}"
        );
    }

    // A pod spoofing the probe address: the node does not forward it, so its SYN never
    // reaches the app's netns (which would answer it: the handshake would then fail only
    // because the answer goes to the node, not to the spoofer).
    let gw = run_in(
        &mesh,
        &other.netns,
        &["ip", "-4", "route", "show", "default"],
    );
    let gw = gw
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .expect("the pod's default gateway")
        .to_string();
    let spoof = PROBE_SNAT_V4.to_string();
    run_in(
        &mesh,
        &other.netns,
        &["ip", "addr", "add", &format!("{spoof}/32"), "dev", "eth0"],
    );
    run_in(
        &mesh,
        &other.netns,
        &[
            "ip",
            "route",
            "add",
            &format!("{}/32", app.ip4),
            "via",
            &gw,
            "dev",
            "eth0",
            "src",
            &spoof,
        ],
    );
    // The test's own counter, in the app's netns, of packets arriving from the probe address.
    for cmd in [
        "add table inet probes-test",
        "add chain inet probes-test seen { type filter hook prerouting priority -400; }",
        "add rule inet probes-test seen ip saddr 169.254.7.127 counter",
    ] {
        run_in(&mesh, &app.netns, &["nft", cmd]);
    }
    let got = who_from(&other.netns, targets[0]);
    assert!(
        got.is_err(),
        "{capture}: a pod spoofing the probe address reached the app: {got:?}"
    );
    let seen = run_in(
        &mesh,
        &app.netns,
        &["nft", "list", "chain", "inet", "probes-test", "seen"],
    );
    assert!(
        seen.contains("counter packets 0 "),
        "{capture}: packets spoofing the probe address reached the app's netns: {seen}"
    );

    // Table gone again: refused again.
    guard.remove();
    for t in &targets {
        assert!(
            who_from(&node, *t).is_err(),
            "{capture}: the node reached STRICT {t} without the probe SNAT"
        );
    }
}

#[test]
fn kubelet_probe_reaches_strict_pod_ebpf() {
    if !privileged() {
        return;
    }
    probes_reach_strict_pods("ebpf");
}

#[test]
fn kubelet_probe_reaches_strict_pod_nftables() {
    if !privileged() {
        return;
    }
    probes_reach_strict_pods("nftables");
}
