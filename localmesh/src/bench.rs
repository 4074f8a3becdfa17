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
    /// Whether bigger is better (for the reading of the ratio).
    pub higher_is_better: bool,
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
    let secs = format!("{}ms", opts.duration.as_millis());
    let measure = |ns: &str, args: &[&str]| -> anyhow::Result<Value> {
        let server = mesh.pod(ns, "server")?;
        let addr = format!("{}:8080", server.ip4);
        let echo = mesh.bins.echo.display().to_string();
        let mut argv = vec![echo.as_str()];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--addr", &addr, "--duration", &secs]);
        let out = mesh.exec(ns, "client", &argv)?;
        if !out.status.success() {
            bail!(
                "{ns}: {:?} failed: {}",
                args,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{ns}: parsing {}", String::from_utf8_lossy(&out.stdout)))
    };
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let mut rows = Vec::new();
    // Interleave raw and mesh per figure so drift on the shared machine hits both alike.
    let bulk = [
        measure("bench-raw", &["bench-bulk"])?,
        measure("bench-mesh", &["bench-bulk"])?,
    ];
    rows.push(Row {
        name: "bulk throughput, 1 stream",
        unit: "Gbit/s",
        raw: num(&bulk[0], "gbit_per_s"),
        mesh: num(&bulk[1], "gbit_per_s"),
        higher_is_better: true,
    });
    let rr = [
        measure("bench-raw", &["bench-rr", "--size", "1024"])?,
        measure("bench-mesh", &["bench-rr", "--size", "1024"])?,
    ];
    rows.push(Row {
        name: "1 KiB request/response p50",
        unit: "µs",
        raw: num(&rr[0], "p50_us"),
        mesh: num(&rr[1], "p50_us"),
        higher_is_better: false,
    });
    rows.push(Row {
        name: "1 KiB request/response p99",
        unit: "µs",
        raw: num(&rr[0], "p99_us"),
        mesh: num(&rr[1], "p99_us"),
        higher_is_better: false,
    });
    let conn = [
        measure("bench-raw", &["bench-conn", "--concurrency", "8"])?,
        measure("bench-mesh", &["bench-conn", "--concurrency", "8"])?,
    ];
    rows.push(Row {
        name: "new connections (8 workers)",
        unit: "conn/s",
        raw: num(&conn[0], "per_sec"),
        mesh: num(&conn[1], "per_sec"),
        higher_is_better: true,
    });
    let errors = num(&conn[1], "errors");
    if errors > 0.0 {
        eprintln!("warning: {errors} connection errors through the mesh during bench-conn");
    }
    Ok(rows)
}

/// A mesh with one ambient client/server pair (`bench-mesh`); the server on node-1, the client
/// on node-1 too when `same_node`, else node-0.
fn pair_mesh(opts: MeshOptions, same_node: bool) -> anyhow::Result<LocalMesh> {
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

/// Runs `mesh-echo <args>` in the pair's client against its server; the JSON report.
fn measure_pair(mesh: &LocalMesh, duration: Duration, args: &[&str]) -> anyhow::Result<Value> {
    let ns = "bench-mesh";
    let server = mesh.pod(ns, "server")?;
    let addr = format!("{}:8080", server.ip4);
    let secs = format!("{}ms", duration.as_millis());
    let echo = mesh.bins.echo.display().to_string();
    let mut argv = vec![echo.as_str()];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--addr", &addr, "--duration", &secs]);
    let out = mesh.exec(ns, "client", &argv)?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing {}", String::from_utf8_lossy(&out.stdout)))
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
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
    let mut rows = Vec::new();
    let conn_args = ["bench-conn", "--concurrency", "8"];
    let conn = [
        measure_pair(&nft, d, &conn_args)?,
        measure_pair(&ebpf, d, &conn_args)?,
    ];
    rows.push(Row {
        name: "new connections (8 workers)",
        unit: "conn/s",
        raw: num(&conn[0], "per_sec"),
        mesh: num(&conn[1], "per_sec"),
        higher_is_better: true,
    });
    let rr_args = ["bench-rr", "--size", "1024"];
    let rr = [
        measure_pair(&nft, d, &rr_args)?,
        measure_pair(&ebpf, d, &rr_args)?,
    ];
    for (name, k) in [
        ("1 KiB request/response p50", "p50_us"),
        ("1 KiB request/response p99", "p99_us"),
    ] {
        rows.push(Row {
            name,
            unit: "µs",
            raw: num(&rr[0], k),
            mesh: num(&rr[1], k),
            higher_is_better: false,
        });
    }
    for (c, m) in [(&conn[0], "nftables"), (&conn[1], "ebpf")] {
        let errors = num(c, "errors");
        if errors > 0.0 {
            eprintln!("warning: {errors} connection errors with {m} capture during bench-conn");
        }
    }
    Ok(rows)
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
        measure_pair(&off, d, &["bench-bulk"])?,
        measure_pair(&on, d, &["bench-bulk"])?,
    ];
    Ok(vec![Row {
        name: "same-node bulk, 1 stream",
        unit: "Gbit/s",
        raw: num(&bulk[0], "gbit_per_s"),
        mesh: num(&bulk[1], "gbit_per_s"),
        higher_is_better: true,
    }])
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

/// Prints rows as a table with mesh/raw ratios.
pub fn print(rows: &[Row]) {
    println!(
        "{:<32} {:>14} {:>14} {:>10}",
        "L4, cross-node (same run)", "raw TCP", "mesh (HBONE)", "mesh/raw"
    );
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
