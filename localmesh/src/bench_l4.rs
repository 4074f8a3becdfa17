//! The L4 benchmark: raw TCP versus the mesh over the same cross-node veth path, in one run,
//! with what the ztunnels spent on it; optionally a previous build's ztunnel in the same run.
//!
//! Two client/server pairs, identical but for enrollment: `bench-raw` (not ambient) and
//! `bench-mesh` (ambient); and a third, [`bench_relay`](crate::bench_relay)'s plaintext relay
//! chain, the ceiling of any proxy in user space on this path. The raw and relay pods get the
//! `net.ipv4.tcp_tw_reuse=1` that ztunnel sets in enrolled pods, so the connection-rate
//! baseline is not capped by ports in TIME_WAIT. Each
//! figure (bulk, 1 KiB request/response, connection rate) is measured on every pair in turn
//! before the next figure, so drift on the shared machine hits all alike; the mesh pairs also
//! run connections paced at 1,000/s, whose cost per connection set beside the saturated run's
//! shows whether it stays flat with the rate. Around the mesh pairs' runs both ztunnels' CPU
//! time and context switches are read (around the relay chain's, both relays': what HBONE
//! costs over a plain relay, in counters), and their syscalls are counted under perf
//! ([`bench_stats`]; the same for every build, and a per-thread count costs well under a
//! microsecond per request, next to a round trip of ~100 µs); their memory is read
//! idle (enrolled, before any load) and after the load once their fds are back. With
//! `baseline_bins` a second mesh runs that directory's `ztunnel` and its pair is measured in
//! the same rounds: "before / after" rows. With several `rounds`, the whole sequence runs that
//! many times and each figure is reported from its median round ([`bench_rounds`]). Owns the
//! scenario; the counters are [`bench_stats`]', the load generator is `mesh-echo`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::bench::{
    BenchOptions, MANIFEST, Row, measure_pair, measure_wrapped, num, pair_mesh, pods, print_table,
};
use crate::bench_relay::{self, RelayChain};
use crate::bench_rounds::{self, Round};
use crate::bench_stats::{self, Memory, Perf, Spent};
use crate::{LocalMesh, MeshOptions, wait_for};

/// The sysctl ztunnel sets in enrolled pods that a plain client/server pair feels (the others
/// act on marked packets and listener handovers, which the raw pair has none of).
const TW_REUSE: &str = "net.ipv4.tcp_tw_reuse";

/// fds a ztunnel may hold after the load beyond its idle count: the pooled HBONE connection
/// (the dialled socket on the client's node, the accepted one on the server's) lives for the
/// pool's idle timeout (5 min).
const POOLED_FDS: usize = 2;

/// How old a ztunnel must be before its idle memory is read: past its first periodic trim
/// (`dataplane::memory::TRIM_PERIOD`, 30 s), with a margin.
const IDLE_AGE: Duration = Duration::from_secs(35);

/// How long the ztunnels get to close the load's connections before memory is read anyway.
const SETTLE: Duration = Duration::from_secs(30);

const CONN_LOAD: [&str; 3] = ["bench-conn", "--concurrency", "8"];

/// Connections started at a fixed rate, well under saturation: what a connection costs the
/// ztunnels when they are not busy, against [`CONN_LOAD`]'s at full load (flat CPU per
/// connection means the two agree).
const CONN_PACED_RATE: u32 = 1000;

const RR_LOAD: [&str; 3] = ["bench-rr", "--size", "1024"];

/// What the mesh pair of one build measured.
pub struct MeshFigures {
    pub bulk: Value,
    pub bulk_spent: Spent,
    pub rr: Value,
    pub rr_spent: Spent,
    pub conn: Value,
    pub conn_spent: Spent,
    /// Connections at [`CONN_PACED_RATE`].
    pub conn_paced: Value,
    pub conn_paced_spent: Spent,
    /// Per ztunnel (node-0, node-1): enrolled, before any load.
    pub idle: Vec<Memory>,
    /// Per ztunnel, after every figure, once the load's connections are closed.
    pub after: Vec<Memory>,
    /// Whether every ztunnel's fds were back within [`POOLED_FDS`] of idle when `after` was
    /// read (else it was read at the deadline).
    pub settled: bool,
}

