//! eBPF capture end to end (run as root): original destinations under load, getpeername,
//! inbound destinations, what must stay untouched, fail-closed across a SIGKILL, cleanup, and
//! `auto` fallback. Every test brings up its own mesh with `--capture ebpf` (unique names per
//! run; the mesh's Drop removes everything, even on failure).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use localmesh::client::field;
use localmesh::wire::WireCapture;
use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::privileged;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: a, labels: {app: client}}
spec:
  nodeName: node-0
  serviceAccountName: client
  containers:
  - name: echo
    command: ["mesh-echo", "serve", "--port", "8080"]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: a, labels: {app: server}}
spec:
  nodeName: node-1
  serviceAccountName: server
  containers:
  - name: echo
    command: ["mesh-echo", "serve", "--port", "8080"]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: plain, labels: {app: legacy}}
spec:
  nodeName: node-1
  containers:
  - name: echo
    command: ["mesh-echo", "serve", "--port", "8080"]
"#;

fn ebpf_mesh() -> LocalMesh {
    ebpf_mesh_with(MeshOptions {
        capture: "ebpf".into(),
        ..MeshOptions::default()
    })
}

fn ebpf_mesh_with(opts: MeshOptions) -> LocalMesh {
    let mesh = LocalMesh::start(opts).expect("start mesh");
    mesh.apply("00-all.yaml", MANIFESTS).unwrap();
    for (ns, p) in [("a", "client"), ("a", "server"), ("plain", "legacy")] {
        mesh.wait_listening(ns, p, 8080).unwrap();
    }
    mesh.wait_enrolled("a", "client").unwrap();
    mesh.wait_enrolled("a", "server").unwrap();
    mesh
}

/// Listeners in `pod`'s netns on `ports`, each answering every connection with the address it
/// was accepted on (its local address) and the peer it saw, then closing.
fn addr_servers(pod: &testbed::Pod, v6: bool, ports: &[u16]) -> Vec<u16> {
    let mut bound = Vec::new();
    for &p in ports {
        let addr: SocketAddr = if v6 {
            format!("[::]:{p}")
        } else {
            format!("0.0.0.0:{p}")
        }
        .parse()
        .unwrap();
        let l = pod
            .netns
            .enter(move || TcpListener::bind(addr))
            .unwrap()
            .unwrap();
        bound.push(l.local_addr().unwrap().port());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let line = format!(
                    "{} {}\n",
                    s.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                    s.peer_addr().map(|a| a.to_string()).unwrap_or_default()
                );
                let mut s = s;
                let _ = s.write_all(line.as_bytes());
            }
        });
    }
    bound
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

/// 1,000 concurrent connects from one enrolled pod to 20 distinct destinations: each lands on
/// exactly the destination dialled (ztunnel recovered it), and getpeername shows it.
fn thousand_connects(mesh: &LocalMesh, family: &str) {
    let client = mesh.pod("a", "client").unwrap();
    let legacy = mesh.pod("plain", "legacy").unwrap();
    let v6 = family == "v6";
    let ports = addr_servers(&legacy, v6, &[0; 20]);
    let ip: IpAddr = match family {
        "v4" => legacy.ip4.into(),
        "v6" => legacy.ip6.unwrap().into(),
        // An IPv6 socket dialling a v4-mapped address (only connect6 sees it).
        _ => format!("::ffff:{}", legacy.ip4).parse().unwrap(),
    };
    let threads = 20;
    let per = 50;
    let barrier = Arc::new(Barrier::new(threads));
    let mut handles = Vec::new();
    for t in 0..threads {
        let (barrier, ports, netns) = (barrier.clone(), ports.clone(), client.netns.clone());
        handles.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let conns = netns
                .enter(move || -> anyhow::Result<Vec<(SocketAddr, TcpStream)>> {
                    let mut v = Vec::new();
                    for i in 0..per {
                        let dst = SocketAddr::new(ip, ports[(t * per + i) % ports.len()]);
                        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
                        v.push((dst, s));
                    }
                    Ok(v)
                })
                .map_err(anyhow::Error::from)??;
            // All of them open at once before any is read.
            barrier.wait();
            for (dst, s) in conns {
                assert_eq!(
                    s.peer_addr()?,
                    dst,
                    "getpeername must show the dialled address"
                );
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line)?;
                let accepted: SocketAddr =
                    line.split_whitespace().next().unwrap_or_default().parse()?;
                assert_eq!(
                    canonical(accepted),
                    canonical(dst),
                    "connection reached the wrong destination"
                );
            }
            Ok(())
        }));
    }
    for h in handles {
        h.join().unwrap().unwrap();
    }
}

#[test]
fn original_destination_1000_concurrent_connects_v4_v6_mapped() {
    if !privileged() {
        return;
    }
    original_destinations_each_taken_once(&ebpf_mesh());
}

/// The same with the two-call lookup a kernel before 5.14 forces (no lookup-and-delete on hash
/// maps): every destination right, and every record still removed.
#[test]
fn original_destination_without_lookup_and_delete_v4_v6_mapped() {
    if !privileged() {
        return;
    }
    let mesh = ebpf_mesh_with(MeshOptions {
        capture: "ebpf".into(),
        ztunnel_env: vec![("ZTUNNEL_EBPF_NO_TAKE".into(), "1".into())],
        ..MeshOptions::default()
    });
    wait_for(
        Duration::from_secs(10),
        "both ztunnels to say they look up in two calls",
        || {
            Ok((0..2).all(|n| {
                mesh.ztunnel_log(n)
                    .lines()
                    .any(|l| l.contains("eBPF capture loaded") && l.contains("\"map_take\":false"))
            }))
        },
    )
    .unwrap();
    original_destinations_each_taken_once(&mesh);
}

/// 1,000 concurrent connects per family (v4, v6, v4-mapped v6) each reach their own original
/// destination through node-0's ztunnel, and no record is left behind in either node's map.
fn original_destinations_each_taken_once(mesh: &LocalMesh) {
    for family in ["v4", "v6", "v4mapped"] {
        thousand_connects(mesh, family);
    }
    // They really went through ztunnel (outbound access log on node-0).
    wait_for(
        Duration::from_secs(30),
        "3,000 outbound access-log entries",
        || {
            Ok(mesh
                .access_log(0)
                .iter()
                .filter(|e| field(e, "direction") == "outbound")
                .count()
                >= 3000)
        },
    )
    .unwrap();
    // Each connection's original destination was taken out of the map as it was accepted:
    // none is left to be mistaken for a later connection's from the same port.
    for node in 0..2 {
        let left = port_records(&node_dir(mesh, node));
        assert_eq!(
            left, 0,
            "node-{node}: {left} unconsumed ZT_PORT_DST records"
        );
    }
}

