//! The same-node fast path (`--fast-path`, eBPF capture only) with a receiver that stops
//! reading: the kernel memory one connection can hold stays bounded while the sender keeps
//! writing, and once the receiver resumes, the whole stream arrives intact and the access log
//! counts it exactly.
//!
//! Needs root (network namespaces, eBPF); skipped otherwise.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use localmesh::client::field;
use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::privileged;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bp, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bp, labels: {app: client}}
spec:
  nodeName: node-0
  serviceAccountName: client
  containers: []
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bp, labels: {app: server}}
spec:
  nodeName: node-0
  serviceAccountName: server
  containers: []
"#;

const PORT: u16 = 9300;
/// ztunnel's in-pod outbound listener, where the client's connection lands.
const OUTBOUND_PORT: u16 = 15001;
/// The stated bound on what one stalled connection holds in the kernel (bytes the client's
/// kernel accepted and the server has not read: the client's send buffer, both legs' buffers,
/// the forwarding queue and the server's receive buffer). ztunnel's in-flight limit is 32 MiB;
/// without it the figure grows by gigabytes a second.
const BOUND: u64 = 64 << 20;
/// Most the client attempts while the server reads nothing.
const ATTEMPT: u64 = 1 << 30;
/// A write that makes no progress for this long means the sender is held back.
const STALL: Duration = Duration::from_secs(3);
/// Written after the server resumed: the rest of the stream goes through the copy.
const TAIL: u64 = 16 << 20;

/// Byte `i` of the stream: a pattern whose period (251) is prime to every buffer size, so a
/// lost, repeated or reordered chunk shows.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

fn fill(buf: &mut [u8], at: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern(at + k as u64);
    }
}

/// Writes the pattern from offset `at` until `until` bytes in total or a write stalls for
/// [`STALL`]; returns the new offset.
fn write_pattern(s: &mut TcpStream, mut at: u64, until: u64) -> u64 {
    let mut buf = vec![0u8; 256 << 10];
    while at < until {
        let n = buf.len().min((until - at) as usize);
        fill(&mut buf[..n], at);
        match s.write(&buf[..n]) {
            Ok(k) => at += k as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("client write at {at}: {e}"),
        }
    }
    at
}

/// Sum of the `skmem` figures (rmem_alloc + wmem_queued) of the TCP sockets on `port` in the
/// netns `netns`, for the report.
fn skmem(netns: &str, port: u16) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-tmn", "state", "established"])
        .output();
    let Ok(out) = out else { return 0 };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    let mut on_port = false;
    for line in text.lines() {
        if !line.starts_with('\t') && !line.starts_with(' ') {
            on_port = line.contains(&format!(":{port} "));
            continue;
        }
        if !on_port {
            continue;
        }
        // skmem:(r<rmem_alloc>,rb..,t<wmem_alloc>,tb..,f..,w<wmem_queued>,..)
        if let Some(m) = line.split("skmem:(").nth(1) {
            for kv in m.trim_end_matches(')').split(',') {
                if let Some(v) = kv.strip_prefix('r').or_else(|| kv.strip_prefix('w')) {
                    total += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    total
}

#[test]
fn fast_path_stalled_receiver_bounded_then_intact() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions {
        capture: "ebpf".into(),
        fast_path: true,
        ..MeshOptions::default()
    })
    .expect("start mesh");
    mesh.apply("00-bp.yaml", MANIFESTS).unwrap();
    mesh.wait_enrolled("bp", "client").unwrap();
    mesh.wait_enrolled("bp", "server").unwrap();
    let client = mesh.pod("bp", "client").unwrap();
    let server = mesh.pod("bp", "server").unwrap();
    for ip in [IpAddr::from(server.ip4), IpAddr::from(server.ip6.unwrap())] {
        stalled_then_intact(&mesh, &client, &server, SocketAddr::new(ip, PORT));
    }
}

fn stalled_then_intact(
    mesh: &LocalMesh,
    client: &testbed::Pod,
    server: &testbed::Pod,
    dst: SocketAddr,
) {
    // The server: a listener in the server pod that accepts and reads nothing until told.
    let any: SocketAddr = if dst.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, PORT).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, PORT).into()
    };
    let listener = server
        .netns
        .enter(move || TcpListener::bind(any))
        .unwrap()
        .expect("bind in the server pod");
    let (resume_tx, resume_rx) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || -> (u64, Option<u64>) {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        resume_rx.recv().expect("resume signal");
        let mut buf = vec![0u8; 1 << 20];
        let (mut at, mut first_bad) = (0u64, None);
        loop {
            let n = s.read(&mut buf).expect("server read");
            if n == 0 {
                return (at, first_bad);
            }
            if first_bad.is_none()
                && let Some(k) = (0..n).find(|&k| buf[k] != pattern(at + k as u64))
            {
                first_bad = Some(at + k as u64);
            }
            at += n as u64;
        }
    });

    let mut s = client
        .netns
        .enter(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
        .unwrap()
        .expect("connect from the client pod");
    s.set_write_timeout(Some(STALL)).unwrap();
    let port = s.local_addr().unwrap().port();

    // Stalled receiver: the sender must be held back, not queue without limit.
    let accepted = write_pattern(&mut s, 0, ATTEMPT);
    // The client's socket and ztunnel's leg from it (to the outbound listener), ztunnel's leg
    // to the server and the server's socket.
    let skmem_client = skmem(&client.netns.name, OUTBOUND_PORT);
    let skmem_server = skmem(&server.netns.name, PORT);
    eprintln!(
        "{dst}: accepted {accepted} bytes while the server read nothing; socket memory \
         (skmem r+w): client pod {skmem_client}, server pod {skmem_server}"
    );
    assert!(
        accepted < ATTEMPT,
        "the client was never held back: {accepted} bytes accepted with nobody reading"
    );
    assert!(
        accepted <= BOUND,
        "{accepted} bytes held in the kernel for a stalled receiver (bound {BOUND})"
    );
    // Still held back (the sender keeps trying; nothing more gets in beyond slack).
    let again = write_pattern(&mut s, accepted, ATTEMPT);
    assert!(
        again <= BOUND,
        "{again} bytes held after a second stalled write (bound {BOUND})"
    );

    // The receiver resumes: the rest goes through, intact, and the stream ends cleanly.
    resume_tx.send(()).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let total = write_pattern(&mut s, again, again + TAIL);
    assert_eq!(
        total,
        again + TAIL,
        "the tail stalled after the server resumed"
    );
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (received, first_bad) = reader.join().expect("server thread");
    assert_eq!(first_bad, None, "stream corrupted via {dst}");
    assert_eq!(
        received, total,
        "server got {received} of {total} bytes via {dst}"
    );
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The server's close comes back as our EOF.
    (&s).read_to_end(&mut rest).expect("client EOF");
    drop(s);

    let mut entry = None;
    wait_for(
        Duration::from_secs(20),
        &format!("access-log entry for :{port}"),
        || {
            entry = mesh.access_log(0).into_iter().find(|e| {
                field(e, "direction") == "outbound"
                    && field(e, "peer")
                        .parse::<SocketAddr>()
                        .is_ok_and(|a| a.port() == port)
            });
            Ok(entry.is_some())
        },
    )
    .unwrap();
    let e = entry.unwrap();
    assert_eq!(e["fast_path"], true, "not spliced: {e}");
    assert_eq!(field(&e, "message"), "connection complete", "{e}");
    assert_eq!(e["received"].as_u64(), Some(total), "{e}");
    assert_eq!(e["sent"].as_u64(), Some(0), "{e}");
}
