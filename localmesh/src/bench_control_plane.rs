//! Bench: the control plane at the scale — meshd in Kubernetes mode against the API
//! server double holding a synthetic cluster (10,000 pods, 1,000 Services, 1,000 policies over
//! 100 nodes by default), with one real config-stream subscriber per node.
//!
//! Figures (absolute: there is no baseline to divide by, except for bytes): time from meshd's
//! start to every node holding its full first view; each node's first view in bytes against
//! the whole mesh's (the ratio is "each node gets only what it needs"); under churn, the delay
//! from a change's write to the API until every affected node holds it (p50/p99; a workload
//! affects every node, a policy the nodes running pods of its namespace, a root-namespace
//! policy every node); meshd's peak RSS and CPU seconds. Owns the scenario only: the cluster
//! is `testbed::kubeapi::synth`'s, the subscribers apply updates with meshcore's `ConfigStore`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meshcore::store::ConfigStore;
use prost::Message;
use serde_json::json;
use testbed::kubeapi::synth::{self, Change, Effect, Synth, SynthSize};
use testbed::kubeapi::{ApiOptions, ApiServer};

use crate::Bins;

mod nodes;
mod print;

pub use nodes::Parts;
use nodes::{Node, Pending, PendingList, Seen, same_object, subscribe, whole_mesh};
pub use print::print;

const MESHD_NAMESPACE: &str = "mesh-system";
/// How long every node may take to hold its first full view, and a change to arrive.
const FIRST_PUSH_DEADLINE: Duration = Duration::from_secs(600);
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

pub struct Options {
    pub size: SynthSize,
    /// How long changes are made for, and how many per second.
    pub churn: Duration,
    pub rate: f64,
}