/// How many original-destination records (client port -> destination) a ztunnel's map holds.
fn port_records(dir: &str) -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(format!("{dir}/ZT_PORT_DST"))
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump {dir}/ZT_PORT_DST: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    v.as_array().map_or(0, Vec::len)
}

#[test]
fn inbound_destination_preserved_and_hbone_port_not_captured() {
    if !privileged() {
        return;
    }
    let mesh = ebpf_mesh();
    let server = mesh.pod("a", "server").unwrap();
    for ip in [IpAddr::from(server.ip4), IpAddr::from(server.ip6.unwrap())] {
        let target = SocketAddr::new(ip, 8080).to_string();
        let who = mesh.who("plain", "legacy", &target, "in").unwrap();
        assert_eq!(who.served_by, "server");
        assert_eq!(
            who.client_peer.parse::<SocketAddr>().unwrap().to_string(),
            target
        );
        let e = mesh.wait_access_log(1, "peer", &who.client_local).unwrap();
        assert_eq!(field(&e, "direction"), "inbound", "{e}");
        assert_eq!(
            field(&e, "dst"),
            target,
            "inbound original destination: {e}"
        );
        // HBONE port: reaches ztunnel's 15008 listener itself, not the plaintext path.
        let hbone = SocketAddr::new(ip, meshcore::HBONE_PORT);
        let legacy = mesh.pod("plain", "legacy").unwrap();
        let s = legacy
            .netns
            .enter(move || TcpStream::connect_timeout(&hbone, Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        let local = s.local_addr().unwrap();
        wait_for(
            Duration::from_secs(10),
            "the 15008 connection at ztunnel",
            || {
                let out = mesh.exec(
                    "a",
                    "server",
                    &["ss", "-Htn", "state", "established", "( sport = :15008 )"],
                )?;
                Ok(String::from_utf8_lossy(&out.stdout).contains(&local.port().to_string()))
            },
        )
        .unwrap();
        assert!(
            mesh.access_log(1)
                .iter()
                .all(|e| field(e, "peer") != local.to_string()),
            "15008 went through the plaintext path"
        );
    }
}

#[test]
fn loopback_non_enrolled_and_host_untouched() {
    if !privileged() {
        return;
    }
    let mesh = ebpf_mesh();
    let client = mesh.pod("a", "client").unwrap();
    let legacy = mesh.pod("plain", "legacy").unwrap();
    for v6 in [false, true] {
        // Loopback inside an enrolled pod: straight to the app's listener.
        let port = addr_servers(&client, v6, &[0])[0];
        let lo: SocketAddr = if v6 {
            format!("[::1]:{port}")
        } else {
            format!("127.0.0.1:{port}")
        }
        .parse()
        .unwrap();
        let seen = client
            .netns
            .enter(move || read_line_from(lo))
            .unwrap()
            .unwrap();
        assert_eq!(seen.0, lo, "loopback was redirected");
        // A non-enrolled pod dialling out: the server sees it arrive unchanged, and nothing in
        // the non-enrolled pod is redirected (its socket's peer is the server's real listener).
        let sport = addr_servers(&client, v6, &[0])[0];
        let dst = SocketAddr::new(
            if v6 {
                client.ip6.unwrap().into()
            } else {
                client.ip4.into()
            },
            sport,
        );
        let before = mesh.access_log(1).len();
        let (accepted, _) = legacy
            .netns
            .enter(move || read_line_from(dst))
            .unwrap()
            .unwrap();
        assert_eq!(accepted, dst);
        assert!(
            mesh.access_log(1)[before..]
                .iter()
                .all(|e| field(e, "direction") != "outbound"),
            "node-1's ztunnel handled a non-enrolled pod's outbound connection"
        );
        // The host: a connection in the test's own namespace is not touched.
        let hport = {
            let l = TcpListener::bind(if v6 { "[::1]:0" } else { "127.0.0.1:0" }).unwrap();
            let p = l.local_addr().unwrap();
            std::thread::spawn(move || {
                if let Ok((mut s, _)) = l.accept() {
                    let _ = s.write_all(format!("{} x\n", s.local_addr().unwrap()).as_bytes());
                }
            });
            p
        };
        assert_eq!(read_line_from(hport).unwrap().0, hport);
    }
}

/// Connects to `dst`, returns (the address the server accepted on, our getpeername).
fn read_line_from(dst: SocketAddr) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let accepted: SocketAddr = text.split_whitespace().next().unwrap_or_default().parse()?;
    Ok((canonical(accepted), s.peer_addr()?))
}

/// The bpffs dir of node `i`'s ztunnel (the one containing a link pinned by that process).
fn node_dir(mesh: &LocalMesh, i: usize) -> String {
    loaded_dir(&mesh.ztunnel_log(i)).expect("ztunnel logged its eBPF dir")
}

/// The bpffs dir in the last "eBPF capture loaded" line of a ztunnel log (a restarted
/// ztunnel appends to its predecessor's log).
fn loaded_dir(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .filter(|l| l.contains("eBPF capture loaded"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["fields"]["dir"].as_str().map(str::to_string))
}

fn link_ids(dir: &str) -> Vec<u64> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir)
        .map(|d| d.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("link_") || name.starts_with("sklookup_")) {
            continue;
        }
        let out = Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(e.path())
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = v["id"].as_u64() {
            ids.push(id);
        }
    }
    ids
}

