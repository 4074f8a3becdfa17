//! 10,000 concurrent connections held through one ztunnel pair (issue 12, memory): a client
//! pod on node-0 opens them all to a server pod on node-1 (both ambient: each one goes client →
//! ztunnel node-0 → HBONE → ztunnel node-1 → server) with `mesh-echo hold`, which checks a
//! payload of its own on every connection, holds them, checks a second payload on every one
//! after the hold and closes them. Meanwhile the test reads both ztunnels' fds and RSS.
//!
//! Two rounds of 10,000. Idle figures are taken after a small warm-up (certificates, the
//! first pooled HBONE connection). Stated bounds, once everything closed:
//! - fds: idle + [`FD_SLACK`] (64), after each round. Pooled HBONE connections outlive their
//!   streams (idle ones close after 5 minutes): 10,000 streams at 200 per connection leave
//!   about 50.
//! - RSS once closed: back within idle + [`RETURN_BOUND_KIB`] (40 MiB) by the next periodic
//!   trim (`dataplane::memory`, every 30 s) after each round. Right after the close it is
//!   anywhere between that and the peak: what glibc gives back by itself depends on which
//!   chunk happens to sit at the heap's top (measured: 59–104 MiB right after a close, 54–59
//!   after the trim, idle 26–28, debug build). What stays after the trim is mostly the ~50
//!   pooled HBONE connections, which outlive their streams.
//! - No ratchet: the second round's peak no more than the first's + [`HELD_SLACK_KIB`]
//!   (8 MiB; measured +2.7–4.4). It reuses the first round's freed memory, so a leak of
//!   0.8 KiB per connection fails. (The close-time RSS, which varies by 45 MiB from one
//!   close to the next, cannot tell a ratchet from glibc's luck.)
//! - Printed, not asserted: idle RSS and RSS per 1,000 open idle connections (issue 12's
//!   target: ≤ 8 MiB; it depends on the build profile; a release build measured 6.95 on the
//!   client's ztunnel and 6.85 on the server's).
//!
//! ztunnel's connection caps are set explicitly ([`NODE_CAP`]): see there why.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::manifests::{echo_pod, namespace, pod};
use mesh_tests::privileged;
use serde_json::Value;

/// Connections held at once.
const COUNT: u32 = 10_000;
/// Connections opened and closed before the baseline, so pools, certificates and caches that
/// the first connections set up are in it.
const WARM_UP: u32 = 300;
/// fds over idle allowed once everything closed (pooled HBONE connections linger).
const FD_SLACK: usize = 64;
/// RSS over idle allowed once a round's connections closed and the next trim ran.
const RETURN_BOUND_KIB: u64 = 40 * 1024;
/// RSS growth allowed from the first round's peak (all connections held) to the second's.
const HELD_SLACK_KIB: u64 = 8 * 1024;
/// Bound on the next periodic trim after a close.
const TRIM_DEADLINE: Duration = Duration::from_secs(dataplane::memory::TRIM_PERIOD.as_secs() + 15);
/// Bound on opening (or checking and closing) all connections.
const PHASE_DEADLINE: Duration = Duration::from_secs(90);
/// Bound on the ztunnels closing their sockets after the client closed.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

const PORT: u16 = 8080;
/// ztunnel's connection caps for this test, node-wide and per source (all 10,000 come from one
/// pod). By default ztunnel sizes them from its open-files limit (40%, a quarter of that per
/// source), which it raises to 2^20 when it may; where it may not (no CAP_SYS_RESOURCE: the
/// development machine's hard limit is 20,000) they would be 8,000 and 2,000. 12,000
/// connections on node-0 hold about 12,100 fds (one per client leg, plus the HBONE pool).
const NODE_CAP: u32 = 12_000;

fn mesh() -> LocalMesh {
    let caps = NODE_CAP.to_string();
    let opts = MeshOptions {
        ztunnel_args: [
            "--max-connections",
            &caps,
            "--max-connections-per-source",
            &caps,
        ]
        .map(String::from)
        .to_vec(),
        ..MeshOptions::default()
    };
    let mesh = LocalMesh::start(opts).expect("start local mesh");
    let mut objects = namespace("hold-client", true) + &namespace("hold-server", true);
    objects += &pod("hold-client", "client", 0, "client", &[]);
    objects += &echo_pod("hold-server", "server", 1, "server", &[PORT]);
    mesh.apply("10-hold.yaml", &objects).unwrap();
    mesh.wait_listening("hold-server", "server", PORT).unwrap();
    mesh.wait_enrolled("hold-client", "client").unwrap();
    mesh.wait_enrolled("hold-server", "server").unwrap();
    mesh
}

