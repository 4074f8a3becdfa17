//! Bench: does authorization stay cheap with 10,000 policies in force?
//!
//! One client/server pair in the mesh; new-connection rate measured with no policy, then with
//! 10,000 AuthorizationPolicies (spread over many namespaces, a few in the server's namespace
//! with selectors that miss it, and one ALLOW that admits the client). The ratio is the
//! figure; the goal is within 10%. Owns the scenario only.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;

use crate::{LocalMesh, MeshOptions, wait_for};

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: bench
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
spec:
  nodeName: node-1
  serviceAccountName: server
  containers: [{name: s, command: ["mesh-echo", "serve", "--port", "8080"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench}
spec:
  nodeName: node-0
  serviceAccountName: client
  containers: []
"#;

/// `n` policies: all but a handful in other namespaces; one ALLOW admitting the client.
pub fn policies(n: usize) -> String {
    let mut y = String::with_capacity(n * 300);
    for i in 0..n.saturating_sub(10) {
        let _ = write!(
            y,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: team-{}}}\n\
             spec:\n  selector: {{matchLabels: {{app: svc-{}}}}}\n  action: {}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/team-{}/sa/caller-{i}\"]}}}}]\n    to: [{{operation: {{ports: [\"{}\"]}}}}]\n",
            i % 1000,
            i % 37,
            if i % 3 == 0 { "DENY" } else { "ALLOW" },
            (i + 1) % 1000,
            8000 + i % 100,
        );
    }
    for i in 0..9 {
        let _ = write!(
            y,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: other-{i}, namespace: bench}}\n\
             spec:\n  selector: {{matchLabels: {{app: not-server-{i}}}}}\n  rules:\n  - from: [{{source: {{namespaces: [\"x{i}\"]}}}}]\n"
        );
    }
    y.push_str(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-client, namespace: bench}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/bench/sa/client\"]}}]\n",
    );
    y
}

/// Returns (conn/s without policies, conn/s with `n` policies).
pub fn run(duration: Duration, n: usize) -> anyhow::Result<(f64, f64)> {
    let mesh = LocalMesh::start(MeshOptions {
        log: "warn,ztunnel::policy=info".into(),
        ..Default::default()
    })?;
    mesh.apply("00-base.yaml", BASE)?;
    mesh.wait_listening("bench", "server", 8080)?;
    mesh.wait_enrolled("bench", "client")?;
    mesh.wait_enrolled("bench", "server")?;
    let rate = || -> anyhow::Result<f64> {
        let args = ["bench-conn", "--concurrency", "8"];
        let v = crate::bench::measure_pair(&mesh, "bench", duration, &args)?;
        anyhow::ensure!(v["errors"].as_f64() == Some(0.0), "connections failed: {v}");
        v["per_sec"].as_f64().context("no per_sec")
    };
    // Each figure follows a warm-up run of the same length, so both see a warm system.
    let _warm = rate()?;
    let without = rate()?;
    mesh.apply("10-policies.yaml", &policies(n))?;
    // Both ztunnels compile the new set; measure only once both have (the first measurement
    // must not overlap the one-off work of receiving and compiling 10,000 policies).
    let want = format!("\"policies\":{n}");
    wait_for(
        Duration::from_secs(120),
        &format!("both ztunnels to compile {n} policies"),
        || Ok(mesh.ztunnel_log(0).contains(&want) && mesh.ztunnel_log(1).contains(&want)),
    )?;
    let _warm = rate()?;
    let with = rate()?;
    Ok((without, with))
}
