//! The L4 benchmark: raw TCP versus the mesh over the same cross-node veth path, in one run.
//!
//! Two client/server pairs, identical but for mesh enrollment: `bench-raw` (not ambient) and
//! `bench-mesh` (ambient). Each pair runs `mesh-echo`'s bulk, request/response and
//! connection-rate modes; the report gives ratios mesh/raw, the only figures that mean
//! anything on a shared machine. Owns the scenario; the load generator is `mesh-echo`.

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
