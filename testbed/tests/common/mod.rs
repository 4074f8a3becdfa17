//! Helpers shared by the testbed's integration tests: root check, waiting on conditions with
//! deadlines, TCP reachability checks between pods, and picking one run out of `leftovers()`.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use testbed::Pod;

/// The testbed needs root (network namespaces). Without it, tests pass vacuously and say so.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: the testbed needs root");
    }
    root
}

/// Polls `cond` until it holds or `timeout` passes; panics naming `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `from` opens a TCP connection to `to` at `dst` (one of `to`'s IPs) and both sides exchange
/// a message; the server sees `from`'s pod IP of the same family as the peer (no NAT).
pub fn check_tcp(from: &Pod, to: &Pod, dst: IpAddr) {
    let what = format!("{} -> {} ({dst})", from.name, to.name);
    let listener = to
        .netns
        .enter(move || TcpListener::bind(SocketAddr::new(dst, 0)))
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: bind: {e}"));
    let target = SocketAddr::new(dst, listener.local_addr().unwrap().port());
    let mut client = from
        .netns
        .enter(move || TcpStream::connect_timeout(&target, Duration::from_secs(5)))
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut server, peer) = loop {
        match listener.accept() {
            Ok(conn) => break conn,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("{what}: accept: {e}"),
        }
    };
    let expected_src: IpAddr = if dst.is_ipv4() {
        from.ip4.into()
    } else {
        from.ip6.unwrap().into()
    };
    assert_eq!(peer.ip(), expected_src, "{what}: source address");
    server.set_nonblocking(false).unwrap();
    for s in [&server, &client] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping", "{what}");
    server.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong", "{what}");
}

/// Every ordered pair of distinct pods, over IPv4 and (if present) IPv6.
pub fn check_full_mesh(pods: &[Pod]) {
    for from in pods {
        for to in pods.iter().filter(|p| p.name != from.name) {
            check_tcp(from, to, to.ip4.into());
            if let Some(ip6) = to.ip6 {
                check_tcp(from, to, ip6.into());
            }
        }
    }
}

/// The entries of `testbed::leftovers()` that belong to run `run_id`.
pub fn leftovers_of(run_id: &str) -> Vec<String> {
    let tag = format!("(run {run_id})");
    testbed::leftovers()
        .into_iter()
        .filter(|l| l.ends_with(&tag))
        .collect()
}

/// The start time of `pid` (field 22 of /proc/<pid>/stat), None if it is gone or a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// True once the process that was `pid` (started at `start`) no longer runs.
pub fn gone(pid: u32, start: u64) -> bool {
    start_time(pid) != Some(start)
}
