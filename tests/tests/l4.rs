//! End-to-end L4 mesh in local mode: real namespaces, real nftables capture, real mTLS.
//!
//! Each test builds its own cluster (unique names), so tests can run in parallel and twice in
//! a row; the cluster is torn down even when an assertion fails.

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};

use localmesh::client::field;
use localmesh::wire::{WireCapture, payload_contains, tls_on_port};
use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{WhoConn, privileged, served_by};
use std::time::Duration;

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
"#;

const NAMESPACES_B_LEFT: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
"#;

fn pod(ns: &str, name: &str, node: usize, sa: &str) -> String {
    mesh_tests::manifests::echo_pod(ns, name, node, sa, &[8080])
}

fn workloads() -> String {
    let mut s = String::new();
    s += &pod("a", "client", 0, "client");
    s += &pod("b", "server", 1, "server");
    s += &pod("plain", "legacy", 1, "default");
    s += r#"
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: b}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: http}]
"#;
    s
}

/// A mesh with the base workloads, every app listening and mesh pods enrolled.
fn base_mesh() -> LocalMesh {
    let mesh = LocalMesh::start(MeshOptions::default()).expect("start local mesh");
    mesh.apply("00-ns.yaml", NAMESPACES).unwrap();
    mesh.apply("10-workloads.yaml", &workloads()).unwrap();
    for (ns, p) in [("a", "client"), ("b", "server"), ("plain", "legacy")] {
        mesh.wait_listening(ns, p, 8080).unwrap();
    }
    mesh.wait_enrolled("a", "client").unwrap();
    mesh.wait_enrolled("b", "server").unwrap();
    mesh
}

fn vips(mesh: &LocalMesh) -> Vec<String> {
    let text = std::fs::read_to_string(mesh.config_dir.join("10-workloads.yaml")).unwrap();
    let docs = localmesh::render::parse_docs("10-workloads.yaml", &text).unwrap();
    let svc = docs
        .iter()
        .find(|d| localmesh::render::kind(d) == "Service")
        .unwrap();
    svc["spec"]["clusterIPs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn addr(ip: &str, port: u16) -> String {
    SocketAddr::new(ip.parse().unwrap(), port).to_string()
}

#[test]
fn cross_node_traffic_is_hbone_on_the_wire() {
    if !privileged() {
        return;
    }
    let mesh = base_mesh();
    let server = mesh.pod("b", "server").unwrap();
    let mut targets = vec![
        addr(&server.ip4.to_string(), 8080),
        addr(&server.ip6.unwrap().to_string(), 8080),
    ];
    targets.extend(vips(&mesh).iter().map(|v| addr(v, 80)));
    assert_eq!(targets.len(), 4, "expected a dual-stack service");

    let client = mesh.pod("a", "client").unwrap();
    let node0 = mesh.cluster.nodes()[0].clone();
    let wire =
        WireCapture::start(&mesh.cluster, &node0.netns, &node0.fabric_if, "l4-wire").unwrap();
    let mut seen = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let secret = format!("app-plaintext-{i}-{}", mesh.cluster.run_id());
        let who = mesh.who("a", "client", target, &secret).unwrap();
        assert_eq!(who.served_by, "server", "{target}");
        assert_eq!(who.message, secret);
        // The app sees the address it dialled, not ztunnel's listener ...
        assert_eq!(
            who.client_peer, *target,
            "getpeername() must show the dialled address"
        );
        // ... and the server sees the client pod's address, as without the mesh.
        let v4 = target.parse::<SocketAddr>().unwrap().is_ipv4();
        assert_eq!(
            peer_ip(&who.server_saw_peer),
            if v4 {
                std::net::IpAddr::from(client.ip4)
            } else {
                std::net::IpAddr::from(client.ip6.unwrap())
            },
            "{target}: the server saw {}",
            who.server_saw_peer
        );
        seen.push((target.clone(), who.client_local.clone(), secret));
    }
    let segments = wire.finish().unwrap();
    assert!(
        tls_on_port(&segments, 15008),
        "no TLS to :15008 on the node link"
    );
    for (target, _, secret) in &seen {
        assert!(
            !payload_contains(&segments, secret.as_bytes()),
            "plaintext for {target} crossed the node link"
        );
    }
    assert!(
        !segments
            .iter()
            .any(|s| [80, 8080].contains(&s.dport) || [80, 8080].contains(&s.sport)),
        "app ports seen on the node link: traffic bypassed the tunnel"
    );
    for (target, client_local, _) in &seen {
        let out = mesh.wait_access_log(0, "peer", client_local).unwrap();
        assert_eq!(field(&out, "protocol"), "HBONE", "{target}: {out}");
        assert_eq!(
            field(&out, "src.identity"),
            "spiffe://cluster.local/ns/a/sa/client"
        );
        assert_eq!(
            field(&out, "dst.identity"),
            "spiffe://cluster.local/ns/b/sa/server"
        );
    }
    // The destination ztunnel saw the client's identity through mTLS.
    let inbound = mesh.access_log(1);
    assert!(
        inbound.iter().any(|e| field(e, "direction") == "inbound"
            && field(e, "src.identity") == "spiffe://cluster.local/ns/a/sa/client"
            && field(e, "protocol") == "HBONE"),
        "destination ztunnel did not log the client identity: {inbound:?}"
    );
}