/// The L4 scenario's result.
pub struct L4Report {
    pub raw_bulk: Value,
    pub raw_rr: Value,
    pub raw_conn: Value,
    /// Through the plaintext relay chain (the same three figures).
    pub relay_bulk: Value,
    pub relay_rr: Value,
    pub relay_conn: Value,
    /// What the chain's two relays spent on each of those three.
    pub relay_spent: [Spent; 3],
    /// The current build.
    pub mesh: MeshFigures,
    /// The build in `baseline_bins`, measured in the same rounds.
    pub baseline: Option<MeshFigures>,
    /// Why syscalls were not counted, if they were not.
    pub perf_missing: Option<String>,
    /// How far the rounds spread, when there were several ([`bench_rounds::spread`]).
    pub spread: Vec<String>,
}

/// A mesh pair under measurement, with its ztunnels' pids and idle memory.
struct Subject<'a> {
    mesh: &'a LocalMesh,
    pids: Vec<u32>,
    idle: Vec<Memory>,
}

pub fn run(opts: BenchOptions) -> anyhow::Result<L4Report> {
    let baseline_ztunnel = opts.baseline_bins.as_ref().map(|d| d.join("ztunnel"));
    if let Some(z) = &baseline_ztunnel
        && !z.is_file()
    {
        bail!(
            "--baseline-bins: no ztunnel at {}: copy a previous build's target/release there",
            z.display()
        );
    }
    let mesh = LocalMesh::start(MeshOptions {
        log: "warn".into(),
        ..Default::default()
    })?;
    mesh.apply("00-ns.yaml", MANIFEST)?;
    mesh.apply("10-raw.yaml", &pods("bench-raw"))?;
    mesh.apply("20-mesh.yaml", &pods("bench-mesh"))?;
    for ns in ["bench-raw", "bench-mesh"] {
        mesh.wait_listening(ns, "server", 8080)?;
    }
    mesh.wait_enrolled("bench-mesh", "client")?;
    mesh.wait_enrolled("bench-mesh", "server")?;
    let relay = RelayChain::start(&mesh)?;
    for ns in ["bench-raw", bench_relay::NAMESPACE] {
        for pod in ["client", "server"] {
            set_tw_reuse(&mesh, ns, pod)?;
        }
    }
    let before_mesh = baseline_ztunnel
        .map(|z| {
            let opts = MeshOptions {
                ztunnel_bin: Some(z),
                ..Default::default()
            };
            pair_mesh(opts, false).context("starting the mesh with the baseline ztunnel")
        })
        .transpose()?;
    let (perf, perf_missing) = match Perf::probe() {
        Ok(p) => (Some(p), None),
        Err(why) => {
            eprintln!("warning: syscalls not counted: {why}");
            (None, Some(why))
        }
    };
    // The current build first, then the baseline: the order of every round below.
    let mut subjects = vec![Subject::new(&mesh)?];
    if let Some(m) = &before_mesh {
        subjects.push(Subject::new(m)?);
    }
    let mut rounds = Vec::new();
    for _ in 0..opts.rounds.max(1) {
        rounds.push(measure_round(
            &mesh,
            &relay,
            &subjects,
            opts.duration,
            perf.as_ref(),
        )?);
    }
    let spread = bench_rounds::spread(&rounds);
    let Round {
        raw: [raw_bulk, raw_rr, raw_conn],
        relay:
            [
                (relay_bulk, relay_bulk_spent),
                (relay_rr, relay_rr_spent),
                (relay_conn, relay_conn_spent),
            ],
        subjects: measured,
    } = Round::median(&rounds).context("no rounds measured")?;
    let mut figures = Vec::new();
    for (
        s,
        [
            (bulk, bulk_spent),
            (rr, rr_spent),
            (conn, conn_spent),
            (conn_paced, conn_paced_spent),
        ],
    ) in subjects.iter().zip(measured)
    {
        let (after, settled) = s.after_load()?;
        figures.push(MeshFigures {
            bulk,
            bulk_spent,
            rr,
            rr_spent,
            conn,
            conn_spent,
            conn_paced,
            conn_paced_spent,
            idle: s.idle.clone(),
            after,
            settled,
        });
    }
    let mut figures = figures.into_iter();
    let current = figures.next().context("no figures of the current build")?;
    Ok(L4Report {
        raw_bulk,
        raw_rr,
        raw_conn,
        relay_bulk,
        relay_rr,
        relay_conn,
        relay_spent: [relay_bulk_spent, relay_rr_spent, relay_conn_spent],
        mesh: current,
        baseline: figures.next(),
        perf_missing,
        spread,
    })
}

