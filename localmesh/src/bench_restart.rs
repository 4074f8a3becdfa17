//! Bench: what does a rolling update of ztunnel cost the traffic going through it?
//!
//! One client/server pair in the mesh (client on node-0, server on node-1). The connection
//! rate (8 workers, each connection a fresh connect plus one exchange) is measured once in
//! steady state, then again while both nodes' ztunnels are replaced the way a DaemonSet
//! rollout with surge does it: a new ztunnel beside the old, the old stopped and drained. The
//! figures are the ratio of the two rates and p99s, and the number of failed connections
//! (the goal: none). Owns the scenario only; the handover itself is ztunnel's.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use crate::bench::{Row, measure_pair};
use crate::{LocalMesh, MeshOptions};

const PAIR: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: bench-mesh
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench-mesh}
spec:
  nodeName: node-1
  containers: [{name: s, command: ["mesh-echo", "serve", "--port", "8080"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench-mesh}
spec:
  nodeName: node-0
  containers: []
"#;

/// The scenario's result: rows (steady → during the update) and the failed connections.
pub struct RestartReport {
    pub rows: Vec<Row>,
    pub errors_steady: f64,
    pub errors_during: f64,
    /// How long the two handovers took, first start to last old ztunnel gone.
    pub handover: Duration,
}

pub fn run(duration: Duration) -> anyhow::Result<RestartReport> {
    let mesh = LocalMesh::start(MeshOptions {
        log: "warn".into(),
        ..Default::default()
    })?;
    mesh.apply("00-pair.yaml", PAIR)?;
    mesh.wait_listening("bench-mesh", "server", 8080)?;
    mesh.wait_enrolled("bench-mesh", "client")?;
    mesh.wait_enrolled("bench-mesh", "server")?;
    let load = ["bench-conn", "--concurrency", "8"];
    let steady = measure_pair(&mesh, "bench-mesh", duration, &load)?;
    let (during, handover) = std::thread::scope(|s| {
        let measured = s.spawn(|| measure_pair(&mesh, "bench-mesh", duration, &load));
        // Let the load settle, then replace both ztunnels while it runs.
        std::thread::sleep(duration / 5);
        let handover = roll(&mesh);
        let during = measured
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        anyhow::Ok((during, handover?))
    })?;
    anyhow::ensure!(
        handover < duration,
        "the rolling update ({handover:?}) outlasted the measurement ({duration:?}); use more --seconds"
    );
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let row = |name, unit, key| Row {
        name,
        unit,
        raw: num(&steady, key),
        mesh: num(&during, key),
    };
    Ok(RestartReport {
        rows: vec![
            row("new connections (8 workers)", "conn/s", "per_sec"),
            row("connect + exchange p99", "µs", "p99_us"),
        ],
        errors_steady: num(&steady, "errors"),
        errors_during: num(&during, "errors"),
        handover,
    })
}

/// Replaces node 0's and then node 1's ztunnel; returns how long it took.
fn roll(mesh: &LocalMesh) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for (node, pod) in [(0, "client"), (1, "server")] {
        let mut old = mesh.start_ztunnel_beside(node)?;
        mesh.wait_enrolled("bench-mesh", pod)?;
        old.request_stop();
        old.wait_timeout(Duration::from_secs(40))
            .with_context(|| format!("node-{node}'s old ztunnel did not finish draining"))?;
    }
    Ok(start.elapsed())
}
