//! Hostile peers cannot exhaust a node (audit H4, M2, M3, M4, L1): real namespaces, real capture
//! (`MESH_CAPTURE=ebpf|nftables`), the independent Python HBONE peer (`tests/py/hbone_probe.py`)
//! with a certificate from the mesh's own CA, so it is an authenticated mesh client.
//!
//! Each test builds its own mesh and tears it down even when an assertion fails.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{manifests, privileged};
use meshcore::Identity;
use meshcore::ca::CertAuthority;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(20);
/// A port nothing listens on in the server pod.
const CLOSED_PORT: u16 = 7778;

/// `wire/server` (ambient, node-1, echo on 8080), `outside/outsider` (not in the mesh, node-0,
/// no process: the probes run there, uncaptured) and `outside/idler` (not in the mesh, node-1).
fn mesh() -> LocalMesh {
    let mesh = LocalMesh::start(MeshOptions::default()).expect("start local mesh");
    let ns = manifests::namespace("hostile", true) + &manifests::namespace("outside", false);
    mesh.apply("00-ns.yaml", &ns).unwrap();
    let pods = manifests::echo_pod("hostile", "server", 1, "api", &[8080])
        + &manifests::pod("outside", "outsider", 0, "default", &[])
        + &manifests::pod("outside", "idler", 1, "default", &[]);
    mesh.apply("10-pods.yaml", &pods).unwrap();
    mesh.wait_listening("hostile", "server", 8080).unwrap();
    mesh.wait_enrolled("hostile", "server").unwrap();
    mesh
}

/// PEM files of an identity the mesh's CA signed, for the Python peer.
struct Pems {
    cert: String,
    key: String,
    ca: String,
}

fn client_pems(mesh: &LocalMesh) -> Pems {
    let dir = mesh.state_dir.join("ca");
    wait_for(DEADLINE, "meshd to create its CA root", || {
        Ok(dir.join("root-cert.pem").exists() && dir.join("root-key.pem").exists())
    })
    .unwrap();
    let ca = CertAuthority::load_or_create(&dir, &mesh.opts.trust_domain).expect("mesh CA");
    let id = Identity::new(&mesh.opts.trust_domain, "outside", "prober");
    let cert = ca
        .mint(&id, Duration::from_secs(3600))
        .expect("mint a client cert");
    let path = |what: &str| -> PathBuf { mesh.dir().join(format!("hostile-{what}.pem")) };
    let (c, k, a) = (path("cert"), path("key"), path("ca"));
    std::fs::write(&c, cert.chain_pem.concat()).unwrap();
    std::fs::write(&k, &cert.key_pem).unwrap();
    std::fs::write(&a, ca.root_pem()).unwrap();
    let s = |p: PathBuf| p.display().to_string();
    Pems {
        cert: s(c),
        key: s(k),
        ca: s(a),
    }
}

