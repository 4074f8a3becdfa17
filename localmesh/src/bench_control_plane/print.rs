//! The bench's table.

use std::time::Duration;

use testbed::kubeapi::synth::SynthSize;

use super::Report;
use super::nodes::Parts;

fn percentile(v: &mut [Duration], p: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied()
}

fn median(v: &[usize]) -> usize {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

pub fn print(r: &Report) {
    let size = r.size.unwrap_or(SynthSize::FULL);
    println!(
        "control plane: meshd --kubernetes against the API double, {} pods / {} Services / {} policies / {} nodes",
        size.pods, size.services, size.policies, size.nodes
    );
    let row = |name: &str, value: String, note: String| println!("{name:<40} {value:>18}   {note}");
    row(
        "API filled",
        format!("{:.2?}", r.fill),
        format!("{} objects, {:.1} MB of JSON", r.objects, mb(r.json_bytes)),
    );
    row(
        "time to first full push",
        format!("{:.2?}", r.first_push),
        format!(
            "meshd start → all {} nodes hold their full view (first update to a node after {:.2?}, to the last after {:.2?})",
            size.nodes, r.first_snapshot, r.last_snapshot
        ),
    );
    row(
        "  meshd listening (listed in full)",
        format!("{:.2?}", r.ready),
        "meshd serves nothing before every kind is listed".into(),
    );
    row(
        "  meshd's API requests until then",
        format!("{} / {} / {}", r.reads, r.watches, r.writes),
        "reads (list pages, GETs) / watches / writes (status, waypoints, Lease, CA)".into(),
    );
    let max = r.first_view_bytes.iter().copied().max().unwrap_or(0);
    let p50 = median(&r.first_view_bytes);
    row(
        "first view per node, p50 / max",
        format!("{:.2} / {:.2} MB", mb(p50), mb(max)),
        format!(
            "whole mesh {:.2} MB: {:.2}x / {:.2}x of it",
            mb(r.whole_mesh_bytes),
            p50 as f64 / r.whole_mesh_bytes.max(1) as f64,
            max as f64 / r.whole_mesh_bytes.max(1) as f64
        ),
    );
    let part =
        |f: fn(&Parts) -> usize| median(&r.first_view_parts.iter().map(f).collect::<Vec<_>>());
    row(
        "  of which workloads / Services / policies",
        format!(
            "{:.2} / {:.2} / {:.2} MB",
            mb(part(|p| p.workloads)),
            mb(part(|p| p.services)),
            mb(part(|p| p.policies))
        ),
        "p50 of each; every node gets every workload and Service".into(),
    );
    row(
        "  policies ztunnel does not enforce",
        format!(
            "{} / {:.3} MB",
            part(|p| p.waypoint_policy_count),
            mb(part(|p| p.waypoint_policies))
        ),
        "p50 count / bytes per node: targetRef(s) policies and RequestAuthentications".into(),
    );
    row(
        "policies per node, p50 / max",
        format!(
            "{} / {}",
            median(&r.policies_per_node),
            r.policies_per_node.iter().max().unwrap_or(&0)
        ),
        format!(
            "of {} (root namespace's + local namespaces')",
            r.policies_total
        ),
    );
    let mut all: Vec<Duration> = r.delays.values().flatten().copied().collect();
    let fmt = |v: &mut Vec<Duration>| match (percentile(v, 0.5), percentile(v, 0.99)) {
        (Some(a), Some(b)) => format!("{a:.1?} / {b:.1?}"),
        _ => "-".into(),
    };
    row(
        "change → affected nodes, p50 / p99",
        fmt(&mut all),
        format!(
            "{} changes at {:.0}/s: {} seen by every affected node, {} missed, {} overtaken, {} affecting none",
            r.changes,
            r.rate,
            all.len(),
            r.missed,
            r.superseded,
            r.unaffected
        ),
    );
    for (kind, v) in &r.delays {
        let mut v = v.clone();
        row(
            &format!("  {kind} changes, p50 / p99"),
            fmt(&mut v),
            format!("{} changes", v.len()),
        );
    }
    let mut w = r.write_latency.clone();
    row(
        "  API write (the double), p50 / p99",
        fmt(&mut w),
        "included in the delays above".into(),
    );
    row(
        "bytes per node during churn, p50 / max",
        format!(
            "{:.2} / {:.2} MB",
            mb(median(&r.churn_bytes)),
            mb(r.churn_bytes.iter().copied().max().unwrap_or(0))
        ),
        String::new(),
    );
    row(
        "meshd peak RSS (VmHWM)",
        format!("{:.0} MB", r.rss_peak_kb as f64 / 1024.0),
        format!(
            "{:.0} MB when ready, before any subscriber: {:.1} MB more per node subscribed",
            r.rss_ready_kb as f64 / 1024.0,
            r.rss_peak_kb.saturating_sub(r.rss_ready_kb) as f64 / 1024.0 / size.nodes.max(1) as f64
        ),
    );
    row(
        "meshd CPU, start-up / churn",
        format!("{:.1} / {:.1} s", r.cpu_start, r.cpu_churn),
        "user+system".into(),
    );
}
