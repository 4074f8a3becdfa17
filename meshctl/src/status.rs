//! `meshctl status`: the mesh on a cluster at a glance — components (rollout as their
//! controllers report it), nodes (kernel, and whether each DaemonSet's pod there is ready),
//! enrolled namespaces (label `istio.io/dataplane-mode=ambient`) with their pods and how many
//! the node agents captured (annotation `ambient.istio.io/redirection: enabled`), and the
//! waypoints. Owns only this report; reads, never writes.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::backend::str_at;
use crate::check::post::{per_node, workloads};
use crate::cli::ListArgs;
use crate::cluster::{Cluster, ClusterError};
use crate::manifests::Manifests;
use crate::readiness::rollout;
use crate::waypoint::{self, CommandError, DATAPLANE_MODE};

pub fn run(cluster: &Cluster, m: &Manifests) -> Result<(), CommandError> {
    let source = |e: ClusterError| {
        CommandError::Backend(crate::backend::BackendError::Source {
            path: "the Kubernetes API".into(),
            message: e.to_string(),
        })
    };
    let ns = &m.namespace;
    if cluster
        .get("v1", "Namespace", None, ns)
        .map_err(source)?
        .is_none()
    {
        println!("the mesh is not installed (no namespace {ns}): run `meshctl install`");
        return Ok(());
    }
    let live = workloads(cluster, m).map_err(source)?;
    println!("Components (namespace {ns}):");
    let mut rows = vec![vec!["KIND".to_string(), "NAME".into(), "STATE".into()]];
    for w in &live {
        let state = match &w.object {
            Some(o) => {
                let r = rollout(o);
                format!("{} {}", if r.ready { "✓" } else { "✗" }, r.summary)
            }
            None => "✗ missing".into(),
        };
        rows.push(vec![w.kind.clone(), w.name.clone(), state]);
    }
    waypoint::print_table(&rows);

    println!("\nNodes:");
    let nodes = cluster.list("v1", "Node", None, None).map_err(source)?;
    let daemonsets: Vec<_> = live.iter().filter(|w| w.kind == "DaemonSet").collect();
    let mut header = vec!["NODE".to_string(), "KERNEL".into()];
    header.extend(daemonsets.iter().map(|d| d.name.to_uppercase()));
    let mut rows = vec![header];
    let views: Vec<_> = daemonsets.iter().map(|d| per_node(&d.pods)).collect();
    for n in &nodes {
        let name = str_at(n, &["metadata", "name"]).unwrap_or("?").to_string();
        let kernel = str_at(n, &["status", "nodeInfo", "kernelVersion"]).unwrap_or("?");
        let mut row = vec![name.clone(), kernel.to_string()];
        for v in &views {
            row.push(match v.get(&name) {
                Some(Some(_)) => "ready".into(),
                Some(None) => "not ready".into(),
                None => "no pod".into(),
            });
        }
        rows.push(row);
    }
    waypoint::print_table(&rows);

    println!("\nEnrolled namespaces ({DATAPLANE_MODE}=ambient):");
    let enrolled = cluster
        .list(
            "v1",
            "Namespace",
            None,
            Some(&format!("{DATAPLANE_MODE}=ambient")),
        )
        .map_err(source)?;
    if enrolled.is_empty() {
        println!(
            "none: label a namespace with `kubectl label namespace NAME {DATAPLANE_MODE}=ambient`"
        );
    } else {
        let mut rows = vec![vec![
            "NAMESPACE".to_string(),
            "PODS".into(),
            "CAPTURED".into(),
            "NOT CAPTURED".into(),
        ]];
        for e in &enrolled {
            let name = str_at(e, &["metadata", "name"]).unwrap_or("?");
            let pods = cluster
                .list("v1", "Pod", Some(name), None)
                .map_err(source)?;
            let counts = capture_counts(&pods);
            let not: Vec<&str> = counts.1.iter().take(5).map(String::as_str).collect();
            let more = match counts.1.len() > 5 {
                true => format!(" (+{})", counts.1.len() - 5),
                false => String::new(),
            };
            rows.push(vec![
                name.to_string(),
                pods.len().to_string(),
                counts.0.to_string(),
                format!("{}{more}", not.join(",")),
            ]);
        }
        waypoint::print_table(&rows);
    }

    println!("\nWaypoints:");
    waypoint::run(
        cluster,
        &crate::cli::Waypoint::List(ListArgs {
            namespace: None,
            all_namespaces: true,
        }),
    )
}

/// Pods captured (annotated enabled) and the names of those that are not (host-network pods
/// and opted-out pods are never captured; listed so a person sees them).
fn capture_counts(pods: &[Value]) -> (usize, Vec<String>) {
    let mut captured = 0;
    let mut not = BTreeMap::new();
    for p in pods {
        let annotation = p
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(meshcore::enrollment::REDIRECTION_ANNOTATION))
            .and_then(Value::as_str);
        if annotation == Some("enabled") {
            captured += 1;
        } else {
            let name = str_at(p, &["metadata", "name"]).unwrap_or("?");
            not.insert(name.to_string(), ());
        }
    }
    (captured, not.into_keys().collect())
}