fn link_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn sigkill_fails_closed_restart_resumes_and_cleanup_leaves_nothing() {
    if !privileged() {
        return;
    }
    let mesh = ebpf_mesh();
    let legacy = mesh.pod("plain", "legacy").unwrap();
    let target = format!("{}:8080", legacy.ip4);
    mesh.who("a", "client", &target, "before").unwrap();
    let dir = node_dir(&mesh, 0);
    let ids = link_ids(&dir);
    assert!(
        ids.len() >= 6,
        "expected 5 cgroup links and an sk_lookup link, got {ids:?}"
    );

    mesh.stop_ztunnel(0, false);
    let node0 = mesh.cluster.nodes()[0].clone();
    let wire = WireCapture::start(&mesh.cluster, &node0.netns, &node0.fabric_if, "outage").unwrap();
    let marker = "PLAINTEXT-DURING-OUTAGE";
    for _ in 0..20 {
        assert!(
            mesh.who("a", "client", &target, marker).is_err(),
            "a connection went direct while ztunnel was down"
        );
    }
    let segs = wire.finish().unwrap();
    assert!(
        !segs
            .iter()
            .any(|s| s.dst == IpAddr::from(legacy.ip4) && s.dport == 8080),
        "packets left for the destination during the outage"
    );
    assert!(!localmesh::wire::payload_contains(&segs, marker.as_bytes()));

    // Back: adopts the pinned state and re-enrolls; new connections work.
    mesh.start_ztunnel(0).unwrap();
    wait_for(
        Duration::from_secs(30),
        "connections through the restarted ztunnel",
        || Ok(mesh.who("a", "client", &target, "after").is_ok()),
    )
    .unwrap();
    assert_eq!(
        node_dir(&mesh, 0),
        dir,
        "restart must adopt the same pinned state"
    );

    // SIGKILL again, then the cleanup command removes everything of ours.
    let ids = link_ids(&dir);
    mesh.stop_ztunnel(0, false);
    let out = mesh
        .cluster
        .run(
            &node0.netns,
            &[
                mesh.bins.ztunnel.to_str().unwrap(),
                "cleanup",
                "--node",
                "node-0",
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!std::path::Path::new(&dir).exists(), "cleanup left {dir}");
    wait_for(Duration::from_secs(10), "links to detach", || {
        Ok(ids.iter().all(|id| !link_exists(*id)))
    })
    .unwrap();
    // Unenrolled now (nothing captures): the pod goes direct.
    mesh.who("a", "client", &target, "direct").unwrap();
}

#[test]
fn graceful_stop_and_unenroll_leave_nothing() {
    if !privileged() {
        return;
    }
    let mesh = ebpf_mesh_with(MeshOptions {
        capture: "ebpf".into(),
        unenroll_on_exit: true,
        ..MeshOptions::default()
    });
    let dir = node_dir(&mesh, 1);
    let ids = link_ids(&dir);
    let sk_lookup_pins = || {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("sklookup_"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(sk_lookup_pins(), 1);
    // Unenroll by removing the pod: its sk_lookup link goes.
    mesh.apply(
        "00-all.yaml",
        &MANIFESTS.replace(
            "name: server, namespace: a",
            "name: server, namespace: plain",
        ),
    )
    .unwrap();
    wait_for(
        Duration::from_secs(20),
        "server's sk_lookup link to go",
        || Ok(sk_lookup_pins() == 0),
    )
    .unwrap();
    mesh.stop_ztunnel(1, true);
    assert!(
        !std::path::Path::new(&dir).exists(),
        "graceful stop left {dir}"
    );
    wait_for(Duration::from_secs(10), "links to detach", || {
        Ok(ids.iter().all(|id| !link_exists(*id)))
    })
    .unwrap();
}

#[test]
fn auto_falls_back_to_nftables_and_explicit_ebpf_fails_when_refused() {
    if !privileged() {
        return;
    }
    let mesh = ebpf_mesh();
    let node0 = mesh.cluster.nodes()[0].clone();
    mesh.stop_ztunnel(0, true);
    let token = mesh.dir().join("node-0.token");
    let sock = format!("unix:{}", mesh.dir().join("meshd.sock").display());
    let base = |mode: &str| {
        let mut c = Command::new(&mesh.bins.ztunnel);
        c.args([
            "--node",
            "node-0",
            "--meshd",
            &sock,
            "--log-format",
            "json",
            "--capture",
            mode,
        ])
        .arg("--token-file")
        .arg(&token)
        .env("ZTUNNEL_EBPF_REFUSE", "simulated by the test");
        c
    };
    // Explicit eBPF: a clear error, no silent fallback.
    let out = node0.netns.enter({
        let mut c = base("ebpf");
        move || c.output()
    });
    let out = out.unwrap().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("eBPF capture refused") && err.contains("simulated by the test"),
        "{err}"
    );
    // auto: falls back, says why, and captures with nftables.
    let mut proc = mesh
        .cluster
        .spawn(&node0.netns, base("auto"), "ztunnel-auto")
        .unwrap();
    mesh.wait_enrolled("a", "client").unwrap();
    let dump = mesh.config_dump(0).unwrap();
    assert_eq!(dump["captureMode"], "nftables");
    assert!(mesh.nft_table_present("a", "client").unwrap());
    let log = std::fs::read_to_string(proc.log_path()).unwrap();
    assert!(
        log.contains("falling back to nftables") && log.contains("simulated by the test"),
        "{log}"
    );
    let metrics = mesh
        .cluster
        .run(
            &node0.netns,
            &["curl", "-sf", "http://127.0.0.1:15020/metrics"],
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&metrics.stdout)
            .contains("ztunnel_capture_mode{mode=\"nftables\"} 1")
    );
    let legacy = mesh.pod("plain", "legacy").unwrap();
    let who = mesh
        .who("a", "client", &format!("{}:8080", legacy.ip4), "fallback")
        .unwrap();
    assert_eq!(who.served_by, "legacy");
    // SIGKILL the nftables ztunnel (its table stays), then switch back to eBPF: enrolling in
    // eBPF mode removes the other mode's table, so nothing captures twice.
    proc.kill();
    assert!(mesh.nft_table_present("a", "client").unwrap());
    mesh.start_ztunnel(0).unwrap();
    wait_for(
        Duration::from_secs(20),
        "eBPF re-enrollment to remove the nft table",
        || {
            Ok(mesh
                .config_dump(0)
                .is_ok_and(|d| d["captureMode"] == "ebpf")
                && !mesh.nft_table_present("a", "client")?)
        },
    )
    .unwrap();
    mesh.who("a", "client", &format!("{}:8080", legacy.ip4), "ebpf again")
        .unwrap();
}

// ---- Per-pod port exclusions (Istio's annotations), both capture modes ----

/// `client` (node-0) excludes outbound 9090, `server` (node-1) excludes inbound 9091; both
/// also serve 9090/9091 next to 8080, as does the non-mesh `legacy`.
fn exclusion_manifests(client_out: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: a, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: plain}}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: a
  annotations: {{traffic.sidecar.istio.io/excludeOutboundPorts: "{client_out}"}}