impl Options {
    /// The size divided by `divisor` (1: full size); churn for `churn` at 20/s.
    pub fn new(divisor: usize, churn: Duration) -> Options {
        Options {
            size: if divisor <= 1 {
                SynthSize::FULL
            } else {
                SynthSize::divided(divisor)
            },
            churn,
            rate: 20.0,
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub size: Option<SynthSize>,
    pub objects: usize,
    pub json_bytes: usize,
    pub fill: Duration,
    pub first_push: Duration,
    /// meshd's start to its listening (it listens once it has listed everything).
    pub ready: Duration,
    /// Bytes of each node's first view (the snapshot message, protobuf-encoded).
    pub first_view_bytes: Vec<usize>,
    /// What each first view is made of.
    pub first_view_parts: Vec<Parts>,
    pub whole_mesh_bytes: usize,
    pub policies_per_node: Vec<usize>,
    pub policies_total: usize,
    /// Delays of changes every affected node saw, by kind ("pod", "policy").
    pub delays: BTreeMap<&'static str, Vec<Duration>>,
    /// Changes some affected node had not seen by the drain deadline.
    pub missed: usize,
    /// Changes overtaken by a later change to the same object before all nodes saw them.
    pub superseded: usize,
    /// Bytes each node received during churn.
    pub churn_bytes: Vec<usize>,
    pub changes: usize,
    /// How long each churn write took the API to answer.
    pub write_latency: Vec<Duration>,
    /// Changes no node needed (a policy of a namespace without pods).
    pub unaffected: usize,
    pub rate: f64,
    pub rss_peak_kb: u64,
    /// meshd's RSS once it serves, before any node subscribed.
    pub rss_ready_kb: u64,
    pub cpu_start: f64,
    pub cpu_churn: f64,
    /// When the first and the last node got their first update (from meshd's start).
    pub first_snapshot: Duration,
    pub last_snapshot: Duration,
    /// Requests meshd made to the API until its first full push: reads (lists, pages and
    /// single GETs), watches, and writes (status, waypoint objects, its Lease and CA).
    pub reads: usize,
    pub watches: usize,
    pub writes: usize,
}

/// The meshd process (killed when dropped).
struct Meshd(Child);

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(opts: Options) -> anyhow::Result<Report> {
    let bins = Bins::locate()?;
    let mut report = Report {
        size: Some(opts.size),
        rate: opts.rate,
        ..Default::default()
    };
    let api = ApiServer::start(ApiOptions::default()).context("starting the API server double")?;
    let mut synth = Synth::new(opts.size, 42);
    let objects = synth.objects();
    report.objects = objects.len();
    report.json_bytes = objects.iter().map(|o| o.to_string().len()).sum();
    let t = Instant::now();
    api.install_mesh_crds()?;
    let ns =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": MESHD_NAMESPACE}});
    api.create(ns)?;
    for obj in objects {
        write(&api, &Change::Put(obj))?;
    }
    report.fill = t.elapsed();

    let dir = Scratch(std::env::temp_dir().join(format!(
        "mesh-bench-cp-{}-{}",
        std::process::id(),
        t.elapsed().as_nanos()
    )));
    std::fs::create_dir_all(&dir.0)?;
    let state = dir.0.join("state");
    let sock = dir.0.join("meshd.sock");
    let tokens = node_tokens(&bins, &state, &synth.nodes())?;
    let requests_before = api.requests().len();
    let log = std::fs::File::create(dir.0.join("meshd.log"))?;
    let started = Instant::now();
    let meshd = Meshd(
        Command::new(&bins.meshd)
            .args(["run", "--kubernetes", "--kubeconfig"])
            .arg(api.kubeconfig())
            .args(["--namespace", MESHD_NAMESPACE, "--pod-name", "meshd-0"])
            .arg("--state-dir")
            .arg(&state)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(["--root-namespace", synth::ROOT_NAMESPACE])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting meshd")?,
    );
    let pid = meshd.0.id();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let nodes: Vec<Arc<Node>> = synth
        .nodes()
        .into_iter()
        .map(|name| {
            Arc::new(Node {
                name,
                store: Mutex::new(ConfigStore::default()),
                first_view: Mutex::new(None),
                bytes: Mutex::new(0),
                failed: Mutex::new(None),
            })
        })
        .collect();
    let pending: PendingList = Arc::new(Mutex::new(Vec::new()));
    let done: Seen = Arc::new(Mutex::new(Vec::new()));
    // meshd listens once it holds the full view: note its memory before anyone subscribes.
    let log_path = dir.0.join("meshd.log");
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        check_alive(&meshd, &[], &log_path)?;
        if started.elapsed() > FIRST_PUSH_DEADLINE {
            bail!("meshd did not listen within {FIRST_PUSH_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    report.ready = started.elapsed();
    report.rss_ready_kb = rss_kb(pid, "VmRSS:")?;
    for (node, token) in nodes.iter().zip(tokens) {
        let ctx = (node.clone(), pending.clone(), done.clone());
        rt.spawn(subscribe(sock.clone(), token, ctx));
    }

    // First push: every node holds its full view (all workloads, its policies).
    let want_workloads = synth.workloads().len();
    let want_policies: BTreeMap<String, usize> = synth
        .nodes()
        .into_iter()
        .map(|n| {
            let c = synth.policies_for_node(&n).len();
            (n, c)
        })
        .collect();
    loop {
        check_alive(&meshd, &nodes, &log_path)?;
        let full = nodes.iter().all(|n| {
            let s = n.store.lock().unwrap_or_else(|p| p.into_inner());
            s.workloads().count() == want_workloads
                && s.policies().count() == want_policies[&n.name]
        });
        if full {
            break;
        }
        if started.elapsed() > FIRST_PUSH_DEADLINE {
            bail!("not every node had its full view after {FIRST_PUSH_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    report.first_push = started.elapsed();
    report.cpu_start = cpu_seconds(pid)?;
    for r in api.requests().iter().skip(requests_before) {
        match r.method.as_str() {
            "GET" if r.query.contains("watch=true") => report.watches += 1,
            "GET" => report.reads += 1,
            _ => report.writes += 1,
        }
    }
    for n in &nodes {
        let first = *n.first_view.lock().unwrap_or_else(|p| p.into_inner());
        let (at, bytes, parts) = first.unwrap_or((Instant::now(), 0, Parts::default()));
        let at = at.saturating_duration_since(started);
        if report.first_snapshot.is_zero() || at < report.first_snapshot {
            report.first_snapshot = at;
        }
        report.last_snapshot = report.last_snapshot.max(at);
        report.first_view_bytes.push(bytes);
        report.first_view_parts.push(parts);
        let s = n.store.lock().unwrap_or_else(|p| p.into_inner());
        report.policies_per_node.push(s.policies().count());
        *n.bytes.lock().unwrap_or_else(|p| p.into_inner()) = 0;
    }
    report.policies_total = synth.policies.len();
    report.whole_mesh_bytes = whole_mesh(&nodes, &synth).encoded_len();

    // Churn at a fixed rate (open loop: a slow meshd does not slow the changes down).
    let churn_start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / opts.rate.max(0.1));
    let mut next = churn_start;
    while churn_start.elapsed() < opts.churn {
        let c = synth.churn();
        let (kind, affected) = match &c.effect {
            Effect::Workload { .. } => ("pod", synth.nodes().into_iter().collect()),
            Effect::Policy { namespace, .. } => ("policy", synth.policy_nodes(namespace)),
        };
        if affected.is_empty() {
            // A policy of a namespace without pods: no node is told, nothing to wait for.
            report.unaffected += 1;
        } else {
            let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
            // A change to an object still on its way overtakes the earlier one.
            let before = p.len();
            p.retain(|old| !same_object(&old.effect, &c.effect));
            report.superseded += before - p.len();
            p.push(Pending {
                effect: c.effect.clone(),
                kind,
                written: Instant::now(),
                waiting: affected,
            });
        }
        let w = Instant::now();
        write(&api, &c.change)?;
        report.write_latency.push(w.elapsed());
        report.changes += 1;
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let drain = Instant::now();
    while !pending.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
        check_alive(&meshd, &nodes, &log_path)?;
        if drain.elapsed() > DRAIN_DEADLINE {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    report.missed = pending.lock().unwrap_or_else(|p| p.into_inner()).len();
    report.cpu_churn = cpu_seconds(pid)? - report.cpu_start;
    report.rss_peak_kb = rss_kb(pid, "VmHWM:")?;
    for n in &nodes {
        report
            .churn_bytes
            .push(*n.bytes.lock().unwrap_or_else(|p| p.into_inner()));
    }
    for (kind, d) in done.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        report.delays.entry(kind).or_default().push(*d);
    }
    drop(meshd);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(report)
}

fn write(api: &ApiServer, change: &Change) -> anyhow::Result<()> {
    match change {
        Change::Put(obj) => {
            api.put(obj.clone())
                .with_context(|| format!("writing {}", obj["metadata"]))?;
        }
        Change::Delete {
            api_version,
            kind,
            namespace,
            name,
        } => api
            .delete(api_version, kind, Some(namespace), name)
            .with_context(|| format!("deleting {kind} {namespace}/{name}"))?,
    }
    Ok(())
}

fn node_tokens(bins: &Bins, state: &Path, nodes: &[String]) -> anyhow::Result<Vec<String>> {
    nodes
        .iter()
        .map(|node| {
            let out = Command::new(&bins.meshd)
                .arg("node-token")
                .arg("--state-dir")
                .arg(state)
                .args(["--node", node])
                .output()
                .context("running meshd node-token")?;
            if !out.status.success() {
                bail!(
                    "meshd node-token: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .collect()
}

fn check_alive(meshd: &Meshd, nodes: &[Arc<Node>], log: &Path) -> anyhow::Result<()> {
    if !Path::new(&format!("/proc/{}", meshd.0.id())).exists() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bail!("meshd exited:\n{}", tail(&text, 20));
    }
    for n in nodes {
        if let Some(why) = n.failed.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!(
                "{}'s subscription failed: {why}\n{}",
                n.name,
                tail(&text, 20)
            );
        }
    }
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; here 0-based after the state field (3).
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11) + ticks(12)) / hz.max(1.0))
}

/// A `/proc/PID/status` memory figure (`VmRSS:`, `VmHWM:`) in KiB.
fn rss_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}