/// One round: each figure (bulk, 1 KiB request/response, connections, paced connections) on
/// every pair in turn before the next figure, so drift on the shared machine hits all alike.
fn measure_round(
    mesh: &LocalMesh,
    relay: &RelayChain,
    subjects: &[Subject],
    d: Duration,
    perf: Option<&Perf>,
) -> anyhow::Result<Round> {
    let rate_arg = CONN_PACED_RATE.to_string();
    let conn_paced_load = [CONN_LOAD.as_slice(), &["--rate", &rate_arg]].concat();
    let loads: [&[&str]; 4] = [&["bench-bulk"], &RR_LOAD, &CONN_LOAD, &conn_paced_load];
    let mut raw = Vec::new();
    let mut relayed = Vec::new();
    let mut per_subject: Vec<Vec<(Value, Spent)>> = subjects.iter().map(|_| Vec::new()).collect();
    for (slot, load) in loads.into_iter().enumerate() {
        // The paced figure is the mesh's cost at a fixed rate; raw TCP has no proxy to count.
        if slot != bench_rounds::CONN_PACED {
            raw.push(measure_pair(mesh, "bench-raw", d, load)?);
            relayed.push(counted(mesh, relay.pids(), perf, |wrap| {
                relay.measure(d, load, wrap)
            })?);
        }
        for (s, figures) in subjects.iter().zip(&mut per_subject) {
            figures.push(s.measure(d, load, perf)?);
        }
    }
    for (i, figures) in per_subject.iter().enumerate() {
        let rate = num(&figures[bench_rounds::CONN_PACED].0, "per_sec");
        if rate < 0.9 * f64::from(CONN_PACED_RATE) {
            eprintln!(
                "warning: the paced connections reached only {rate}/s of {CONN_PACED_RATE}/s"
            );
        }
        let who = if i == 0 {
            "the mesh"
        } else {
            "the baseline mesh"
        };
        warn_conn_errors(&figures[bench_rounds::CONN].0, who);
    }
    warn_conn_errors(&raw[bench_rounds::CONN], "raw TCP");
    warn_conn_errors(&relayed[bench_rounds::CONN].0, "the relay chain");
    Ok(Round {
        raw: exactly(raw)?,
        relay: exactly(relayed)?,
        subjects: per_subject
            .into_iter()
            .map(exactly)
            .collect::<anyhow::Result<_>>()?,
    })
}

/// Runs `load` (which runs its argv through the wrapper it is given) and reads what the
/// processes `pids` spent meanwhile; under `perf` their syscalls too.
fn counted(
    mesh: &LocalMesh,
    pids: &[u32],
    perf: Option<&Perf>,
    load: impl FnOnce(&dyn Fn(&[&str]) -> Vec<String>) -> anyhow::Result<Value>,
) -> anyhow::Result<(Value, Spent)> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let before = bench_stats::sample(pids)?;
    let (report, syscalls) = match perf {
        Some(p) => {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let out = mesh.dir().join(format!("perf-{n}.csv"));
            let report = load(&|argv| p.wrap(pids, &out, argv))?;
            let count = Perf::read(&out)
                .inspect_err(|e| eprintln!("warning: syscalls not counted: {e:#}"))
                .ok();
            (report, count)
        }
        None => (
            load(&|argv| argv.iter().map(|s| s.to_string()).collect())?,
            None,
        ),
    };
    let after = bench_stats::sample(pids)?;
    Ok((report, Spent::between(before, after, syscalls)))
}

/// A round's figures of one pair as the fixed-size array [`Round`] holds.
fn exactly<T, const N: usize>(figures: Vec<T>) -> anyhow::Result<[T; N]> {
    let got = figures.len();
    figures
        .try_into()
        .map_err(|_| anyhow::anyhow!("a round measured {got} figures of a pair, not {N}"))
}