spec:
  nodeName: node-0
  serviceAccountName: client
  containers:
  - {{name: e, command: ["mesh-echo", "serve", "--port", "8080"]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: a
  annotations: {{traffic.sidecar.istio.io/excludeInboundPorts: "9091"}}
spec:
  nodeName: node-1
  serviceAccountName: server
  containers:
  - {{name: e, command: ["mesh-echo", "serve", "--port", "8080"]}}
  - {{name: f, command: ["mesh-echo", "serve", "--port", "9091"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: legacy, namespace: plain}}
spec:
  nodeName: node-1
  containers:
  - {{name: e, command: ["mesh-echo", "serve", "--port", "8080"]}}
  - {{name: f, command: ["mesh-echo", "serve", "--port", "9090"]}}
  - {{name: g, command: ["mesh-echo", "serve", "--port", "9092"]}}
"#
    )
}

fn exclusion_mesh(capture: &str) -> LocalMesh {
    let mesh = LocalMesh::start(MeshOptions {
        capture: capture.into(),
        ..MeshOptions::default()
    })
    .expect("start mesh");
    mesh.apply("00-excl.yaml", &exclusion_manifests("9090"))
        .unwrap();
    for (ns, p, port) in [
        ("a", "client", 8080),
        ("a", "server", 8080),
        ("a", "server", 9091),
        ("plain", "legacy", 8080),
        ("plain", "legacy", 9090),
        ("plain", "legacy", 9092),
    ] {
        mesh.wait_listening(ns, p, port).unwrap();
    }
    mesh.wait_enrolled("a", "client").unwrap();
    mesh.wait_enrolled("a", "server").unwrap();
    let dump = mesh.config_dump(0).unwrap();
    assert_eq!(dump["captureMode"], capture);
    // Where HBONE's records are sealed: what this kernel offers (the answer the probe gives
    // this test, on the same kernel) decides the path, with `--kernel-tls` at its default.
    let kernel = meshcore::ktls::probe();
    let encryption = &dump["hboneRecordEncryption"];
    assert_eq!(encryption["kernelTls"], kernel.to_string(), "{dump}");
    assert_eq!(encryption["setting"], "auto", "{dump}");
    if kernel == (meshcore::ktls::KernelTls::Available { rekey: true }) {
        assert_eq!(encryption["path"], "kernel (kTLS)", "{dump}");
    } else {
        assert_eq!(encryption["path"], "userspace (rustls)", "{dump}");
        assert_eq!(encryption["connectionsHandedToKernel"], 0, "{dump}");
    }
    mesh
}

/// `ns/pod` dials `target`; returns whether ztunnel on `node` captured it (decided against a
/// positive control: a captured connection made right after, whose log entry is awaited).
/// Asserts the destination saw the client's own socket when not captured.
fn captured_on(
    mesh: &LocalMesh,
    node: usize,
    direction: &str,
    (ns, pod): (&str, &str),
    target: &str,
) -> bool {
    let who = mesh.who(ns, pod, target, "excl").unwrap();
    let direct = who.server_saw_peer == who.client_local;
    let port = port_of(&who.client_local);
    let in_log = |log: &[serde_json::Value]| {
        log.iter()
            .any(|e| field(e, "direction") == direction && port_of(&field(e, "peer")) == port)
    };
    if !in_log(&mesh.access_log(node)) {
        // Not logged yet, or never: a later connection that surely is captured flushes the
        // doubt (entries are written when connections end, in order for one client).
        let ctl_target = match direction {
            "outbound" => mesh
                .pod("plain", "legacy")
                .map(|l| format!("{}:8080", l.ip4)),
            _ => mesh.pod("a", "server").map(|s| format!("{}:8080", s.ip4)),
        }
        .unwrap();
        let ctl = mesh.who(ns, pod, &ctl_target, "control").unwrap();
        let ctl_port = port_of(&ctl.client_local);
        wait_for(
            Duration::from_secs(10),
            "the control connection's access-log entry",
            || {
                Ok(mesh.access_log(node).iter().any(|e| {
                    field(e, "direction") == direction && port_of(&field(e, "peer")) == ctl_port
                }))
            },
        )
        .unwrap();
    }
    let captured = in_log(&mesh.access_log(node));
    if !captured {
        assert!(
            direct,
            "not captured, so the destination must see the client's own socket: {target}: saw {} vs {}",
            who.server_saw_peer, who.client_local
        );
    }
    captured
}

fn port_of(a: &str) -> u16 {
    a.parse::<SocketAddr>().map(|a| a.port()).unwrap_or(0)
}

fn exclusions_apply(capture: &str) {
    let mesh = exclusion_mesh(capture);
    let legacy = mesh.pod("plain", "legacy").unwrap();
    let server = mesh.pod("a", "server").unwrap();
    let v4_v6 = |p: &testbed::Pod| [IpAddr::from(p.ip4), IpAddr::from(p.ip6.unwrap())];
    for (lip, sip) in v4_v6(&legacy).into_iter().zip(v4_v6(&server)) {
        let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port).to_string();
        // Outbound: 9090 is excluded for client, 9092 is not.
        assert!(
            !captured_on(&mesh, 0, "outbound", ("a", "client"), &at(lip, 9090)),
            "{capture}: excluded outbound port {} was captured",
            at(lip, 9090)
        );
        assert!(
            captured_on(&mesh, 0, "outbound", ("a", "client"), &at(lip, 9092)),
            "{capture}: outbound port {} should be captured",
            at(lip, 9092)
        );
        // Inbound: 9091 is excluded for server, 8080 is not.
        assert!(
            !captured_on(&mesh, 1, "inbound", ("plain", "legacy"), &at(sip, 9091)),
            "{capture}: excluded inbound port {} was captured",
            at(sip, 9091)
        );
        assert!(
            captured_on(&mesh, 1, "inbound", ("plain", "legacy"), &at(sip, 8080)),
            "{capture}: inbound port {} should be captured",
            at(sip, 8080)
        );
    }
}

#[test]
fn port_exclusions_ebpf_v4_v6() {
    if !privileged() {
        return;
    }
    exclusions_apply("ebpf");
}

#[test]
fn port_exclusions_nftables_v4_v6() {
    if !privileged() {
        return;
    }
    exclusions_apply("nftables");
}

