//! What the benches share: the client/server pair manifests (`bench-raw`, `bench-mesh`: a
//! server on node-1, a client on node-0), running `mesh-echo`'s load in a pod and reading its
//! JSON report, and printing two-column tables with ratios. The L4 scenario (raw TCP versus the
//! mesh, with ztunnel's counters) is [`bench_l4`](crate::bench_l4). Owns the shared pieces;
//! the load generator is `mesh-echo`.
//!
//! Two scenarios here compare ztunnel against itself, each with two meshes up at once and
//! measurements interleaved: [`run_capture`] (eBPF vs nftables capture, cross-node: connection
//! rate and 1 KiB request/response latency) and [`run_fastpath`] (same-node bulk throughput
//! with and without `--fast-path`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{LocalMesh, MeshOptions};

pub(crate) const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench-raw}
---
apiVersion: v1
kind: Namespace
metadata:
  name: bench-mesh
  labels: {istio.io/dataplane-mode: ambient}
"#;

pub(crate) fn pods(ns: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {ns}}}
spec:
  nodeName: node-1
  containers: [{{name: s, command: ["mesh-echo", "serve", "--port", "8080"]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {ns}}}
spec:
  nodeName: node-0
  containers: []
"#
    )
}

pub struct BenchOptions {
    pub duration: Duration,
    /// l4: a directory holding a previous build's `ztunnel`: its mesh pair is measured in the
    /// same run, interleaved per figure with the current build's ([`L4Report::before_after`]).
    pub baseline_bins: Option<PathBuf>,
    /// l4: how many rounds of every figure; each figure is reported from its median round
    /// ([`crate::bench_rounds`]).
    pub rounds: u32,
}

/// One measured figure for both pairs.
pub struct Row {
    pub name: &'static str,
    pub unit: &'static str,
    pub raw: f64,
    pub mesh: f64,
}

/// A mesh with one ambient client/server pair (`bench-mesh`); the server on node-1, the client
/// on node-1 too when `same_node`, else node-0.
pub(crate) fn pair_mesh(opts: MeshOptions, same_node: bool) -> anyhow::Result<LocalMesh> {
    let mesh = LocalMesh::start(MeshOptions {
        log: "warn".into(),
        ..opts
    })?;
    mesh.apply("00-ns.yaml", MANIFEST)?;
    let mut yaml = pods("bench-mesh");
    if same_node {
        yaml = yaml.replace("nodeName: node-0", "nodeName: node-1");
    }
    mesh.apply("20-mesh.yaml", &yaml)?;
    mesh.wait_listening("bench-mesh", "server", 8080)?;
    mesh.wait_enrolled("bench-mesh", "client")?;
    mesh.wait_enrolled("bench-mesh", "server")?;
    Ok(mesh)
}

/// Runs `mesh-echo <args>` in namespace `ns`'s client against its server; the JSON report.
pub(crate) fn measure_pair(
    mesh: &LocalMesh,
    ns: &str,
    duration: Duration,
    args: &[&str],
) -> anyhow::Result<Value> {
    measure_wrapped(mesh, ns, duration, args, |load| {
        load.iter().map(|s| s.to_string()).collect()
    })
}

/// [`measure_pair`] with the load's argv passed through `wrap` (e.g. under `perf stat`).
pub(crate) fn measure_wrapped(
    mesh: &LocalMesh,
    ns: &str,
    duration: Duration,
    args: &[&str],
    wrap: impl FnOnce(&[&str]) -> Vec<String>,
) -> anyhow::Result<Value> {
    let server = mesh.pod(ns, "server")?;
    let addr = format!("{}:8080", server.ip4);
    measure_at(mesh, ns, &addr, duration, args, wrap)
}

/// Runs `mesh-echo <args>` in namespace `ns`'s client against `addr`; the JSON report.
pub(crate) fn measure_at(
    mesh: &LocalMesh,
    ns: &str,
    addr: &str,
    duration: Duration,
    args: &[&str],
    wrap: impl FnOnce(&[&str]) -> Vec<String>,
) -> anyhow::Result<Value> {
    let secs = format!("{}ms", duration.as_millis());
    let echo = mesh.bins.echo.display().to_string();
    let mut load = vec![echo.as_str()];
    load.extend_from_slice(args);
    load.extend_from_slice(&["--addr", addr, "--duration", &secs]);
    let argv = wrap(&load);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = mesh.exec(ns, "client", &argv)?;
    if !out.status.success() {
        bail!(
            "{ns}: {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing {}", String::from_utf8_lossy(&out.stdout)))
}

