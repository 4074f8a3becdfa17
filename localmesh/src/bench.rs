//! The L4 benchmark: raw TCP versus the mesh over the same cross-node veth path, in one run.
//!
//! Two client/server pairs, identical but for mesh enrollment: `bench-raw` (not ambient) and
//! `bench-mesh` (ambient). Each pair runs `mesh-echo`'s bulk, request/response and
//! connection-rate modes; the report gives ratios mesh/raw, the only figures that mean
//! anything on a shared machine. Owns the scenario; the load generator is `mesh-echo`.
//!
//! Two more scenarios compare ztunnel against itself, each with two meshes up at once and
//! measurements interleaved: [`run_capture`] (eBPF vs nftables capture, cross-node: connection
//! rate and 1 KiB request/response latency) and [`run_fastpath`] (same-node bulk throughput
//! with and without `--fast-path`).

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{LocalMesh, MeshOptions};

const MANIFEST: &str = r#"
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

fn pods(ns: &str) -> String {
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
}

/// One measured figure for both pairs.
pub struct Row {
    pub name: &'static str,
    pub unit: &'static str,
    pub raw: f64,
    pub mesh: f64,
}

pub fn run(opts: BenchOptions) -> anyhow::Result<Vec<Row>> {
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
    // Interleave raw and mesh per figure so drift on the shared machine hits both alike.
    let d = opts.duration;
    let both = |args: &[&str]| -> anyhow::Result<[Value; 2]> {
        Ok([
            measure_pair(&mesh, "bench-raw", d, args)?,
            measure_pair(&mesh, "bench-mesh", d, args)?,
        ])
    };
    let bulk = both(&["bench-bulk"])?;
    let rr = both(&["bench-rr", "--size", "1024"])?;
    let conn = both(&["bench-conn", "--concurrency", "8"])?;
    let errors = num(&conn[1], "errors");
    if errors > 0.0 {
        eprintln!("warning: {errors} connection errors through the mesh during bench-conn");
    }
    Ok(vec![
        row("bulk throughput, 1 stream", "Gbit/s", &bulk, "gbit_per_s"),
        row("1 KiB request/response p50", "µs", &rr, "p50_us"),
        row("1 KiB request/response p99", "µs", &rr, "p99_us"),
        row("new connections (8 workers)", "conn/s", &conn, "per_sec"),
    ])
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
    let server = mesh.pod(ns, "server")?;
    let addr = format!("{}:8080", server.ip4);
    let secs = format!("{}ms", duration.as_millis());
    let echo = mesh.bins.echo.display().to_string();
    let mut argv = vec![echo.as_str()];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--addr", &addr, "--duration", &secs]);
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

/// Prints rows under a header naming the two columns; ratios are second/first.
pub fn print_table(title: &str, first: &str, second: &str, rows: &[Row]) {
    let ratio = format!(
        "{}/{}",
        second.split_whitespace().next().unwrap_or(second),
        first.split_whitespace().next().unwrap_or(first)
    );
    println!("{title:<32} {first:>14} {second:>14} {ratio:>10}");
    for r in rows {
        println!(
            "{:<32} {:>10.2} {:<3} {:>10.2} {:<3} {:>9.2}x",
            r.name,
            r.raw,
            r.unit,
            r.mesh,
            r.unit,
            r.mesh / r.raw
        );
    }
}

/// Prints the raw-vs-mesh rows of [`run`] with mesh/raw ratios.
pub fn print(rows: &[Row]) {
    print_table("L4, cross-node (same run)", "raw TCP", "mesh (HBONE)", rows);
}