/// Changing the annotation on a running pod takes effect without restarting anything; a
/// malformed value is reported and ignored.
fn exclusion_change_applies_live(capture: &str) {
    let mesh = exclusion_mesh(capture);
    let legacy = mesh.pod("plain", "legacy").unwrap();
    let p9090 = format!("{}:9090", legacy.ip4);
    let p9092 = format!("[{}]:9092", legacy.ip6.unwrap());
    assert!(!captured_on(&mesh, 0, "outbound", ("a", "client"), &p9090));
    // An open connection survives the change (no re-enrollment).
    let client = mesh.pod("a", "client").unwrap();
    let dst: SocketAddr = format!("{}:8080", legacy.ip4).parse().unwrap();
    let mut open = client
        .netns
        .enter(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    mesh.apply("00-excl.yaml", &exclusion_manifests("9092"))
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "9092 to be excluded and 9090 captured",
        || {
            Ok(!captured_on(&mesh, 0, "outbound", ("a", "client"), &p9092)
                && captured_on(&mesh, 0, "outbound", ("a", "client"), &p9090))
        },
    )
    .unwrap();
    open.write_all(b"WHO still-open\n").unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    BufReader::new(&open).read_line(&mut line).unwrap();
    assert!(
        line.contains("still-open"),
        "open connection broke: {line:?}"
    );
    // Malformed: logged with the pod and annotation named, and nothing is excluded.
    mesh.apply("00-excl.yaml", &exclusion_manifests("9092,http"))
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "the malformed annotation to be reported",
        || {
            let log = mesh.ztunnel_log(0);
            Ok(log.lines().any(|l| {
                l.contains("ignoring malformed port exclusion annotation")
                    && l.contains("a/client")
                    && l.contains("excludeOutboundPorts")
            }))
        },
    )
    .unwrap();
    wait_for(Duration::from_secs(20), "9092 to be captured again", || {
        Ok(captured_on(&mesh, 0, "outbound", ("a", "client"), &p9092))
    })
    .unwrap();
}

#[test]
fn port_exclusion_change_applies_live_ebpf() {
    if !privileged() {
        return;
    }
    exclusion_change_applies_live("ebpf");
}

#[test]
fn port_exclusion_change_applies_live_nftables() {
    if !privileged() {
        return;
    }
    exclusion_change_applies_live("nftables");
}

// ---- Same-node fast path (--fast-path) ----

const FAST_MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: f, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: f, labels: {app: client}}
spec:
  nodeName: node-0
  serviceAccountName: client
  containers: []
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: f, labels: {app: server}}
spec:
  nodeName: node-0
  serviceAccountName: server
  containers:
  - {name: e, command: ["mesh-echo", "serve", "--port", "8080"]}
"#;

const FAST_DENY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: f}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/f/sa/client"]}}]
"#;

/// An ECHO connection from the client pod to `dst` (made inside the pod's netns).
fn echo_conn(pod: &testbed::Pod, dst: SocketAddr) -> TcpStream {
    let mut s = pod
        .netns
        .enter(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"ECHO\n").unwrap();
    s
}

/// Sends `n` pseudo-random bytes while reading them back; asserts they come back intact.
fn echo_intact(s: &TcpStream, n: usize, seed: u64) {
    let data: Vec<u8> = (0..n as u64)
        .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed)) >> 7) as u8)
        .collect();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut back = vec![0u8; n];
    (&*s).read_exact(&mut back).unwrap();
    writer.join().unwrap().unwrap();
    assert!(back == data, "echoed bytes differ");
}

#[test]
fn fast_path_same_node_integrity_deny_and_live_close() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions {
        capture: "ebpf".into(),
        fast_path: true,
        ..MeshOptions::default()
    })
    .expect("start mesh");
    mesh.apply("00-fast.yaml", FAST_MANIFESTS).unwrap();
    mesh.wait_listening("f", "server", 8080).unwrap();
    mesh.wait_enrolled("f", "client").unwrap();
    mesh.wait_enrolled("f", "server").unwrap();
    let client = mesh.pod("f", "client").unwrap();
    let server = mesh.pod("f", "server").unwrap();
    for ip in [IpAddr::from(server.ip4), IpAddr::from(server.ip6.unwrap())] {
        let dst = SocketAddr::new(ip, 8080);
        // 8 MiB up and back: both directions through the splice, intact.
        let s = echo_conn(&client, dst);
        echo_intact(&s, 8 << 20, ip.is_ipv4() as u64);
        let port = s.local_addr().unwrap().port();
        // Half-close: our FIN reaches the server, whose FIN comes back.
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        (&s).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(s);
        let e = wait_for_entry(&mesh, 0, port);
        assert_eq!(e["fast_path"], true, "not spliced: {e}");
        assert_eq!(field(&e, "message"), "connection complete", "{e}");
        assert_eq!(e["received"].as_u64(), Some((8 << 20) + 5), "{e}");
        assert_eq!(e["sent"].as_u64(), Some(8 << 20), "{e}");
        // The server saw the client pod (identity-checked), and getpeername still lies well.
        let who = mesh.who("f", "client", &dst.to_string(), "fast").unwrap();
        assert_eq!(who.served_by, "server");
        assert_eq!(who.client_peer.parse::<SocketAddr>().unwrap(), dst);
    }
    // A live spliced connection is closed by a policy change that now denies it.
    let dst = SocketAddr::new(server.ip4.into(), 8080);
    let live = echo_conn(&client, dst);
    echo_intact(&live, 64 << 10, 7);
    mesh.write_raw("50-deny.yaml", FAST_DENY).unwrap();
    let mut buf = [0u8; 16];
    let r = (&live).read(&mut buf);
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "spliced connection still open after DENY: {r:?}"
    );
    let port = live.local_addr().unwrap().port();
    let e = wait_for_entry(&mesh, 0, port);
    assert_eq!(field(&e, "response_flags"), "DENY", "{e}");
    // New connections are refused while the DENY holds, in both families.
    for ip in [IpAddr::from(server.ip4), IpAddr::from(server.ip6.unwrap())] {
        let target = SocketAddr::new(ip, 8080).to_string();
        assert!(
            mesh.who("f", "client", &target, "denied").is_err(),
            "DENY policy did not refuse the fast path to {target}"
        );
    }
    let denied = mesh.access_log(0);
    assert!(
        denied
            .iter()
            .any(|e| e["fast_path"] == true && field(e, "response_flags") == "DENY"),
        "no DENY entry for the fast path"
    );
    // Lifting the policy restores it.
    mesh.write_raw("50-deny.yaml", "").unwrap();
    wait_for(
        Duration::from_secs(20),
        "the fast path after lifting DENY",
        || {
            Ok(mesh
                .who("f", "client", &format!("{}:8080", server.ip4), "again")
                .is_ok())
        },
    )
    .unwrap();
}

/// One SINK connection from the client pod to `dst`: `n` bytes written as fast as the kernel
/// takes them (64 KiB writes), then a half-close; returns the server's byte count (its reply,
/// which must travel back after our FIN), the reply's length and our local port.
fn sink_half_close(pod: &testbed::Pod, dst: SocketAddr, n: usize) -> (u64, u64, u16) {
    let s = pod
        .netns
        .enter(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    (&s).write_all(b"SINK\n").unwrap();
    let chunk = vec![0xA5u8; 64 << 10];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len());
        (&s).write_all(&chunk[..k]).unwrap();
        left -= k;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    (&s).read_to_string(&mut reply).unwrap_or_else(|e| {
        panic!("reading the SINK reply after half-close to {dst}: {e} (got {reply:?})")
    });
    let v: serde_json::Value = serde_json::from_str(reply.trim())
        .unwrap_or_else(|e| panic!("bad SINK reply {reply:?} from {dst}: {e}"));
    (
        v["received"].as_u64().expect("received"),
        reply.len() as u64,
        s.local_addr().unwrap().port(),
    )
}

