//! `meshctl install`: applies the manifests with server-side apply (field manager `meshctl`,
//! forcing conflicts: meshctl owns the fields it sets, so re-running install restores them,
//! as `istioctl install` does), then waits for the Deployments and DaemonSets to roll out.
//!
//! CRDs first, and only where the cluster has none or ours: a CRD that exists and is not ours
//! (Istio's, the Gateway API's) is skipped and said so, never overwritten. Applied CRDs are
//! waited for (Established and served) before the objects of their kinds. Owns the sequence and
//! its report; objects come from [`crate::manifests`].

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::check::post;
use crate::cluster::{Cluster, ClusterError, path};
use crate::manifests::{Manifests, api_version, is_ours, kind};
use crate::readiness::{pod_problem, pod_ready, rollout};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(
        "CRD {name} not established after {waited:?}: the API server has not accepted it ({state})"
    )]
    CrdNotEstablished {
        name: String,
        waited: Duration,
        state: String,
    },
    #[error(
        "not ready after {waited:?}:\n{details}\n(see `meshctl check`; `meshctl install` again waits again)"
    )]
    NotReady { waited: Duration, details: String },
}

/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(500);

pub fn run(
    cluster: &Cluster,
    m: &Manifests,
    dry_run: bool,
    wait: Option<Duration>,
) -> Result<(), InstallError> {
    println!(
        "installing {} into namespace {}{}",
        m.what,
        m.namespace,
        if dry_run { " (dry run)" } else { "" }
    );
    let started = Instant::now();
    let deadline = started + wait.unwrap_or(Duration::from_secs(60));
    let mut applied_crds = Vec::new();
    for crd in m.crds() {
        let name = name(crd);
        let live = cluster.get(api_version(crd), kind(crd), None, name)?;
        match &live {
            Some(l) if !is_ours(l, crd) => {
                println!(
                    "CRD {name}: exists and is not ours (Istio's or the Gateway API's?): left as it is"
                );
                continue;
            }
            _ => {}
        }
        let verb = if dry_run { "would apply" } else { "applied" };
        if !dry_run {
            cluster.apply(crd, true)?;
            applied_crds.push(name.to_string());
        }
        println!(
            "CRD {name}: {verb} ({})",
            if live.is_some() { "update" } else { "new" }
        );
    }
    for name in &applied_crds {
        established(cluster, name, deadline, started)?;
    }
    for obj in m.others() {
        let scoped = cluster.namespaced(api_version(obj), kind(obj))?;
        let ns = namespace(obj).filter(|_| scoped != Some(false));
        let what = format!("{} {}", kind(obj), path(ns, name(obj)));
        let before = served_get(cluster, obj)?;
        // A cluster-scoped object of the same name that is not ours (Istio's istio-waypoint
        // GatewayClass) is someone else's: left alone. Our namespace is ours by name.
        if let Some(b) = &before
            && kind(obj) != "Namespace"
            && scoped == Some(false)
            && !is_ours(b, obj)
        {
            println!("{what}: exists and is not ours: left as it is");
            continue;
        }
        if dry_run {
            let verb = if before.is_some() {
                "apply (update)"
            } else {
                "create"
            };
            println!("{what}: would {verb}");
            continue;
        }
        let after = cluster.apply(obj, true)?;
        let rv = |o: &Value| o.pointer("/metadata/resourceVersion").cloned();
        let done = match &before {
            None => "created",
            Some(b) if rv(b) == rv(&after) => "unchanged",
            Some(_) => "configured",
        };
        println!("{what}: {done}");
        if kind(obj) == "DaemonSet" && name(obj) == crate::uninstall::AGENT {
            withdraw_uninstall(cluster, obj, &after)?;
        }
    }
    if dry_run {
        return Ok(());
    }
    let Some(waited) = wait else {
        println!("applied; not waiting (see `meshctl check`)");
        return Ok(());
    };
    wait_ready(cluster, m, started, deadline, waited)
}