fn warn_conn_errors(report: &Value, who: &str) {
    let errors = num(report, "errors");
    if errors > 0.0 {
        eprintln!("warning: {errors} connection errors through {who} during bench-conn");
    }
}

/// Sets [`TW_REUSE`] in a pod's netns as ztunnel does for enrolled pods, and checks it held.
fn set_tw_reuse(mesh: &LocalMesh, ns: &str, pod: &str) -> anyhow::Result<()> {
    let out = mesh.exec(ns, pod, &["sysctl", "-w", &format!("{TW_REUSE}=1")])?;
    let now = mesh.exec(ns, pod, &["sysctl", "-n", TW_REUSE])?;
    if !out.status.success() || String::from_utf8_lossy(&now.stdout).trim() != "1" {
        bail!(
            "cannot set {TW_REUSE}=1 in {ns}/{pod}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl<'a> Subject<'a> {
    fn new(mesh: &'a LocalMesh) -> anyhow::Result<Subject<'a>> {
        let pids = (0..mesh.cluster.nodes().len())
            .map(|i| {
                mesh.ztunnel_pid(i)
                    .with_context(|| format!("node-{i} runs no ztunnel"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Idle memory once start-up's garbage has met a periodic trim: read right after start
        // it is a matter of luck (anonymous 3.5 MiB before the first trim, 1.7 after).
        for &pid in &pids {
            let age = bench_stats::age(pid)?;
            if age < IDLE_AGE {
                std::thread::sleep(IDLE_AGE - age);
            }
        }
        let idle = pids
            .iter()
            .map(|&p| bench_stats::memory(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Subject { mesh, pids, idle })
    }

    /// Runs the load on this mesh's pair and reads what its ztunnels spent meanwhile; under
    /// `perf` their syscalls too.
    fn measure(
        &self,
        d: Duration,
        args: &[&str],
        perf: Option<&Perf>,
    ) -> anyhow::Result<(Value, Spent)> {
        counted(self.mesh, &self.pids, perf, |wrap| {
            measure_wrapped(self.mesh, "bench-mesh", d, args, wrap)
        })
    }

    /// Memory once the load's connections are closed (each ztunnel's fds back within
    /// [`POOLED_FDS`] of idle), or at the deadline; and whether they were.
    fn after_load(&self) -> anyhow::Result<(Vec<Memory>, bool)> {
        let back = || -> anyhow::Result<bool> {
            for (&pid, idle) in self.pids.iter().zip(&self.idle) {
                if bench_stats::memory(pid)?.fds > idle.fds + POOLED_FDS {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        let settled = wait_for(SETTLE, "the ztunnels' fds back to idle", back).is_ok();
        let after = self
            .pids
            .iter()
            .map(|&p| bench_stats::memory(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if !settled {
            eprintln!(
                "warning: ztunnel fds still above idle after {SETTLE:?} (idle {:?}, now {:?}): \
                 memory after load read anyway",
                self.idle.iter().map(|m| m.fds).collect::<Vec<_>>(),
                after.iter().map(|m| m.fds).collect::<Vec<_>>()
            );
        }
        Ok((after, settled))
    }
}

/// Units of [`unit_costs`]' figures: CPU, syscalls and context switches per unit of bulk,
/// request/response and connection work.
const COST_UNITS: [&str; 9] = [
    "s/GB",
    "/MB",
    "/MB",
    "µs/req",
    "/req",
    "/req",
    "s/1k conn",
    "/conn",
    "/1k conn",
];

/// Row names of [`unit_costs`]' figures for the ztunnels.
const ZTUNNEL_COSTS: [&str; 9] = [
    "bulk: ztunnel CPU",
    "bulk: ztunnel syscalls",
    "bulk: ztunnel ctx switches",
    "1 KiB rr: ztunnel CPU",
    "1 KiB rr: ztunnel syscalls",
    "1 KiB rr: ztunnel ctx switches",
    "conn: ztunnel CPU",
    "conn: ztunnel syscalls",
    "conn: ztunnel ctx switches",
];

/// Row names of [`unit_costs`]' figures for a pair's two proxies, whichever they are.
const PROXY_COSTS: [&str; 9] = [
    "bulk: proxies' CPU",
    "bulk: proxies' syscalls",
    "bulk: proxies' ctx switches",
    "1 KiB rr: proxies' CPU",
    "1 KiB rr: proxies' syscalls",
    "1 KiB rr: proxies' ctx switches",
    "conn: proxies' CPU",
    "conn: proxies' syscalls",
    "conn: proxies' ctx switches",
];

/// What a pair's proxies spent per unit of work on bulk, 1 KiB request/response and
/// connections, in [`COST_UNITS`] order.
fn unit_costs([bulk, rr, conn]: [(&Value, &Spent); 3]) -> [f64; 9] {
    let gb = num(bulk.0, "bytes") / 1e9;
    let mb = gb * 1e3;
    // The load's CPU includes its warm-up's round trips.
    let requests = num(rr.0, "count") + num(rr.0, "warmup_count");
    let [b, r] = [bulk.1, rr.1];
    let [c0, c1, c2] = conn_costs(conn.0, conn.1);
    [
        b.cpu_secs / gb,
        syscalls(b) / mb,
        b.ctx_switches as f64 / mb,
        r.cpu_secs * 1e6 / requests,
        syscalls(r) / requests,
        r.ctx_switches as f64 / requests,
        c0,
        c1,
        c2,
    ]
}

/// CPU per 1,000 connections, syscalls per connection, context switches per 1,000.
fn conn_costs(report: &Value, spent: &Spent) -> [f64; 3] {
    let kconn = num(report, "count") / 1e3;
    [
        spent.cpu_secs / kconn,
        syscalls(spent) / (kconn * 1e3),
        spent.ctx_switches as f64 / kconn,
    ]
}

/// The syscall count, NaN (printed as "-") when perf could not count.
fn syscalls(spent: &Spent) -> f64 {
    spent.syscalls.map_or(f64::NAN, |n| n as f64)
}

impl MeshFigures {
    /// What the ztunnels spent per unit of bulk, request/response and connection work, in
    /// [`COST_UNITS`] order.
    fn unit_costs(&self) -> [f64; 9] {
        unit_costs([
            (&self.bulk, &self.bulk_spent),
            (&self.rr, &self.rr_spent),
            (&self.conn, &self.conn_spent),
        ])
    }

    /// (name, unit, value) of what the ztunnels spent, per unit of work.
    fn spent_rows(&self) -> Vec<(&'static str, &'static str, f64)> {
        let costs = self.unit_costs();
        let paced = conn_costs(&self.conn_paced, &self.conn_paced_spent);
        let paced_names = [
            "conn at 1k/s: ztunnel CPU",
            "conn at 1k/s: ztunnel syscalls",
            "conn at 1k/s: ztunnel ctx switches",
        ];
        let mut rows: Vec<_> = ZTUNNEL_COSTS
            .into_iter()
            .zip(COST_UNITS)
            .zip(costs)
            .map(|((name, unit), v)| (name, unit, v))
            .collect();
        // The paced run's units are the connections' (the last three).
        for ((name, unit), v) in paced_names.into_iter().zip(&COST_UNITS[6..]).zip(paced) {
            rows.push((name, unit, v));
        }
        rows
    }

    /// (name, unit, value) of each ztunnel's resident memory, idle and after the load, in all
    /// and its anonymous part (the rest is mostly the binary's code pages).
    fn memory_rows(&self) -> Vec<(&'static str, &'static str, f64)> {
        const IDLE: [[&str; 2]; 2] = [
            ["node-0 ztunnel RSS idle", "node-0 ztunnel RSS idle, anon"],
            ["node-1 ztunnel RSS idle", "node-1 ztunnel RSS idle, anon"],
        ];
        const AFTER: [[&str; 2]; 2] = [
            [
                "node-0 ztunnel RSS after load",
                "node-0 ztunnel RSS after load, anon",
            ],
            [
                "node-1 ztunnel RSS after load",
                "node-1 ztunnel RSS after load, anon",
            ],
        ];
        let mib = |kib: u64| kib as f64 / 1024.0;
        let rows = |memory: &[Memory], names: [[&'static str; 2]; 2]| {
            memory
                .iter()
                .zip(names)
                .flat_map(move |(m, [all, anon])| {
                    [(all, "MiB", mib(m.rss_kib)), (anon, "MiB", mib(m.anon_kib))]
                })
                .collect::<Vec<_>>()
        };
        let mut v = rows(&self.idle, IDLE);
        v.extend(rows(&self.after, AFTER));
        v
    }
}

impl L4Report {
    /// Raw TCP versus the current build; the ztunnels' figures have no raw counterpart.
    pub fn rows(&self) -> Vec<Row> {
        let pair = |raw: &Value, mesh: &Value, key: &str| (num(raw, key), num(mesh, key));
        let m = &self.mesh;
        let figures = [
            (
                "bulk throughput, 1 stream",
                "Gbit/s",
                pair(&self.raw_bulk, &m.bulk, "gbit_per_s"),
            ),
            (
                "1 KiB request/response p50",
                "µs",
                pair(&self.raw_rr, &m.rr, "p50_us"),
            ),
            (
                "1 KiB request/response p99",
                "µs",
                pair(&self.raw_rr, &m.rr, "p99_us"),
            ),
            (
                "new connections (8 workers)",
                "conn/s",
                pair(&self.raw_conn, &m.conn, "per_sec"),
            ),
        ];
        let mut rows = to_rows(figures);
        for (name, unit, mesh) in m.spent_rows().into_iter().chain(m.memory_rows()) {
            rows.push(Row {
                name,
                unit,
                raw: f64::NAN,
                mesh,
            });
        }
        rows
    }

    /// The plaintext relay chain (as `raw`) versus the current build (as `mesh`); added latency
    /// is over raw TCP's. Then what the two relays and the two ztunnels spent per unit of work:
    /// the mesh's cost over a plain relay in counters, not wall time.
    pub fn relay_rows(&self) -> Vec<Row> {
        let pair = |relay: &Value, mesh: &Value, key: &str| (num(relay, key), num(mesh, key));
        let added = |key| {
            (
                self.added(&self.relay_rr, key),
                self.added(&self.mesh.rr, key),
            )
        };
        let m = &self.mesh;
        let mut rows = to_rows([
            (
                "bulk throughput, 1 stream",
                "Gbit/s",
                pair(&self.relay_bulk, &m.bulk, "gbit_per_s"),
            ),
            (
                "1 KiB request/response p50",
                "µs",
                pair(&self.relay_rr, &m.rr, "p50_us"),
            ),
            ("1 KiB added latency p50", "µs", added("p50_us")),
            ("1 KiB added latency p99", "µs", added("p99_us")),
            (
                "new connections (8 workers)",
                "conn/s",
                pair(&self.relay_conn, &m.conn, "per_sec"),
            ),
        ]);
        let [bulk, rr, conn] = &self.relay_spent;
        let relay = unit_costs([
            (&self.relay_bulk, bulk),
            (&self.relay_rr, rr),
            (&self.relay_conn, conn),
        ]);
        let mesh = m.unit_costs();
        for (i, name) in PROXY_COSTS.into_iter().enumerate() {
            rows.push(Row {
                name,
                unit: COST_UNITS[i],
                raw: relay[i],
                mesh: mesh[i],
            });
        }
        rows
    }

    /// A request/response report's latency `key` (p50_us, p99_us) over raw TCP's in the same
    /// round.
    fn added(&self, rr: &Value, key: &str) -> f64 {
        num(rr, key) - num(&self.raw_rr, key)
    }

    /// The baseline build (as `raw`) versus the current one (as `mesh`), if measured.
    pub fn before_after(&self) -> Option<Vec<Row>> {
        let before = self.baseline.as_ref()?;
        let after = &self.mesh;
        let fig = |f: &MeshFigures| {
            let added = |k| self.added(&f.rr, k);
            let mut v = vec![
                (
                    "bulk throughput, 1 stream",
                    "Gbit/s",
                    num(&f.bulk, "gbit_per_s"),
                ),
                ("1 KiB request/response p50", "µs", num(&f.rr, "p50_us")),
                ("1 KiB request/response p99", "µs", num(&f.rr, "p99_us")),
                ("1 KiB added latency p50", "µs", added("p50_us")),
                ("1 KiB added latency p99", "µs", added("p99_us")),
                (
                    "new connections (8 workers)",
                    "conn/s",
                    num(&f.conn, "per_sec"),
                ),
            ];
            v.extend(f.spent_rows());
            v.extend(f.memory_rows());
            v
        };
        let rows = fig(before)
            .into_iter()
            .zip(fig(after))
            .map(|((name, unit, raw), (_, _, mesh))| Row {
                name,
                unit,
                raw,
                mesh,
            })
            .collect();
        Some(rows)
    }
}

/// `(name, unit, (raw, mesh))` figures as table rows.
fn to_rows<const N: usize>(figures: [(&'static str, &'static str, (f64, f64)); N]) -> Vec<Row> {
    figures
        .into_iter()
        .map(|(name, unit, (raw, mesh))| Row {
            name,
            unit,
            raw,
            mesh,
        })
        .collect()
}

/// Prints the raw-vs-mesh table, the fds behind the memory figures and, if measured, the
/// before/after table.
pub fn print(r: &L4Report) {
    println!(
        "raw pods run with {TW_REUSE}=1, as ztunnel sets in enrolled pods; ztunnel figures are \
         both nodes' ztunnels summed"
    );
    if let Some(why) = &r.perf_missing {
        println!("syscalls not counted: {why}");
    }
    print_table(
        "L4, cross-node (same run)",
        "raw TCP",
        "mesh (HBONE)",
        &r.rows(),
    );
    let fds = |f: &MeshFigures| {
        let pairs: Vec<String> = f
            .idle
            .iter()
            .zip(&f.after)
            .map(|(i, a)| format!("{} -> {}", i.fds, a.fds))
            .collect();
        let note = if f.settled {
            ""
        } else {
            " (not back to idle by the deadline)"
        };
        format!("{}{note}", pairs.join(", "))
    };
    println!(
        "ztunnel fds idle -> after load (node-0, node-1): {}",
        fds(&r.mesh)
    );
    println!();
    print_table(
        "L4, plaintext relay chain",
        "relay chain",
        "mesh (HBONE)",
        &r.relay_rows(),
    );
    let vs_raw = |relay: &Value, raw: &Value, k| num(relay, k) / num(raw, k);
    println!(
        "relay chain / raw TCP (the ceiling of a user-space proxy here): bulk {:.2}x, \
         1 KiB p50 {:.2}x, conn/s {:.2}x",
        vs_raw(&r.relay_bulk, &r.raw_bulk, "gbit_per_s"),
        vs_raw(&r.relay_rr, &r.raw_rr, "p50_us"),
        vs_raw(&r.relay_conn, &r.raw_conn, "per_sec"),
    );
    if let (Some(rows), Some(b)) = (r.before_after(), &r.baseline) {
        println!();
        print_table("L4 mesh, previous build vs this", "before", "after", &rows);
        println!("baseline ztunnel fds idle -> after load: {}", fds(b));
    }
    if !r.spread.is_empty() {
        println!();
        for line in &r.spread {
            println!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Each figure's counters are divided by its own work: bytes for bulk, requests with the
    /// warm-up's for request/response, connections for connections; uncounted syscalls are NaN.
    #[test]
    fn unit_costs_divide_each_figure_by_its_own_work() {
        let spent = |cpu_secs, ctx_switches, syscalls| Spent {
            cpu_secs,
            ctx_switches,
            syscalls,
        };
        let bulk = json!({"bytes": 2e9});
        let rr = json!({"count": 900.0, "warmup_count": 100.0});
        let conn = json!({"count": 4000.0});
        let c = unit_costs([
            (&bulk, &spent(3.0, 8000, Some(40_000))),
            (&rr, &spent(0.2, 5000, Some(12_000))),
            (&conn, &spent(1.2, 8000, None)),
        ]);
        assert_eq!(&c[..6], &[1.5, 20.0, 4.0, 200.0, 12.0, 5.0]);
        assert_eq!(c[6], 0.3);
        assert!(c[7].is_nan());
        assert_eq!(c[8], 2000.0);
        assert_eq!(PROXY_COSTS.len(), COST_UNITS.len());
    }
}
