//! `meshctl check`: pre-flight (this node's filesystem under `--host-root`, then the cluster's
//! nodes, CNI and Istio through the API) and, once installed, post-install (every component
//! and every node's agents ready). Prints one line per check (✓ / ✗ / !), each ✗ with what to
//! do; the caller exits non-zero when any failed. Owns the sequence; the judgements are in
//! `host`, `preflight` and `post`.

pub mod host;
pub mod post;
pub mod preflight;

use serde_json::Value;

use crate::cli::CheckArgs;
use crate::cluster::{Cluster, ClusterError};
use crate::manifests::{Manifests, kind};
use crate::report::Report;
use host::Capture;

/// Runs the checks and prints them; the number of failures.
pub fn run(
    cluster: &Cluster,
    manifests: &Manifests,
    args: &CheckArgs,
) -> Result<usize, ClusterError> {
    let mut report = Report::default();
    if !args.no_host {
        println!("This machine ({}):", args.host_root.display());
        host::check(&args.host_root, capture(manifests), &mut report);
        report.print_from(0);
    }
    println!("Cluster ({}):", cluster.describe());
    let from = report.lines.len();
    preflight::check(cluster, manifests, &mut report)?;
    report.print_from(from);
    if !args.pre_install {
        println!("Mesh (namespace {}):", manifests.namespace);
        let from = report.lines.len();
        post::check(cluster, manifests, &mut report)?;
        report.print_from(from);
    }
    let failures = report.failures();
    match failures {
        0 => println!("all checks passed"),
        n => println!("{n} check(s) failed"),
    }
    Ok(failures)
}

/// ztunnel's `--capture` in the manifests (any DaemonSet container's args), else its default.
pub fn capture(manifests: &Manifests) -> Capture {
    let containers = manifests
        .objects
        .iter()
        .filter(|o| kind(o) == "DaemonSet")
        .filter_map(|o| o.pointer("/spec/template/spec/containers")?.as_array())
        .flatten();
    for c in containers {
        let args: Vec<&str> = c
            .get("args")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (i, a) in args.iter().enumerate() {
            let value = match *a {
                "--capture" => args.get(i + 1).copied(),
                _ => a.strip_prefix("--capture="),
            };
            if let Some(v) = value {
                return match v {
                    "ebpf" => Capture::Ebpf,
                    "nftables" => Capture::Nftables,
                    _ => Capture::Auto,
                };
            }
        }
    }
    Capture::Auto
}