/// An install over an uninstall that did not finish (a silent node) finds the agents'
/// DaemonSet still asking for one (`meshctl uninstall`'s annotation is not a field install
/// applies): take the request back and restart the agents — one that already uninstalled stays
/// passive until it restarts, and would leave its node's new pods uncaptured.
fn withdraw_uninstall(cluster: &Cluster, obj: &Value, live: &Value) -> Result<(), ClusterError> {
    let key = crate::uninstall::UNINSTALL_ANNOTATION;
    if live
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
        .is_none()
    {
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let patch = serde_json::json!({
        "metadata": {"annotations": {key: null}},
        "spec": {"template": {"metadata": {"annotations": {"mesh.dev/restarted-at": now.to_string()}}}},
    });
    let ns = namespace(obj);
    cluster.merge_patch(api_version(obj), "DaemonSet", ns, name(obj), &patch)?;
    println!(
        "DaemonSet {}: withdrew the uninstall request an earlier `meshctl uninstall` left, and restarted its pods",
        path(ns, name(obj))
    );
    Ok(())
}

/// The live object, None when absent or its kind is not served yet (a dry run before the CRD).
fn served_get(cluster: &Cluster, obj: &Value) -> Result<Option<Value>, ClusterError> {
    cluster.get(api_version(obj), kind(obj), namespace(obj), name(obj))
}

fn name(o: &Value) -> &str {
    o.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn namespace(o: &Value) -> Option<&str> {
    o.pointer("/metadata/namespace").and_then(Value::as_str)
}

/// Waits until the CRD is Established and its kind served.
fn established(
    cluster: &Cluster,
    name: &str,
    deadline: Instant,
    started: Instant,
) -> Result<(), InstallError> {
    loop {
        let crd = cluster.get(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            name,
        )?;
        let cond = crd.as_ref().and_then(|c| {
            c.pointer("/status/conditions")?
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Established")
                .cloned()
        });
        let ok = cond.as_ref().is_some_and(|c| c["status"] == "True");
        let served = match (&crd, ok) {
            (Some(c), true) => {
                let group = c
                    .pointer("/spec/group")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let kind = c
                    .pointer("/spec/names/kind")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let version = c
                    .pointer("/spec/versions")
                    .and_then(Value::as_array)
                    .and_then(|vs| vs.iter().find(|v| v["served"] == true))
                    .and_then(|v| v["name"].as_str())
                    .unwrap_or("");
                cluster.serves(&format!("{group}/{version}"), kind)?
            }
            _ => false,
        };
        if served {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let state = match cond {
                Some(c) => format!(
                    "Established {}: {}",
                    c["status"],
                    c["message"].as_str().unwrap_or("")
                ),
                None if ok => "established but its kind is not served yet".into(),
                None => "no Established condition".into(),
            };
            return Err(InstallError::CrdNotEstablished {
                name: name.to_string(),
                waited: started.elapsed(),
                state,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// Polls the workloads until every one is rolled out, or says which are not and why.
fn wait_ready(
    cluster: &Cluster,
    m: &Manifests,
    started: Instant,
    deadline: Instant,
    waited: Duration,
) -> Result<(), InstallError> {
    println!("waiting up to {waited:?} for the components to be ready");
    loop {
        let live = post::workloads(cluster, m)?;
        let mut not_ready = Vec::new();
        for w in &live {
            let what = format!("{} {}/{}", w.kind, m.namespace, w.name);
            let Some(obj) = &w.object else {
                not_ready.push(format!("  {what}: missing"));
                continue;
            };
            let state = rollout(obj);
            if !state.ready {
                let mut line = format!("  {what}: {}", state.summary);
                let pods: Vec<String> = w
                    .pods
                    .iter()
                    .filter(|p| !pod_ready(p))
                    .take(5)
                    .map(|p| format!("\n    {}", pod_problem(p)))
                    .collect();
                if pods.is_empty() && w.pods.is_empty() {
                    line.push_str("\n    no pods yet");
                }
                line.push_str(&pods.concat());
                not_ready.push(line);
            }
        }
        if not_ready.is_empty() {
            for w in &live {
                let summary = w
                    .object
                    .as_ref()
                    .map(|o| rollout(o).summary)
                    .unwrap_or_default();
                println!("✓ {} {}/{}: {summary}", w.kind, m.namespace, w.name);
            }
            println!("installed in {:.1}s", started.elapsed().as_secs_f64());
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(InstallError::NotReady {
                waited,
                details: not_ready.join("\n"),
            });
        }
        std::thread::sleep(POLL);
    }
}