#[test]
fn mesh_and_non_mesh_talk_both_ways() {
    if !privileged() {
        return;
    }
    let mesh = base_mesh();
    let legacy = mesh.pod("plain", "legacy").unwrap();
    let server = mesh.pod("b", "server").unwrap();
    // Mesh → non-mesh: captured, then plain TCP.
    let who = mesh
        .who("a", "client", &addr(&legacy.ip4.to_string(), 8080), "out")
        .unwrap();
    assert_eq!(who.served_by, "legacy");
    let e = mesh.wait_access_log(0, "peer", &who.client_local).unwrap();
    assert_eq!(field(&e, "protocol"), "TCP", "{e}");
    // Non-mesh → mesh: plaintext accepted (PERMISSIVE), through the destination's ztunnel.
    for target in [
        addr(&server.ip4.to_string(), 8080),
        addr(&server.ip6.unwrap().to_string(), 8080),
    ] {
        let who = mesh.who("plain", "legacy", &target, "in").unwrap();
        assert_eq!(who.served_by, "server");
        let e = mesh.wait_access_log(1, "peer", &who.client_local).unwrap();
        assert_eq!(field(&e, "direction"), "inbound");
        assert_eq!(field(&e, "protocol"), "TCP");
        // The server sees the client's address, not its own.
        assert_eq!(
            peer_ip(&who.server_saw_peer),
            peer_ip(&who.client_local),
            "{target}"
        );
    }
}

/// The IP of an `ip:port` (v4-mapped addresses as IPv4).
fn peer_ip(addr: &str) -> std::net::IpAddr {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?}: {e}"))
        .ip()
        .to_canonical()
}

