//! `meshctl uninstall`: annotate the node agents' DaemonSet `mesh-cni` with
//! `mesh.dev/uninstall: "true"` (a merge patch of its metadata: its pods do not roll); every
//! node agent watches exactly that DaemonSet, then removes its CNI entry and every pod's capture
//! and annotates its own pod `mesh.dev/uninstalled: "true"`; once every agent has, delete what
//! install created (reverse apply order; cluster-scoped objects only if ours; CRDs only with
//! `--crds` and only ours — never Istio's). The trigger is on the DaemonSet, not an object of
//! its own, because it strips capture on every node: only who may patch the agent's DaemonSet
//! (and so could replace the agent anyway) can start it. Agents that do not answer by the
//! deadline are named with their nodes and nothing is deleted (deleting the agents would leave
//! those nodes' pods captured with no ztunnel), unless `--force`. Owns the sequence and its
//! report.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::str_at;
use crate::cluster::{Cluster, ClusterError, path};
use crate::manifests::{Manifests, api_version, is_crd, is_ours, kind};
use crate::readiness::selector;

/// On the agents' DaemonSet: `"true"` asks every node agent to remove capture.
pub const UNINSTALL_ANNOTATION: &str = "mesh.dev/uninstall";
/// What meshctl before the DaemonSet trigger created instead; deleted if a cluster still has it.
pub const OLD_UNINSTALL_CONFIGMAP: &str = "mesh-uninstall";
pub const UNINSTALLED_ANNOTATION: &str = "mesh.dev/uninstalled";
/// The node agents' DaemonSet in the manifests.
pub const AGENT: &str = "mesh-cni";

const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(
        "{} node agent(s) did not confirm removing capture within {waited:?}: {}; nothing was deleted. Fix those nodes (or their mesh-cni pods) and run `meshctl uninstall` again, or pass --force and run `ztunnel cleanup --node` on them",
        .missing.len(), .missing.join("; ")
    )]
    AgentsSilent {
        waited: Duration,
        missing: Vec<String>,
    },
    #[error("{0} object(s) could not be deleted (errors above)")]
    Incomplete(usize),
}

