//! Bench: what does a rolling update of ztunnel cost the traffic going through it?
//!
//! One client/server pair in the mesh (client on node-0, server on node-1). The connection
//! rate (8 workers, each connection a fresh connect plus one exchange) is measured once in
//! steady state, then again while both nodes' ztunnels are replaced the way a DaemonSet
//! rollout with surge does it: a new ztunnel beside the old, the old stopped and drained. The
//! figures are the ratio of the two rates and p99s, and the number of failed connections
//! (the goal: none). Owns the scenario only; the handover itself is ztunnel's.

use std::time::{Duration, Instant};

use crate::bench::{Row, measure_pair, num, pair_mesh, row};
use crate::{LocalMesh, MeshOptions};
use anyhow::Context;

/// The scenario's result: rows (steady → during the update) and the failed connections.
pub struct RestartReport {
    pub rows: Vec<Row>,
    pub errors_steady: f64,
    pub errors_during: f64,
    /// How long the two handovers took, first start to last old ztunnel gone.
    pub handover: Duration,
}

pub fn run(duration: Duration) -> anyhow::Result<RestartReport> {
    let mesh = pair_mesh(MeshOptions::default(), false)?;
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
    let pair = [steady, during];
    Ok(RestartReport {
        rows: vec![
            row("new connections (8 workers)", "conn/s", &pair, "per_sec"),
            row("connect + exchange p99", "µs", &pair, "p99_us"),
        ],
        errors_steady: num(&pair[0], "errors"),
        errors_during: num(&pair[1], "errors"),
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