/// The median of `items` ranked by `key` (the upper one of an even count; NaN ranks last), or
/// `None` when there are none. The benches report a median run, not a mean: one run slowed by
/// the shared machine should not move the figure.
pub(crate) fn median_by<T>(items: &[T], key: impl Fn(&T) -> f64) -> Option<&T> {
    let mut ranked: Vec<&T> = items.iter().collect();
    ranked.sort_by(|a, b| key(a).total_cmp(&key(b)));
    ranked.get(ranked.len() / 2).copied()
}

pub(crate) fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// A row comparing figure `key` of two reports (first → `raw`, second → `mesh`).
pub(crate) fn row(name: &'static str, unit: &'static str, pair: &[Value; 2], key: &str) -> Row {
    Row {
        name,
        unit,
        raw: num(&pair[0], key),
        mesh: num(&pair[1], key),
    }
}

/// eBPF vs nftables capture, cross-node, same run. In the rows `raw` is nftables, `mesh` eBPF.
pub fn run_capture(opts: BenchOptions) -> anyhow::Result<Vec<Row>> {
    let mode = |capture: &str| MeshOptions {
        capture: capture.into(),
        ..Default::default()
    };
    let nft = pair_mesh(mode("nftables"), false)?;
    let ebpf = pair_mesh(mode("ebpf"), false)?;
    let d = opts.duration;
    let both = |args: &[&str]| -> anyhow::Result<[Value; 2]> {
        Ok([
            measure_pair(&nft, "bench-mesh", d, args)?,
            measure_pair(&ebpf, "bench-mesh", d, args)?,
        ])
    };
    let conn = both(&["bench-conn", "--concurrency", "8"])?;
    let rr = both(&["bench-rr", "--size", "1024"])?;
    for (c, m) in [(&conn[0], "nftables"), (&conn[1], "ebpf")] {
        let errors = num(c, "errors");
        if errors > 0.0 {
            eprintln!("warning: {errors} connection errors with {m} capture during bench-conn");
        }
    }
    Ok(vec![
        row("new connections (8 workers)", "conn/s", &conn, "per_sec"),
        row("1 KiB request/response p50", "µs", &rr, "p50_us"),
        row("1 KiB request/response p99", "µs", &rr, "p99_us"),
    ])
}

/// Same-node bulk throughput (eBPF capture) without and with `--fast-path`, same run. In the
/// rows `raw` is without, `mesh` with.
pub fn run_fastpath(opts: BenchOptions) -> anyhow::Result<Vec<Row>> {
    let mode = |fast_path: bool| MeshOptions {
        capture: "ebpf".into(),
        fast_path,
        ..Default::default()
    };
    let off = pair_mesh(mode(false), true)?;
    let on = pair_mesh(mode(true), true)?;
    let d = opts.duration;
    let bulk = [
        measure_pair(&off, "bench-mesh", d, &["bench-bulk"])?,
        measure_pair(&on, "bench-mesh", d, &["bench-bulk"])?,
    ];
    Ok(vec![row(
        "same-node bulk, 1 stream",
        "Gbit/s",
        &bulk,
        "gbit_per_s",
    )])
}

/// Prints rows under a header naming the two columns; ratios are second/first. A figure that
/// is not a number (not measured: raw TCP has no ztunnel, perf could not count) prints as `-`.
pub fn print_table(title: &str, first: &str, second: &str, rows: &[Row]) {
    let ratio = format!(
        "{}/{}",
        second.split_whitespace().next().unwrap_or(second),
        first.split_whitespace().next().unwrap_or(first)
    );
    println!("{title:<32} {first:>20} {second:>20} {ratio:>10}");
    for r in rows {
        let ratio = r.mesh / r.raw;
        let ratio = if ratio.is_finite() {
            format!("{ratio:>9.2}x")
        } else {
            format!("{:>10}", "-")
        };
        println!(
            "{:<32} {} {} {ratio}",
            r.name,
            cell(r.raw, r.unit),
            cell(r.mesh, r.unit)
        );
    }
}

/// A value and its unit, 20 columns.
fn cell(v: f64, unit: &str) -> String {
    if v.is_finite() {
        format!("{v:>10.2} {unit:<9}")
    } else {
        format!("{:>10} {unit:<9}", "-")
    }
}