#[test]
fn enrollment_follows_labels_and_leaves_nothing() {
    if !privileged() {
        return;
    }
    let mesh = base_mesh();
    let server = mesh.pod("b", "server").unwrap();
    let target = addr(&server.ip4.to_string(), 8080);
    // The TCP settings ztunnel needs in an enrolled pod (see ztunnel's pods.rs) ...
    let sysctls = || {
        ["tcp_tw_reuse", "tcp_migrate_req", "tcp_fwmark_accept"].map(|name| {
            let out = mesh
                .exec(
                    "b",
                    "server",
                    &["cat", &format!("/proc/sys/net/ipv4/{name}")],
                )
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
    };
    // The policy route that brings the app's replies to a client's address back to ztunnel.
    let orig_src_rules = || {
        ["-4", "-6"].map(|family| {
            let out = mesh.exec("b", "server", &["ip", family, "rule"]).unwrap();
            String::from_utf8_lossy(&out.stdout).contains("lookup 1338")
        })
    };
    assert_eq!(sysctls(), ["1", "1", "1"]);
    assert_eq!(orig_src_rules(), [true, true]);
    // A restarted ztunnel finds them already set, so their origin is not its to know.
    mesh.stop_ztunnel(server.node, true);
    mesh.start_ztunnel(server.node).unwrap();
    mesh.wait_enrolled("b", "server").unwrap();
    // Namespace leaves the mesh: capture and listeners go, traffic still flows (plain).
    mesh.apply("00-ns.yaml", NAMESPACES_B_LEFT).unwrap();
    mesh.wait_unenrolled("b", "server").unwrap();
    // ... are back to what the pod had (the kernel's defaults).
    assert_eq!(sysctls(), ["2", "0", "0"]);
    assert_eq!(orig_src_rules(), [false, false]);
    let who = mesh.who("a", "client", &target, "after-leave").unwrap();
    assert_eq!(who.served_by, "server");
    let e = mesh.wait_access_log(0, "peer", &who.client_local).unwrap();
    assert_eq!(
        field(&e, "protocol"),
        "TCP",
        "destination left the mesh: {e}"
    );
    // Back in: enrolled again, HBONE again.
    mesh.apply("00-ns.yaml", NAMESPACES).unwrap();
    mesh.wait_enrolled("b", "server").unwrap();
    let who = mesh.who("a", "client", &target, "after-return").unwrap();
    let e = mesh.wait_access_log(0, "peer", &who.client_local).unwrap();
    assert_eq!(field(&e, "protocol"), "HBONE", "{e}");
    // A pod opting out with its own label.
    let opt_out = workloads().replace(
        "metadata: {name: server, namespace: b, labels: {app: server}}",
        "metadata: {name: server, namespace: b, labels: {app: server, istio.io/dataplane-mode: none}}",
    );
    mesh.apply("10-workloads.yaml", &opt_out).unwrap();
    mesh.wait_unenrolled("b", "server").unwrap();
    // A graceful stop is a restart: the pod stays captured and fails closed (its connection to
    // a plaintext destination, which would succeed direct, fails) ...
    let legacy = mesh.pod("plain", "legacy").unwrap();
    let legacy = addr(&legacy.ip4.to_string(), 8080);
    mesh.stop_ztunnel(0, true);
    assert!(
        mesh.who("a", "client", &legacy, "during-restart").is_err(),
        "a connection went direct while ztunnel was stopped"
    );
    // ... and a restarted ztunnel takes the pod back without any manual step.
    mesh.start_ztunnel(0).unwrap();
    mesh.wait_enrolled("a", "client").unwrap();
    wait_for(
        Duration::from_secs(20),
        "connections through the restarted ztunnel",
        || Ok(mesh.who("a", "client", &legacy, "after-restart").is_ok()),
    )
    .unwrap();
}

#[test]
fn config_edits_apply_live_and_bad_files_are_reported() {
    if !privileged() {
        return;
    }
    let mesh = base_mesh();
    let server = mesh.pod("b", "server").unwrap();
    let target = addr(&server.ip4.to_string(), 8080);
    // A new malformed file: reported by name, nothing else changes.
    mesh.write_raw(
        "99-broken.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: [oops\n",
    )
    .unwrap();
    wait_for(
        Duration::from_secs(10),
        "meshd to report 99-broken.yaml",
        || {
            Ok(mesh
                .meshd_log()
                .lines()
                .any(|l| l.contains("99-broken.yaml") && l.to_lowercase().contains("error")))
        },
    )
    .unwrap();
    // An existing file broken in place: its last good content stays in force.
    mesh.write_raw(
        "00-ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: b\n  labels: [\n",
    )
    .unwrap();
    wait_for(
        Duration::from_secs(10),
        "meshd to report 00-ns.yaml",
        || {
            Ok(mesh
                .meshd_log()
                .lines()
                .any(|l| l.contains("00-ns.yaml") && l.to_lowercase().contains("error")))
        },
    )
    .unwrap();
    assert!(
        mesh.captured("b", "server").unwrap(),
        "a broken file must not unenroll anything"
    );
    let who = mesh.who("a", "client", &target, "still-fine").unwrap();
    let e = mesh.wait_access_log(0, "peer", &who.client_local).unwrap();
    assert_eq!(
        field(&e, "protocol"),
        "HBONE",
        "last good config must stay in force: {e}"
    );
    // Fixing the file applies live, without restarts.
    mesh.apply("00-ns.yaml", NAMESPACES_B_LEFT).unwrap();
    mesh.wait_unenrolled("b", "server").unwrap();
}

#[test]
fn meshd_outage_keeps_traffic_flowing() {
    if !privileged() {
        return;
    }
    let mesh = base_mesh();
    let client = mesh.pod("a", "client").unwrap();
    let server = mesh.pod("b", "server").unwrap();
    let target = SocketAddr::new(server.ip4.into(), 8080);
    let mut long_lived = WhoConn::connect(&client, target).unwrap();
    assert_eq!(served_by(&long_lived.who("before").unwrap()), "server");

    mesh.kill_meshd();
    // The established connection carries on, and new ones still work on the last config.
    assert_eq!(served_by(&long_lived.who("during").unwrap()), "server");
    let mut fresh = WhoConn::connect(&client, target).unwrap();
    assert_eq!(
        served_by(&fresh.who("new-during-outage").unwrap()),
        "server"
    );
    let fresh_addr = fresh.local_addr().unwrap().to_string();
    drop(fresh);
    let e = mesh.wait_access_log(0, "peer", &fresh_addr).unwrap();
    assert_eq!(field(&e, "protocol"), "HBONE", "{e}");

    // meshd returns: both ztunnels resubscribe and a config change reaches them again.
    let snapshots = |i| {
        mesh.ztunnel_log(i)
            .matches("config snapshot from meshd")
            .count()
    };
    let before = (snapshots(0), snapshots(1));
    mesh.start_meshd().unwrap();
    wait_for(Duration::from_secs(20), "ztunnels to resubscribe", || {
        Ok(snapshots(0) > before.0 && snapshots(1) > before.1)
    })
    .unwrap();
    assert_eq!(served_by(&long_lived.who("after").unwrap()), "server");
    mesh.apply("00-ns.yaml", NAMESPACES_B_LEFT).unwrap();
    mesh.wait_unenrolled("b", "server").unwrap();
}

#[test]
fn burst_of_200_connects_opens_one_tls_connection() {
    if !privileged() {
        return;
    }
    let mesh = base_mesh();
    mesh.apply("20-burst.yaml", &pod("b", "burst", 1, "burst"))
        .unwrap();
    mesh.wait_listening("b", "burst", 8080).unwrap();
    mesh.wait_enrolled("b", "burst").unwrap();
    let client = mesh.pod("a", "client").unwrap();
    let burst = mesh.pod("b", "burst").unwrap();
    let target = SocketAddr::new(burst.ip4.into(), 8080);
    const N: usize = 200;
    // Threads started inside the pod's netns inherit it: all 200 connect at once.
    let results = client
        .netns
        .enter(move || {
            let barrier = Arc::new(Barrier::new(N));
            let threads: Vec<_> = (0..N)
                .map(|i| {
                    let barrier = barrier.clone();
                    std::thread::spawn(move || -> Result<String, String> {
                        barrier.wait();
                        let s =
                            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(10))
                                .map_err(|e| e.to_string())?;
                        s.set_read_timeout(Some(Duration::from_secs(20)))
                            .map_err(|e| e.to_string())?;
                        let mut w = s.try_clone().map_err(|e| e.to_string())?;
                        std::io::Write::write_all(&mut w, format!("WHO burst-{i}\n").as_bytes())
                            .map_err(|e| e.to_string())?;
                        let mut line = String::new();
                        std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line)
                            .map_err(|e| e.to_string())?;
                        Ok(line)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|_| Err("panicked".into())))
                .collect::<Vec<_>>()
        })
        .unwrap();
    let failures: Vec<_> = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .map_or(true, |l| !l.contains("\"served_by\":\"burst\""))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {N} connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let out = mesh
        .exec(
            "b",
            "burst",
            &["ss", "-Htn", "state", "established", "sport = :15008"],
        )
        .unwrap();
    let conns = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    assert_eq!(
        conns,
        1,
        "a burst of {N} connects must share one HBONE connection; ss shows:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn connection_churn_does_not_exhaust_the_pods_ports() {
    if !privileged() {
        return;
    }
    let mesh = base_mesh();
    // ztunnel dials the app (from the client's address) and closes first, leaving a TIME_WAIT
    // per connection. Give that pod only 3,000 ephemeral ports, then make 4,000 connections
    // through the mesh from one client, as fast as two threads go: without port reuse the last
    // ones would fail.
    let out = mesh
        .exec(
            "b",
            "server",
            &["sysctl", "-w", "net.ipv4.ip_local_port_range=40000 42999"],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = mesh.pod("a", "client").unwrap();
    let server = mesh.pod("b", "server").unwrap();
    let target = SocketAddr::new(server.ip4.into(), 8080);
    const PER_WORKER: usize = 2000;
    let failures = client
        .netns
        .enter(move || {
            let workers: Vec<_> = (0..2)
                .map(|w| {
                    std::thread::spawn(move || {
                        let mut failures = Vec::new();
                        for i in 0..PER_WORKER {
                            let r = std::net::TcpStream::connect_timeout(
                                &target,
                                Duration::from_secs(5),
                            )
                            .and_then(|s| {
                                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                                std::io::Write::write_all(
                                    &mut &s,
                                    format!("WHO churn-{w}-{i}\n").as_bytes(),
                                )?;
                                let mut line = String::new();
                                std::io::BufRead::read_line(
                                    &mut std::io::BufReader::new(&s),
                                    &mut line,
                                )?;
                                Ok(line)
                            });
                            match r {
                                Ok(line) if line.contains("\"served_by\":\"server\"") => {}
                                other => failures.push(format!("{w}/{i}: {other:?}")),
                            }
                        }
                        failures
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|t| t.join().unwrap_or_default())
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} connections failed (ephemeral ports exhausted?), first: {:?}",
        failures.len(),
        2 * PER_WORKER,
        &failures[..failures.len().min(3)]
    );
}