/// The pid of node `node`'s ztunnel: the process started with this mesh's meshd socket and
/// that node's name (other meshes run in parallel with the same node names).
fn ztunnel_pid(mesh: &LocalMesh, node: usize) -> u32 {
    let name = mesh.cluster.nodes()[node].name.clone();
    let socket = mesh.socket.display().to_string();
    let found: Vec<u32> = std::fs::read_dir("/proc")
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
        .collect();
    assert_eq!(found.len(), 1, "one ztunnel for {name}: {found:?}");
    found[0]
}

/// A process's open fds and resident memory.
#[derive(Clone, Copy, Debug)]
struct Usage {
    fds: usize,
    rss_kib: u64,
}

fn usage(pid: u32) -> anyhow::Result<Usage> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(Usage { fds, rss_kib })
}

/// The usage once the fd count has held still for half a second (connections of the warm-up
/// are still being torn down just after it).
fn settled_usage(pid: u32) -> Usage {
    let mut last = usage(pid).unwrap();
    let mut since = Instant::now();
    wait_for(SETTLE_DEADLINE, "a steady fd count", || {
        let now = usage(pid)?;
        if now.fds != last.fds {
            since = Instant::now();
        }
        last = now;
        Ok(since.elapsed() >= Duration::from_millis(500))
    })
    .unwrap();
    last
}

/// `mesh-echo hold` running in a pod's netns, its stdout lines arriving on a channel; killed
/// on drop if still running.
struct Hold {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Hold {
    fn start(mesh: &LocalMesh, ns: &str, pod: &str, addr: &str, count: u32) -> Hold {
        let netns = mesh.pod(ns, pod).unwrap().netns.path;
        let stderr = std::fs::File::create(mesh.dir().join("hold.stderr")).unwrap();
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg("--")
            .arg(&mesh.bins.echo)
            .args(["hold", "--addr", addr, "--count", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn mesh-echo hold");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Hold {
            child,
            stdin,
            lines,
        }
    }

    /// The next JSON line, or a failure naming what hold printed on stderr.
    fn next_report(&mut self, mesh: &LocalMesh, phase: &str) -> Value {
        match self.lines.recv_timeout(PHASE_DEADLINE) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("hold printed {line:?} ({e}) for the {phase} phase")),
            Err(e) => panic!(
                "no {phase} report from hold within {PHASE_DEADLINE:?} ({e}); stderr: {}",
                std::fs::read_to_string(mesh.dir().join("hold.stderr")).unwrap_or_default()
            ),
        }
    }