pub fn run(
    cluster: &Cluster,
    m: &Manifests,
    crds: bool,
    timeout: Duration,
    force: bool,
) -> Result<(), UninstallError> {
    let ns = m.namespace.as_str();
    let installed = cluster.get("v1", "Namespace", None, ns)?.is_some();
    if installed {
        signal_agents(cluster, m, timeout, force)?;
    } else {
        println!("namespace {ns} does not exist: no agents to wait for");
    }
    let mut failed = 0;
    let mut deleted = Vec::new();
    if installed {
        // An older meshctl's trigger: nothing reads it now, so it goes whatever it says.
        let cm = ("v1", "ConfigMap", Some(ns), OLD_UNINSTALL_CONFIGMAP);
        if cluster.delete(cm.0, cm.1, cm.2, cm.3)? {
            deleted.push((cm.0.into(), cm.1.into(), Some(ns.to_string()), cm.3.into()));
        }
    }
    // Reverse apply order: workloads before what they use, the namespace near last.
    for obj in m.objects.iter().rev() {
        if is_crd(obj) && !crds {
            continue;
        }
        let (av, k, name) = (api_version(obj), kind(obj), name(obj));
        let in_ns = match cluster.namespaced(av, k) {
            Ok(Some(false)) => None,
            _ => str_at(obj, &["metadata", "namespace"]),
        };
        let what = format!("{k} {}", path(in_ns, name));
        if in_ns.is_none() {
            // Cluster-scoped: delete only what is ours (Istio may own a CRD or GatewayClass
            // of the same name).
            match cluster.get(av, k, None, name) {
                Ok(Some(live)) if !is_ours(&live, obj) => {
                    println!("{what}: not ours, left as it is");
                    continue;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    println!("{what}: not found");
                    continue;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    failed += 1;
                    continue;
                }
            }
        }
        match cluster.delete(av, k, in_ns, name) {
            Ok(true) => {
                println!("{what}: deleted");
                deleted.push((
                    av.to_string(),
                    k.to_string(),
                    in_ns.map(str::to_string),
                    name.to_string(),
                ));
            }
            Ok(false) => println!("{what}: not found"),
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    if installed {
        wait_gone(cluster, &deleted, Instant::now() + timeout);
    }
    remaining_waypoints(cluster)?;
    match failed {
        0 => {
            println!("uninstalled");
            Ok(())
        }
        n => Err(UninstallError::Incomplete(n)),
    }
}

fn name(o: &Value) -> &str {
    str_at(o, &["metadata", "name"]).unwrap_or("")
}

/// Annotates the agents' DaemonSet and waits for every agent pod's annotation.
fn signal_agents(
    cluster: &Cluster,
    m: &Manifests,
    timeout: Duration,
    force: bool,
) -> Result<(), UninstallError> {
    let ns = m.namespace.as_str();
    let agent = m
        .workloads()
        .find(|w| kind(w) == "DaemonSet" && name(w) == AGENT);
    let av = agent.map_or("apps/v1", api_version);
    let none = || println!("no {AGENT} DaemonSet: no agents to wait for");
    let Some(live) = cluster.get(av, "DaemonSet", Some(ns), AGENT)? else {
        none();
        return Ok(());
    };
    let patch = json!({"metadata": {"annotations": {UNINSTALL_ANNOTATION: "true"}}});
    match cluster.merge_patch(av, "DaemonSet", Some(ns), AGENT, &patch) {
        Ok(_) => println!(
            "DaemonSet {ns}/{AGENT} annotated {UNINSTALL_ANNOTATION}=true: node agents are removing capture"
        ),
        // Deleted since it was read.
        Err(e) if e.is_not_found() => {
            none();
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    let Some(sel) = selector(&live).or_else(|| agent.and_then(selector)) else {
        none();
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    loop {
        let pods = cluster.list("v1", "Pod", Some(ns), Some(&sel))?;
        let silent: Vec<String> = pods
            .iter()
            .filter(|p| {
                p.pointer("/metadata/annotations")
                    .and_then(|a| a.get(UNINSTALLED_ANNOTATION))
                    .and_then(Value::as_str)
                    != Some("true")
            })
            .map(|p| {
                let node = str_at(p, &["spec", "nodeName"]).unwrap_or("unscheduled");
                format!("node {node} (pod {})", name(p))
            })
            .collect();
        if silent.is_empty() {
            println!("every node agent removed capture ({} node(s))", pods.len());
            return Ok(());
        }
        if Instant::now() >= deadline {
            let err = UninstallError::AgentsSilent {
                waited: timeout,
                missing: silent,
            };
            if force {
                eprintln!("warning (--force, deleting anyway): {err}");
                return Ok(());
            }
            return Err(err);
        }
        std::thread::sleep(POLL);
    }
}

/// Waits (until the deadline) for deleted objects to be gone; what remains is reported, not an
/// error (a namespace's finalizers may take a while).
fn wait_gone(
    cluster: &Cluster,
    deleted: &[(String, String, Option<String>, String)],
    deadline: Instant,
) {
    loop {
        let left: Vec<String> = deleted
            .iter()
            .filter(|(av, k, ns, n)| !matches!(cluster.get(av, k, ns.as_deref(), n), Ok(None)))
            .map(|(_, k, ns, n)| format!("{k} {}", path(ns.as_deref(), n)))
            .collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            println!("! still terminating: {}", left.join(", "));
            return;
        }
        std::thread::sleep(POLL);
    }
}

/// Waypoints are the users' objects: left, and said so.
fn remaining_waypoints(cluster: &Cluster) -> Result<(), ClusterError> {
    let gws = cluster.list("gateway.networking.k8s.io/v1", "Gateway", None, None)?;
    let left: Vec<String> = gws
        .iter()
        .filter(|g| {
            str_at(g, &["spec", "gatewayClassName"]) == Some(crate::waypoint::WAYPOINT_CLASS)
        })
        .map(|g| path(str_at(g, &["metadata", "namespace"]), name(g)))
        .collect();
    if !left.is_empty() {
        println!(
            "! waypoints left (your objects; nothing serves them now): {} — remove with `meshctl waypoint delete -n NAMESPACE NAME`",
            left.join(", ")
        );
    }
    Ok(())
}
