//! The demo's tracing part: an OTLP/gRPC receiver in a pod outside the mesh (legacy/collector,
//! `otlp_sink.py`, one JSON line per span), waypoints started with `TRACE_COLLECTOR` pointing at
//! it, and one request sent with a known W3C `traceparent` whose span the waypoint must export
//! in the same trace, as a child of the client's span. Owns the collector and this check only.

use std::time::Duration;

use anyhow::Context;

use super::Check;
use super::resilience::{NS, get};
use crate::LocalMesh;

const COLLECTOR_NS: &str = "legacy";
const COLLECTOR: &str = "collector";
const OTLP_PORT: u16 = 4317;
const DEADLINE: Duration = Duration::from_secs(30);

/// Starts the receiver and points waypoints started from now on at it (100% sampling). Must run
/// before the waypoint exists; an error leaves waypoints without tracing (the check reports it).
pub(super) fn start_collector(mesh: &LocalMesh) -> anyhow::Result<()> {
    let dir = mesh.dir();
    let script = dir.join("otlp_sink.py");
    std::fs::write(&script, include_str!("../otlp_sink.py"))
        .with_context(|| format!("writing {}", script.display()))?;
    let spans = dir.join("spans.jsonl");
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {COLLECTOR}, namespace: {COLLECTOR_NS}}}\n\
         spec:\n  nodeName: node-0\n  containers:\n  - name: otlp\n    \
         command: [python3, \"{}\", \"0.0.0.0:{OTLP_PORT}\", \"{}\"]\n",
        script.display(),
        spans.display()
    );
    mesh.apply("05-collector.yaml", &manifest)?;
    mesh.wait_listening(COLLECTOR_NS, COLLECTOR, OTLP_PORT)
        .context(
            "the OTLP receiver (python3 with grpcio and opentelemetry-proto: `cargo xtask deps`)",
        )?;
    let ip = mesh.pod(COLLECTOR_NS, COLLECTOR)?.ip4;
    mesh.set_waypoint_env("TRACE_COLLECTOR", &format!("http://{ip}:{OTLP_PORT}"));
    mesh.set_waypoint_env("TRACE_SAMPLING", "100");
    Ok(())
}

/// One request with a `traceparent` of ours; the waypoint's span must reach the receiver.
pub(super) fn check(mesh: &LocalMesh, collector: &anyhow::Result<()>) -> Check {
    Check {
        title: "one trace: the waypoint exports its span (OTLP/gRPC) as a child of the client's traceparent"
            .into(),
        result: match collector {
            Ok(()) => one_trace(mesh),
            Err(e) => Err(anyhow::anyhow!("no OTLP receiver: {e:#}")),
        },
    }
}

fn one_trace(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let r = super::rand_u64();
    let trace_id = format!("{:016x}{:016x}", r, r.rotate_left(17) ^ 0x5eed);
    let parent = format!("{:016x}", r.rotate_left(31) | 1);
    let header = format!("traceparent: 00-{trace_id}-{parent}-01");
    let path = format!("/{}", super::nonce("traced"));
    let reply = get(
        mesh,
        "orders",
        std::slice::from_ref(&path),
        std::slice::from_ref(&header),
    )?;
    anyhow::ensure!(
        reply[0].code == 200,
        "the traced request got {}",
        reply[0].code
    );
    let file = mesh.dir().join("spans.jsonl");
    let mut spans: Vec<serde_json::Value> = Vec::new();
    crate::wait_for(
        DEADLINE,
        &format!("a span of trace {trace_id} in {}", file.display()),
        || {
            spans = std::fs::read_to_string(&file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|s| s["trace_id"] == trace_id.as_str())
                .collect();
            Ok(!spans.is_empty())
        },
    )?;
    let ours = spans
        .iter()
        .find(|s| s["parent_span_id"] == parent.as_str())
        .with_context(|| {
            format!(
                "no span of trace {trace_id} has the client's span {parent} as parent: {spans:?}"
            )
        })?;
    let mut lines = vec![
        format!("GET orders.{NS}{path} with {header}"),
        format!(
            "span {} \"{}\" (service {}), trace {trace_id}, parent {parent}",
            ours["span_id"].as_str().unwrap_or("?"),
            ours["name"].as_str().unwrap_or("?"),
            ours["service"].as_str().unwrap_or("?"),
        ),
    ];
    if let Some(attrs) = ours["attributes"].as_object() {
        let mut kv: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        kv.sort();
        lines.extend(kv.into_iter().map(|a| format!("  {a}")));
    }
    Ok(lines)
}