    /// Tells hold to check and close its connections (a line on its stdin).
    fn release(&mut self) {
        let mut stdin = self.stdin.take().expect("released once");
        stdin.write_all(b"release\n").unwrap();
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut status = None;
        wait_for(PHASE_DEADLINE, "mesh-echo hold to exit", || {
            status = self.child.try_wait()?;
            Ok(status.is_some())
        })
        .unwrap();
        status.unwrap()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One round: `COUNT` connections held, checked and closed. Returns both ztunnels' usage while
/// they were held and once their fds came back to `idle` + [`FD_SLACK`].
fn round(mesh: &LocalMesh, addr: &str, pids: [u32; 2], idle: [Usage; 2]) -> [[Usage; 2]; 2] {
    let mut hold = Hold::start(mesh, "hold-client", "client", addr, COUNT);
    let held = hold.next_report(mesh, "held");
    assert_eq!(
        (count(&held, "open"), count(&held, "verified")),
        (u64::from(COUNT), u64::from(COUNT)),
        "every connection open and its payload back intact: {held}"
    );
    let during = pids.map(|pid| usage(pid).unwrap());
    // Each connection is a socket in both ztunnels: node-0 holds the client legs it accepted
    // (its pool's HBONE connections carry them), node-1 the legs it dialled to the server.
    // Fewer would mean connections bypassed the pair.
    for node in 0..2 {
        assert!(
            during[node].fds >= idle[node].fds + COUNT as usize,
            "ztunnel node-{node} holds {} fds with {COUNT} connections open, {} idle: \
             the connections do not all go through it",
            during[node].fds,
            idle[node].fds
        );
    }

    hold.release();
    let released = hold.next_report(mesh, "released");
    assert_eq!(
        (
            count(&released, "open"),
            count(&released, "verified"),
            count(&released, "closed")
        ),
        (u64::from(COUNT), u64::from(COUNT), u64::from(COUNT)),
        "every held connection still carries bytes intact after the hold and closes: {released}"
    );
    assert!(hold.wait_exit().success(), "hold failed: {released}");

    let mut after = during;
    let closed = wait_for(SETTLE_DEADLINE, "ztunnels' fds back to idle", || {
        after = pids.map(|pid| usage(pid).unwrap());
        Ok((0..2).all(|n| after[n].fds <= idle[n].fds + FD_SLACK))
    });
    closed.unwrap_or_else(|e| {
        panic!("{e:#}: idle {idle:?}, after the close {after:?} (slack {FD_SLACK} fds)")
    });
    let at_close = after;
    let back = wait_for(TRIM_DEADLINE, "ztunnels' memory back near idle", || {
        after = pids.map(|pid| usage(pid).unwrap());
        Ok((0..2).all(|n| after[n].rss_kib <= idle[n].rss_kib + RETURN_BOUND_KIB))
    });
    back.unwrap_or_else(|e| {
        panic!(
            "{e:#}: idle {idle:?}, held {during:?}, right after the close {at_close:?}, \
             now {after:?} (bound: idle + {} MiB after the periodic trim)",
            RETURN_BOUND_KIB / 1024
        )
    });
    [during, after]
}

fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn growth_mib(from: Usage, to: Usage) -> f64 {
    (to.rss_kib as f64 - from.rss_kib as f64) / 1024.0
}

#[test]
fn ten_thousand_connections_held_through_a_ztunnel_pair_then_fds_and_memory_come_back() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let server = mesh.pod("hold-server", "server").unwrap();
    let addr = format!("{}:{PORT}", server.ip4);
    let pids = [ztunnel_pid(&mesh, 0), ztunnel_pid(&mesh, 1)];

    // Warm-up: stdin is /dev/null, so hold checks, releases and closes at once.
    let echo = mesh.bins.echo.display().to_string();
    let warm = mesh
        .exec(
            "hold-client",
            "client",
            &[
                &echo,
                "hold",
                "--addr",
                &addr,
                "--count",
                &WARM_UP.to_string(),
            ],
        )
        .unwrap();
    assert!(
        warm.status.success(),
        "warm-up failed: {}{}",
        String::from_utf8_lossy(&warm.stdout),
        String::from_utf8_lossy(&warm.stderr)
    );
    let idle = pids.map(settled_usage);

    let [during1, after1] = round(&mesh, &addr, pids, idle);
    let [during2, after2] = round(&mesh, &addr, pids, idle);
    for node in 0..2 {
        println!(
            "ztunnel node-{node}: idle {:.1} MiB RSS, {} fds; {COUNT} held: {:.1} MiB \
             ({:.2} MiB per 1,000), {} fds; closed: {:.1} MiB (+{:.1} over idle), {} fds; \
             second round held {:.1} MiB ({:+.1} over the first), closed {:.1} MiB, {} fds",
            mib(idle[node].rss_kib),
            idle[node].fds,
            mib(during1[node].rss_kib),
            growth_mib(idle[node], during1[node]) * 1000.0 / f64::from(COUNT),
            during1[node].fds,
            mib(after1[node].rss_kib),
            growth_mib(idle[node], after1[node]),
            after1[node].fds,
            mib(during2[node].rss_kib),
            growth_mib(during1[node], during2[node]),
            mib(after2[node].rss_kib),
            after2[node].fds,
        );
    }
    for node in 0..2 {
        assert!(
            during2[node].rss_kib <= during1[node].rss_kib + HELD_SLACK_KIB,
            "ztunnel node-{node} held {COUNT} connections in {:.1} MiB more the second time \
             (bound {} MiB): the first round left memory behind",
            growth_mib(during1[node], during2[node]),
            HELD_SLACK_KIB / 1024
        );
    }
}