#[test]
fn fast_path_bulk_one_way_then_half_close_v4_v6() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions {
        capture: "ebpf".into(),
        fast_path: true,
        ..MeshOptions::default()
    })
    .expect("start mesh");
    mesh.apply("00-fast.yaml", FAST_MANIFESTS).unwrap();
    mesh.wait_listening("f", "server", 8080).unwrap();
    mesh.wait_enrolled("f", "client").unwrap();
    mesh.wait_enrolled("f", "server").unwrap();
    let client = mesh.pod("f", "client").unwrap();
    let server = mesh.pod("f", "server").unwrap();
    const N: usize = 64 << 20;
    for ip in [IpAddr::from(server.ip4), IpAddr::from(server.ip6.unwrap())] {
        let dst = SocketAddr::new(ip, 8080);
        // A one-way blast far faster than the server leg drains, then our FIN: every byte must
        // reach the server before its EOF, and its reply must come back. On failure, ztunnel's
        // side of the story (its access-log line names the error).
        let (received, reply_len, port) =
            match std::panic::catch_unwind(|| sink_half_close(&client, dst, N)) {
                Ok(r) => r,
                Err(e) => {
                    let log = mesh.ztunnel_log(0);
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    panic!(
                        "{:?}\nztunnel log tail:\n{}",
                        e.downcast_ref::<String>(),
                        tail.join("\n")
                    );
                }
            };
        assert_eq!(
            received, N as u64,
            "server counted {received} of {N} bytes via {dst}"
        );
        let e = wait_for_entry(&mesh, 0, port);
        assert_eq!(e["fast_path"], true, "not spliced: {e}");
        assert_eq!(field(&e, "message"), "connection complete", "{e}");
        assert_eq!(e["received"].as_u64(), Some(N as u64 + 5), "{e}");
        assert_eq!(e["sent"].as_u64(), Some(reply_len), "{e}");
    }
}

/// The outbound access-log entry of node `node` for the client port `port`.
fn wait_for_entry(mesh: &LocalMesh, node: usize, port: u16) -> serde_json::Value {
    let mut found = None;
    wait_for(
        Duration::from_secs(20),
        &format!("access-log entry for :{port}"),
        || {
            found = mesh.access_log(node).into_iter().find(|e| {
                field(e, "direction") == "outbound" && port_of(&field(e, "peer")) == port
            });
            Ok(found.is_some())
        },
    )
    .unwrap();
    found.unwrap()
}

/// `ztunnel cleanup --orphans` removes the state of a ztunnel whose node is gone, and nothing
/// else: not a live ztunnel's, and not a killed one's that may still come back (its pods must
/// keep failing closed meanwhile).
#[test]
fn orphan_cleanup_removes_only_state_of_vanished_nodes() {
    if !privileged() {
        return;
    }
    let mesh = ebpf_mesh();
    let live = node_dir(&mesh, 0);
    let killed = node_dir(&mesh, 1);
    mesh.stop_ztunnel(1, false);

    // A node that vanishes while its ztunnel is killed: a one-node cluster of its own whose
    // ztunnel gets as far as pinning its capture (meshd is unreachable, it keeps retrying).
    let orphan = {
        let gone = testbed::Cluster::new(testbed::ClusterConfig {
            nodes: 1,
            ipv6: false,
        })
        .unwrap();
        let node = gone.nodes()[0].clone();
        let token = gone.dir().join("token");
        std::fs::write(&token, "unused").unwrap();
        let mut cmd = Command::new(&mesh.bins.ztunnel);
        cmd.args([
            "--node",
            "gone",
            "--capture",
            "ebpf",
            "--log-format",
            "json",
        ])
        .arg("--meshd")
        .arg(format!(
            "unix:{}",
            gone.dir().join("no-meshd.sock").display()
        ))
        .arg("--token-file")
        .arg(&token);
        let mut z = gone.spawn(&node.netns, cmd, "ztunnel-gone").unwrap();
        let mut dir = None;
        wait_for(
            Duration::from_secs(20),
            "the ztunnel to pin its capture",
            || {
                dir = loaded_dir(&std::fs::read_to_string(z.log_path()).unwrap_or_default());
                Ok(dir.is_some())
            },
        )
        .unwrap();
        z.kill();
        dir.unwrap()
    }; // the cluster, with its node's namespace, is gone here
    let guard = OrphanGuard(mesh.bins.ztunnel.clone());
    assert!(std::path::Path::new(&orphan).exists());

    let cleanup = |dry: bool| {
        let mut cmd = Command::new(&mesh.bins.ztunnel);
        cmd.args(["cleanup", "--orphans"]);
        if dry {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A mesh starting in a test beside this one sweeps orphans too: not while we look.
    let sweeps_wait = localmesh::orphan_sweep_lock().unwrap();
    let listed = cleanup(true);
    assert!(
        listed.lines().any(|l| l == orphan),
        "{orphan} not listed in {listed:?}"
    );
    assert!(
        !listed.contains(&live) && !listed.contains(&killed),
        "{listed}"
    );
    assert!(
        std::path::Path::new(&orphan).exists(),
        "--dry-run removed it"
    );

    assert!(cleanup(false).lines().any(|l| l == orphan));
    drop(sweeps_wait);
    assert!(!std::path::Path::new(&orphan).exists(), "orphan left");
    for dir in [&live, &killed] {
        assert!(std::path::Path::new(dir).exists(), "cleanup removed {dir}");
    }
    drop(guard);

    // Node 0 still captures; node 1's pods still fail closed.
    let legacy = mesh.pod("plain", "legacy").unwrap();
    let who = mesh
        .who("a", "client", &format!("{}:8080", legacy.ip4), "x")
        .unwrap();
    let e = mesh.wait_access_log(0, "peer", &who.client_local).unwrap();
    assert_eq!(field(&e, "direction"), "outbound", "{e}");
    let server = mesh.pod("a", "server").unwrap();
    assert!(
        mesh.who("plain", "legacy", &format!("{}:8080", server.ip4), "x")
            .is_err(),
        "node 1's ztunnel is down: its pods must fail closed"
    );
}

/// Sweeps orphans even when the test fails half-way.
struct OrphanGuard(std::path::PathBuf);

impl Drop for OrphanGuard {
    fn drop(&mut self) {
        let _ = Command::new(&self.0)
            .args(["cleanup", "--orphans"])
            .output();
    }
}

// ---- No capture bypass through other local addresses (audit H1), both capture modes ----

/// `h/strict` (STRICT, DENY on 9090) and `h/perm` (PERMISSIVE, DENY on 9090) on node 1, and
/// the non-mesh `plain/legacy` there too (the control: its extra addresses do answer).
fn bypass_manifests() -> String {
    use mesh_tests::manifests::{echo_pod, namespace};
    namespace("h", true)
        + &namespace("plain", false)
        + &echo_pod("h", "strict", 1, "strict", &[8080, 9090])
        + &echo_pod("h", "perm", 1, "perm", &[8080, 9090])
        + &echo_pod("plain", "legacy", 1, "default", &[8080, 9090])
        + r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: h}
spec:
  selector: {matchLabels: {app: strict}}
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-9090, namespace: h}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ["9090"]}}]
"#
}

