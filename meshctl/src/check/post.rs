//! Post-install facts: every component of the manifests present and rolled out (meshd's ready
//! replicas, the DaemonSets' counts as their controllers report them), and on every node a
//! ready pod of each DaemonSet (ztunnel: ready means connected to the node agent and to meshd;
//! mesh-cni: the node agent). Owns these judgements and the per-node view `status` prints too;
//! reads, never writes.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::backend::str_at;
use crate::cluster::{Cluster, ClusterError};
use crate::manifests::{Manifests, api_version, kind};
use crate::readiness::{pod_problem, pod_ready, rollout, selector};
use crate::report::Report;

fn name(o: &Value) -> &str {
    str_at(o, &["metadata", "name"]).unwrap_or("")
}

/// A workload of the manifests as it is in the cluster.
pub struct Live {
    pub kind: String,
    pub name: String,
    pub object: Option<Value>,
    /// Its pods (by its selector).
    pub pods: Vec<Value>,
}

/// Each Deployment and DaemonSet of the manifests, with its pods.
pub fn workloads(cluster: &Cluster, manifests: &Manifests) -> Result<Vec<Live>, ClusterError> {
    let ns = manifests.namespace.as_str();
    let mut out = Vec::new();
    for w in manifests.workloads() {
        let object = cluster.get(api_version(w), kind(w), Some(ns), name(w))?;
        let sel = object.as_ref().and_then(selector).or_else(|| selector(w));
        let pods = match sel {
            Some(sel) => cluster.list("v1", "Pod", Some(ns), Some(&sel))?,
            None => Vec::new(),
        };
        out.push(Live {
            kind: kind(w).to_string(),
            name: name(w).to_string(),
            object,
            pods,
        });
    }
    Ok(out)
}

/// Node name → this DaemonSet's ready pod there (None: a pod, not ready; absent: no pod).
pub fn per_node(pods: &[Value]) -> BTreeMap<String, Option<&Value>> {
    let mut out: BTreeMap<String, Option<&Value>> = BTreeMap::new();
    for p in pods {
        let Some(node) = str_at(p, &["spec", "nodeName"]) else {
            continue;
        };
        let slot = out.entry(node.to_string()).or_default();
        if pod_ready(p) {
            *slot = Some(p);
        }
    }
    out
}

/// The post-install checks; false when the mesh is not installed (nothing checked).
pub fn check(
    cluster: &Cluster,
    manifests: &Manifests,
    report: &mut Report,
) -> Result<bool, ClusterError> {
    let ns = &manifests.namespace;
    if cluster.get("v1", "Namespace", None, ns)?.is_none() {
        report.warn(
            format!("the mesh is not installed (no namespace {ns})"),
            Some("meshctl install".into()),
        );
        return Ok(false);
    }
    let nodes: Vec<String> = cluster
        .list("v1", "Node", None, None)?
        .iter()
        .map(|n| name(n).to_string())
        .collect();
    for live in workloads(cluster, manifests)? {
        let what = format!("{} {ns}/{}", live.kind, live.name);
        let Some(obj) = &live.object else {
            report.fail(
                format!("{what} is missing"),
                "meshctl install (it re-applies what is missing)",
            );
            continue;
        };
        let state = rollout(obj);
        let unready: Vec<String> = live
            .pods
            .iter()
            .filter(|p| !pod_ready(p))
            .take(3)
            .map(pod_problem)
            .collect();
        if state.ready {
            report.pass(format!("{what}: {}", state.summary));
        } else {
            let why = match unready.is_empty() {
                true => String::new(),
                false => format!(" — {}", unready.join("; ")),
            };
            report.fail(
                format!("{what}: {}{why}", state.summary),
                format!(
                    "kubectl -n {ns} describe {} {} (and its pods' events and logs)",
                    live.kind.to_lowercase(),
                    live.name
                ),
            );
        }
        if live.kind != "DaemonSet" {
            continue;
        }
        let by_node = per_node(&live.pods);
        let missing: Vec<String> = nodes
            .iter()
            .filter_map(|n| match by_node.get(n) {
                Some(Some(_)) => None,
                Some(None) => {
                    let pod = live
                        .pods
                        .iter()
                        .find(|p| str_at(p, &["spec", "nodeName"]) == Some(n));
                    Some(pod.map_or_else(|| n.clone(), pod_problem))
                }
                None => Some(format!("node {n}: no {} pod", live.name)),
            })
            .collect();
        if missing.is_empty() {
            report.pass(format!(
                "{} ready on every node ({}/{})",
                live.name,
                nodes.len(),
                nodes.len()
            ));
        } else {
            report.fail(
                format!("{} not ready on {} of {} nodes: {}", live.name, missing.len(), nodes.len(), missing.join("; ")),
                format!("a node without a pod: check its taints against the DaemonSet's tolerations; a pod not ready: kubectl -n {ns} logs <pod>"),
            );
        }
    }
    Ok(true)
}