/// Runs `hbone_probe.py <mode> ...` in `netns`; returns its one JSON line.
fn probe(mesh: &LocalMesh, netns: &testbed::Netns, pems: &Pems, args: &[&str]) -> Value {
    let py = std::env::var("MESH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join("hbone_probe.py")
        .display()
        .to_string();
    let mut argv = vec![py.as_str(), script.as_str()];
    argv.extend_from_slice(args);
    argv.extend(["--cert", &pems.cert, "--key", &pems.key, "--ca", &pems.ca]);
    let out = mesh.cluster.run(netns, &argv).expect("run hbone_probe.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hbone_probe.py failed: {stdout}{stderr}"
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("no output; stderr: {stderr}"));
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    eprintln!("hbone_probe.py {args:?}: {v}");
    v
}

fn addr(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// The server pod's addresses, v4 then v6.
fn server_ips(mesh: &LocalMesh) -> Vec<IpAddr> {
    let server = mesh.pod("hostile", "server").unwrap();
    let mut ips = vec![IpAddr::V4(server.ip4)];
    ips.extend(server.ip6.map(IpAddr::V6));
    assert_eq!(ips.len(), 2, "the mesh is dual-stack");
    ips
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The pid of node `node`'s ztunnel: the process started with this mesh's meshd socket and
/// that node's name (other meshes run in parallel with the same node names).
fn ztunnel_pid(mesh: &LocalMesh, node: usize) -> u32 {
    let name = mesh.cluster.nodes()[node].name.clone();
    let socket = mesh.socket.display().to_string();
    let found = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.first().is_some_and(|a| a.ends_with("ztunnel"))
                && args.windows(2).any(|w| w[0] == "--node" && w[1] == name)
                && args.iter().any(|a| a.contains(&socket))
        })
        .collect::<Vec<_>>();
    assert_eq!(found.len(), 1, "one ztunnel for {name}: {found:?}");
    found[0]
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn closed_port_answers_503_at_once_and_plaintext_closes_promptly_v4_v6() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let pems = client_pems(&mesh);
    let outsider = mesh.pod("outside", "outsider").unwrap();
    for ip in server_ips(&mesh) {
        // HBONE: the app is dialled from the client's address; the kernel's RST for the
        // closed port must come back to ztunnel (not leave the pod), so 503 comes at once.
        let v = probe(
            &mesh,
            &outsider.netns,
            &pems,
            &[
                "connect",
                "--connect",
                &addr(ip, 15008),
                "--authority",
                &addr(ip, CLOSED_PORT),
            ],
        );
        assert_eq!(
            v["status"],
            503,
            "CONNECT to a closed port: {v}\nztunnel-1:\n{}",
            tail(&mesh.ztunnel_log(1), 10)
        );
        let ms = v["elapsed_ms"].as_f64().unwrap_or(f64::MAX);
        assert!(ms < 1000.0, "503 must come in under a second, took {ms} ms");

        // Plaintext (PERMISSIVE) from outside the mesh: captured, then closed promptly.
        let to = SocketAddr::new(ip, CLOSED_PORT);
        let (closed_after, how) = outsider
            .netns
            .enter(move || -> std::io::Result<(Duration, String)> {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
                let start = Instant::now();
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let _ = s.write_all(b"hello\n");
                let mut buf = [0u8; 64];
                let how = match s.read(&mut buf) {
                    Ok(0) => "closed".to_string(),
                    Ok(n) => format!("{n} bytes"),
                    Err(e) => format!("{:?}", e.kind()),
                };
                Ok((start.elapsed(), how))
            })
            .unwrap()
            .unwrap();
        assert!(
            how == "closed" || how == format!("{:?}", ErrorKind::ConnectionReset),
            "plaintext to a closed port must be closed, got {how}"
        );
        assert!(
            closed_after < Duration::from_secs(1),
            "plaintext to a closed port {to} must close in under a second, took {closed_after:?}"
        );
    }

    // What made that possible is the pod's own setting, restored when the pod leaves the mesh.
    let reflect = || {
        ["ipv4", "ipv6"].map(|family| {
            let out = mesh
                .exec(
                    "hostile",
                    "server",
                    &["cat", &format!("/proc/sys/net/{family}/fwmark_reflect")],
                )
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
    };
    assert_eq!(reflect(), ["1", "1"], "set in the enrolled pod");
    let ns = manifests::namespace("hostile", false) + &manifests::namespace("outside", false);
    mesh.apply("00-ns.yaml", &ns).unwrap();
    mesh.wait_unenrolled("hostile", "server").unwrap();
    assert_eq!(reflect(), ["0", "0"], "restored on unenroll");
}

/// Runs the paced reset flood (600 × HEADERS, 3 ms, RST_STREAM on one connection) against
/// `target` and returns how much ztunnel's fd count grew at its peak.
fn reset_flood_fd_growth(
    mesh: &LocalMesh,
    pems: &Pems,
    from: &testbed::Pod,
    hbone: SocketAddr,
    target: SocketAddr,
) -> usize {
    let pid = ztunnel_pid(mesh, 1);
    let before = fd_count(pid);
    // Sample ztunnel's fd count while the flood runs: the peak is what would exhaust a node.
    let (peak, stop) = (
        Arc::new(AtomicUsize::new(before)),
        Arc::new(AtomicBool::new(false)),
    );
    let sampler = {
        let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(fd_count(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let v = probe(
        mesh,
        &from.netns,
        pems,
        &[
            "reset-flood",
            "--connect",
            &hbone.to_string(),
            "--authority",
            &target.to_string(),
            "--count",
            "600",
            "--pause-ms",
            "3",
        ],
    );
    peak.fetch_max(fd_count(pid), Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert_eq!(v["sent"], 600, "the flood ran to its end: {v}");
    let grown = peak.load(Ordering::SeqCst).saturating_sub(before);
    eprintln!("reset flood to {target}: ztunnel fds {before} -> peak +{grown}");
    grown
}

#[test]
fn paced_reset_flood_leaves_ztunnel_fds_bounded() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let pems = client_pems(&mesh);
    let outsider = mesh.pod("outside", "outsider").unwrap();
    let ip = server_ips(&mesh)[0];
    let hbone = SocketAddr::new(ip, 15008);
    // A closed port (its RST must come back to ztunnel at once) ...
    let closed = reset_flood_fd_growth(
        &mesh,
        &pems,
        &outsider,
        hbone,
        SocketAddr::new(ip, CLOSED_PORT),
    );
    assert!(
        closed < 210,
        "600 reset CONNECTs to a closed port grew ztunnel's fds by {closed}; each held dial is one"
    );
    // ... and a port whose SYNs the pod drops: each dial would hang until its timeout, so only
    // cancelling it with its stream keeps the count down.
    let out = mesh
        .exec(
            "hostile",
            "server",
            &[
                "nft",
                "add table inet hostile; \
                 add chain inet hostile input { type filter hook input priority 0; }; \
                 add rule inet hostile input tcp dport 7779 drop",
            ],
        )
        .unwrap();
    assert!(out.status.success(), "nft: {out:?}");
    let dropped = reset_flood_fd_growth(&mesh, &pems, &outsider, hbone, SocketAddr::new(ip, 7779));
    assert!(
        dropped < 210,
        "600 reset CONNECTs to a port that drops SYNs grew ztunnel's fds by {dropped}"
    );
    // The blackholed dial itself gives up: 503 within the dial timeout (5 s), not minutes.
    let v = probe(
        &mesh,
        &outsider.netns,
        &pems,
        &[
            "connect",
            "--connect",
            &hbone.to_string(),
            "--authority",
            &SocketAddr::new(ip, 7779).to_string(),
        ],
    );
    assert_eq!(v["status"], 503, "a dial that hangs ends in 503: {v}");
}

#[test]
fn oversized_headers_and_cross_family_connects_are_refused() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let pems = client_pems(&mesh);
    let outsider = mesh.pod("outside", "outsider").unwrap();
    let ips = server_ips(&mesh);
    let (v4, v6) = (ips[0], ips[1]);

    // M3: the other family's address on this connection is refused; each family's own works.
    for (hbone, target, want) in [(v4, v6, 400), (v6, v4, 400), (v4, v4, 200), (v6, v6, 200)] {
        let v = probe(
            &mesh,
            &outsider.netns,
            &pems,
            &[
                "connect",
                "--connect",
                &addr(hbone, 15008),
                "--authority",
                &addr(target, 8080),
            ],
        );
        assert_eq!(
            v["status"], want,
            "CONNECT {target} on a connection to {hbone}: {v}"
        );
    }

    // M2: a 100 KB header block is refused (431 or a reset), never served.
    let big = probe(
        &mesh,
        &outsider.netns,
        &pems,
        &[
            "connect",
            "--connect",
            &addr(v4, 15008),
            "--authority",
            &addr(v4, 8080),
            "--pad",
            "102400",
        ],
    );
    assert!(
        big["status"] == 431 || big["error"] == "reset" || big["error"] == "closed",
        "a CONNECT with a 100 KB header must be refused: {big}"
    );
}

/// GET `path` at `to` from inside `netns`: the status line, within `limit`.
fn http_get(
    netns: &testbed::Netns,
    to: SocketAddr,
    path: &'static str,
    limit: Duration,
) -> std::io::Result<String> {
    netns
        .enter(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&to, limit)?;
            s.set_read_timeout(Some(limit))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut reply = Vec::new();
            s.read_to_end(&mut reply)?;
            let text = String::from_utf8_lossy(&reply);
            Ok(text.lines().next().unwrap_or_default().to_string())
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

#[test]
fn probes_and_scrapes_answer_while_64_idle_clients_hold_connections() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let node = mesh.cluster.nodes()[1].clone();
    let idler = mesh.pod("outside", "idler").unwrap();
    for (port, path) in [(15021, "/healthz/ready"), (15020, "/metrics")] {
        // A pod opens 64 connections to the node's port and sends nothing.
        let target = SocketAddr::new(IpAddr::V4(node.ip4), port);
        let held: Vec<TcpStream> = idler
            .netns
            .enter(move || {
                (0..64)
                    .filter_map(|_| {
                        TcpStream::connect_timeout(&target, Duration::from_secs(5)).ok()
                    })
                    .collect()
            })
            .unwrap();
        assert!(held.len() >= 8, "the idler got connections: {}", held.len());
        // The kubelet (here: the node itself) still gets an answer at once.
        let start = Instant::now();
        let local = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port);
        let status = http_get(&node.netns, local, path, Duration::from_secs(5));
        let took = start.elapsed();
        drop(held);
        let status = status.unwrap_or_else(|e| panic!("GET {path} with 64 idlers: {e}"));
        assert!(status.starts_with("HTTP/1.1 "), "{path}: {status}");
        assert!(
            took < Duration::from_secs(1),
            "{path} must answer in under a second with 64 idle connections held, took {took:?}"
        );
    }
}

#[test]
fn junk_tls_connections_produce_few_log_lines() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let outsider = mesh.pod("outside", "outsider").unwrap();
    let to = SocketAddr::new(server_ips(&mesh)[0], 15008);
    let lines_before = mesh.ztunnel_log(1).lines().count();
    let n = 300;
    let sent = outsider
        .netns
        .enter(move || {
            let mut sent = 0;
            for _ in 0..n {
                if let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: not-tls\r\n\r\n");
                    let mut buf = [0u8; 256];
                    // Not a TLS record: ztunnel refuses and closes at once.
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = s.read(&mut buf);
                    sent += 1;
                }
            }
            sent
        })
        .unwrap();
    assert_eq!(sent, n, "every junk connection was made");
    // Then one good connection: once its access-log line is in, so is whatever the junk caused
    // (each junk connection ended, seen by the client, before the good one started).
    let pems = client_pems(&mesh);
    let ok = probe(
        &mesh,
        &outsider.netns,
        &pems,
        &[
            "connect",
            "--connect",
            &to.to_string(),
            "--authority",
            &addr(to.ip(), 8080),
        ],
    );
    assert_eq!(ok["status"], 200, "{ok}");
    wait_for(DEADLINE, "the good connection's access-log line", || {
        Ok(mesh
            .ztunnel_log(1)
            .lines()
            .skip(lines_before)
            .any(|l| l.contains("/sa/prober")))
    })
    .unwrap();
    let log = mesh.ztunnel_log(1);
    let added: Vec<&str> = log
        .lines()
        .skip(lines_before)
        .take_while(|l| !l.contains("/sa/prober"))
        .collect();
    assert!(
        added.len() < 20,
        "{n} junk TLS connections added {} log lines:\n{}",
        added.len(),
        tail(&added.join("\n"), 10)
    );
}

/// CPU time (user + system) of `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

#[test]
fn out_of_fds_accept_errors_back_off_without_flooding_the_log() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let outsider = mesh.pod("outside", "outsider").unwrap();
    let to = SocketAddr::new(server_ips(&mesh)[0], 15008);
    let pid = ztunnel_pid(&mesh, 1);
    // Leave ztunnel 10 spare descriptors.
    let limit = (fd_count(pid) + 10).to_string();
    let out = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");
    let (lines_before, ticks_before) = (mesh.ztunnel_log(1).lines().count(), cpu_ticks(pid));
    // 50 connections held for 3 s: the kernel completes them, ztunnel's accepts fail (EMFILE).
    let held = outsider
        .netns
        .enter(move || {
            let conns: Vec<TcpStream> = (0..50)
                .filter_map(|_| TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok())
                .collect();
            std::thread::sleep(Duration::from_secs(3));
            conns.len()
        })
        .unwrap();
    let ticks = cpu_ticks(pid) - ticks_before;
    let added = mesh.ztunnel_log(1).lines().count() - lines_before;
    eprintln!("out of fds: {held} connections, {added} log lines, {ticks} CPU ticks in 3 s");
    assert!(held >= 20, "the connections were made: {held}");
    assert!(added < 50, "accept errors logged {added} lines in 3 s");
    // 100 ticks/s (USER_HZ), so 60 is 20% of a core; a spinning accept loop takes what it can
    // get (134 here on a loaded machine, before the back-off).
    assert!(
        ticks < 60,
        "ztunnel used {ticks} CPU ticks in 3 s while out of fds"
    );
}