/// Runs `argv` in `netns`, requiring success; its stdout.
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

/// The word after `key` in `text`.
fn word_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace().skip_while(|w| *w != key).nth(1)
}

/// Addresses of `pod` that are not its pod IPs, as its node reaches them: its eth0's IPv6
/// link-local address (scoped to the node's veth to it), and a v4 and a v6 secondary address
/// added now (`k` keeps pods apart) and routed from the node, the v4 one also v4-mapped.
fn extra_addresses(mesh: &LocalMesh, pod: &testbed::Pod, k: u8) -> Vec<std::net::SocketAddrV6> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};
    let node = &mesh.cluster.nodes()[pod.node];
    let route = run_in(
        mesh,
        &node.netns,
        &["ip", "-o", "route", "get", &pod.ip4.to_string()],
    );
    let veth = word_after(&route, "dev")
        .expect("a route to the pod")
        .to_string();
    let link = run_in(
        mesh,
        &node.netns,
        &["ip", "-o", "link", "show", "dev", &veth],
    );
    let ifindex: u32 = link.split(':').next().unwrap().trim().parse().unwrap();
    let ll = run_in(
        mesh,
        &pod.netns,
        &[
            "ip", "-o", "-6", "addr", "show", "dev", "eth0", "scope", "link",
        ],
    );
    let ll: Ipv6Addr = word_after(&ll, "inet6")
        .and_then(|a| a.split('/').next())
        .expect("eth0 has a link-local address")
        .parse()
        .unwrap();
    let (v4, v6): (Ipv4Addr, Ipv6Addr) = (
        format!("10.99.0.{k}").parse().unwrap(),
        format!("fd00:99::{k}").parse().unwrap(),
    );
    for (ns, argv) in [
        (
            &pod.netns,
            vec!["ip", "addr", "add", &format!("{v4}/32"), "dev", "eth0"],
        ),
        (
            &pod.netns,
            vec![
                "ip",
                "addr",
                "add",
                &format!("{v6}/128"),
                "dev",
                "eth0",
                "nodad",
            ],
        ),
        (
            &node.netns,
            vec!["ip", "route", "add", &format!("{v4}/32"), "dev", &veth],
        ),
        (
            &node.netns,
            vec![
                "ip",
                "-6",
                "route",
                "add",
                &format!("{v6}/128"),
                "dev",
                &veth,
            ],
        ),
    ] {
        run_in(mesh, ns, &argv);
    }
    vec![
        SocketAddrV6::new(ll, 0, 0, ifindex),
        SocketAddrV6::new(v4.to_ipv6_mapped(), 0, 0, 0),
        SocketAddrV6::new(v6, 0, 0, 0),
    ]
}

/// From `netns`, a WHO to `addr`: who served it, or why nothing did.
fn who_from(netns: &testbed::Netns, addr: SocketAddr) -> Result<String, String> {
    netns
        .enter(move || {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok();
            (&s).write_all(b"WHO h1\n")
                .map_err(|e| format!("write: {e}"))?;
            let mut line = String::new();
            BufReader::new(&s)
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|_| format!("no reply ({line:?})"))?;
            Ok(v["served_by"].as_str().unwrap_or_default().to_string())
        })
        .map_err(|e| e.to_string())?
}

/// The v4-mapped form as the IPv4 address it is (the kernel dials it as IPv4 anyway).
fn plain(a: std::net::SocketAddrV6, port: u16) -> SocketAddr {
    let mut a = a;
    a.set_port(port);
    canonical(SocketAddr::V6(a))
}

/// From the node's netns (a host-network process, which reaches every address of its pods):
/// the pods' link-local and secondary addresses answer for the non-mesh pod, and never for
/// the enrolled ones — STRICT or PERMISSIVE, app port or DENY port. Their pod IPs behave as
/// policy says (the controls). With `--ebpf-log debug` the eBPF programs log the attempts.
fn no_bypass_through_other_addresses(capture: &str) {
    let ebpf = capture == "ebpf";
    let mesh = LocalMesh::start(MeshOptions {
        capture: capture.into(),
        ztunnel_args: if ebpf {
            vec!["--ebpf-log".into(), "debug".into()]
        } else {
            Vec::new()
        },
        ..MeshOptions::default()
    })
    .expect("start mesh");
    mesh.apply("00-h1.yaml", &bypass_manifests()).unwrap();
    for (ns, p) in [("h", "strict"), ("h", "perm"), ("plain", "legacy")] {
        for port in [8080, 9090] {
            mesh.wait_listening(ns, p, port).unwrap();
        }
    }
    mesh.wait_enrolled("h", "strict").unwrap();
    mesh.wait_enrolled("h", "perm").unwrap();
    let node = mesh.cluster.nodes()[1].netns.clone();
    let pod = |n: &str, p: &str| mesh.pod(n, p).unwrap();
    let (strict, perm, legacy) = (pod("h", "strict"), pod("h", "perm"), pod("plain", "legacy"));

    // Controls through the pod IPs: PERMISSIVE serves plaintext on 8080, not on its DENY
    // port; STRICT refuses plaintext; the non-mesh pod serves.
    let at = |ip: std::net::Ipv4Addr, port| SocketAddr::new(IpAddr::V4(ip), port);
    wait_for(Duration::from_secs(10), "policy in force", || {
        Ok(who_from(&node, at(perm.ip4, 9090)).is_err()
            && who_from(&node, at(strict.ip4, 8080)).is_err())
    })
    .unwrap();
    assert_eq!(who_from(&node, at(perm.ip4, 8080)).as_deref(), Ok("perm"));
    assert_eq!(
        who_from(&node, at(legacy.ip4, 8080)).as_deref(),
        Ok("legacy")
    );

    for (i, (target, name)) in [(&legacy, "legacy"), (&strict, "strict"), (&perm, "perm")]
        .into_iter()
        .enumerate()
    {
        for extra in extra_addresses(&mesh, target, 10 + i as u8) {
            for port in [8080, 9090] {
                let addr = plain(extra, port);
                let got = who_from(&node, addr);
                if name == "legacy" {
                    assert_eq!(got.as_deref(), Ok("legacy"), "{capture}: control {addr}");
                } else {
                    assert!(
                        got.is_err(),
                        "{capture}: {name} answered plaintext at {addr}, a local address that is not its pod IP ({got:?}): capture was bypassed"
                    );
                }
            }
        }
    }
    if ebpf {
        // The link-local attempts show up in the kernel's decision log, with their reason.
        let ll = extra_addresses_logged(&mesh, &strict);
        wait_for(
            Duration::from_secs(10),
            "the eBPF decision log line",
            || {
                Ok(mesh.ztunnel_log(1).lines().any(|l| {
                    l.contains("sk_lookup redirect reason=foreign-address") && l.contains(&ll)
                }))
            },
        )
        .unwrap();
    }
}

/// `pod`'s link-local address as the eBPF log writes it.
fn extra_addresses_logged(mesh: &LocalMesh, pod: &testbed::Pod) -> String {
    let ll = run_in(
        mesh,
        &pod.netns,
        &[
            "ip", "-o", "-6", "addr", "show", "dev", "eth0", "scope", "link",
        ],
    );
    let ll: std::net::Ipv6Addr = word_after(&ll, "inet6")
        .and_then(|a| a.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    format!("dst=[{ll}]:8080")
}

#[test]
fn no_bypass_through_link_local_or_secondary_addresses_ebpf() {
    if !privileged() {
        return;
    }
    no_bypass_through_other_addresses("ebpf");
}

#[test]
fn no_bypass_through_link_local_or_secondary_addresses_nftables() {
    if !privileged() {
        return;
    }
    no_bypass_through_other_addresses("nftables");
}

// ---- ztunnel's in-pod listeners cannot be joined (audit L6), both capture modes ----

/// A root process in the pod binding ztunnel's ports with SO_REUSEPORT, as the audit's
/// attacker did: prints `bound PORT` or `refused PORT ERRNO`, then `ready`, then
/// `accepted PORT` for every connection it takes (and closes).
const REUSEPORT_JOINER: &str = r#"
import os, select, socket, sys
if len(sys.argv) > 1:
    os.seteuid(int(sys.argv[1]))  # a root with CAP_SETUID can own sockets as any uid
socks = {}
for host, port in [("0.0.0.0", 15008), ("0.0.0.0", 15006), ("127.0.0.1", 15001)]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
        s.listen(128)
        socks[s] = port
        print("bound", port, flush=True)
    except OSError as e:
        print("refused", port, e.errno, flush=True)
print("ready", flush=True)
while socks:
    for s in select.select(list(socks), [], [])[0]:
        c, peer = s.accept()
        print("accepted", socks[s], peer, flush=True)
        c.close()
"#;

/// With the joiner running in the server pod, every connection through each of ztunnel's
/// listeners there — HBONE in (15008), plaintext in (15006), the pod's own outbound (15001)
/// — is ztunnel's: all succeed and the joiner takes none. (It used to take about half.)
/// `as_listener_uid`: the joiner takes the uid ztunnel's listeners are owned by, so it does
/// join their groups (eBPF capture still gives it nothing; nftables cannot stop that one).
fn reuseport_joiner_takes_nothing(capture: &str, as_listener_uid: bool) {
    let mesh = ebpf_mesh_with(MeshOptions {
        capture: capture.into(),
        ..MeshOptions::default()
    });
    let server = mesh.pod("a", "server").unwrap();
    let legacy = mesh.pod("plain", "legacy").unwrap();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", REUSEPORT_JOINER]);
    if as_listener_uid {
        // ztunnel::netns::LISTENER_UID
        cmd.arg((u32::MAX - 2).to_string());
    }
    let joiner = mesh
        .cluster
        .spawn(&server.netns, cmd, "reuseport-joiner")
        .unwrap();
    let log = || std::fs::read_to_string(joiner.log_path()).unwrap_or_default();
    wait_for(
        Duration::from_secs(10),
        "the joiner to try its binds",
        || Ok(log().lines().any(|l| l == "ready")),
    )
    .unwrap();
    if as_listener_uid {
        for port in [15008, 15006, 15001] {
            assert!(
                log().lines().any(|l| l == format!("bound {port}")),
                "the joiner with ztunnel's uid should have joined :{port}:\n{}",
                log()
            );
        }
    }
    const N: usize = 20;
    let to_server = format!("{}:8080", server.ip4);
    let to_legacy = format!("{}:8080", legacy.ip4);
    for i in 0..N {
        for (ns, pod, target, want) in [
            ("a", "client", &to_server, "server"),
            ("plain", "legacy", &to_server, "server"),
            ("a", "server", &to_legacy, "legacy"),
        ] {
            let who = mesh.who(ns, pod, target, "l6");
            assert!(
                who.as_ref().is_ok_and(|w| w.served_by == want),
                "{capture}: connection {i} {ns}/{pod} -> {target} failed ({:?}); the joiner says:\n{}",
                who.err(),
                log()
            );
        }
    }
    assert!(
        !log().lines().any(|l| l.starts_with("accepted")),
        "{capture}: a root process in the pod took connections off ztunnel's listeners:\n{}",
        log()
    );
    if capture == "ebpf" {
        // The decision log is off by default: the programs log nothing.
        assert!(
            !mesh
                .ztunnel_log(1)
                .contains("\"target\":\"ztunnel::ebpf::kernel\""),
            "eBPF decisions were logged without --ebpf-log"
        );
    }
}

#[test]
fn reuseport_joiner_in_the_pod_takes_no_connection_ebpf() {
    if !privileged() {
        return;
    }
    reuseport_joiner_takes_nothing("ebpf", false);
}

/// eBPF capture hands connections to exactly ztunnel's sockets (sk_lookup, no reuseport
/// selection), so even a joiner that became ztunnel's listener uid gets none.
#[test]
fn reuseport_joiner_with_ztunnels_uid_takes_no_connection_ebpf() {
    if !privileged() {
        return;
    }
    reuseport_joiner_takes_nothing("ebpf", true);
}

#[test]
fn reuseport_joiner_in_the_pod_takes_no_connection_nftables() {
    if !privileged() {
        return;
    }
    reuseport_joiner_takes_nothing("nftables", false);
}
