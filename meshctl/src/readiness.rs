//! Whether a Deployment or DaemonSet is rolled out and ready, read from the status its
//! controller writes (as `kubectl rollout status` reads it), and why a pod is not ready, in
//! words a person can act on. Pure functions on the API's JSON: owns no I/O.

use serde_json::Value;

use crate::backend::str_at;

/// A workload's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub ready: bool,
    /// e.g. "2/2 ready" or "ready 1/2, updated 2/2, available 1/2".
    pub summary: String,
}

fn int(v: &Value, path: &str) -> Option<i64> {
    v.pointer(path).and_then(Value::as_i64)
}

/// Deployment: the controller saw the current generation, and every replica is updated,
/// ready and available with no old ones left. DaemonSet: every node that should run a pod
/// runs an updated, ready, available one.
pub fn rollout(obj: &Value) -> Rollout {
    let generation = int(obj, "/metadata/generation").unwrap_or(0);
    let observed = int(obj, "/status/observedGeneration").unwrap_or(0);
    if observed < generation {
        return Rollout {
            ready: false,
            summary: format!(
                "its controller has not processed the latest spec yet (generation {generation}, observed {observed})"
            ),
        };
    }
    let status = |p: &str| int(obj, &format!("/status/{p}")).unwrap_or(0);
    let (want, updated, ready, available, total) = match obj["kind"].as_str() {
        Some("DaemonSet") => {
            let want = status("desiredNumberScheduled");
            let scheduled = status("currentNumberScheduled");
            (
                want,
                status("updatedNumberScheduled"),
                status("numberReady"),
                status("numberAvailable"),
                scheduled,
            )
        }
        _ => (
            int(obj, "/spec/replicas").unwrap_or(1),
            status("updatedReplicas"),
            status("readyReplicas"),
            status("availableReplicas"),
            status("replicas"),
        ),
    };
    let ok = updated == want && ready == want && available == want && total <= want;
    let summary = if ok {
        format!("{ready}/{want} ready")
    } else {
        let mut s =
            format!("ready {ready}/{want}, updated {updated}/{want}, available {available}/{want}");
        if total > want {
            s.push_str(&format!(", {} old pod(s) still running", total - want));
        }
        s
    };
    Rollout { ready: ok, summary }
}

/// The label selector of a workload's pods (`spec.selector.matchLabels`, `k=v,...`); None
/// when it has none meshctl can express.
pub fn selector(obj: &Value) -> Option<String> {
    let labels = obj.pointer("/spec/selector/matchLabels")?.as_object()?;
    let parts: Vec<String> = labels
        .iter()
        .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(pod: &Value) -> bool {
    condition(pod, "Ready").is_some_and(|c| c["status"] == "True")
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// Why a pod is not ready: unscheduled (and why), a container waiting (image pull, crash
/// loop) or terminated, or its readiness probe failing.
pub fn pod_problem(pod: &Value) -> String {
    let name = str_at(pod, &["metadata", "name"]).unwrap_or("?");
    let node = str_at(pod, &["spec", "nodeName"])
        .map(|n| format!(" on node {n}"))
        .unwrap_or_default();
    let phase = str_at(pod, &["status", "phase"]).unwrap_or("Unknown");
    let head = format!("pod {name}{node}: {phase}");
    if let Some(c) = condition(pod, "PodScheduled").filter(|c| c["status"] != "True") {
        let reason = c["reason"].as_str().unwrap_or("not scheduled");
        let msg = c["message"].as_str().unwrap_or("");
        return format!("{head}, {reason}: {msg}")
            .trim_end_matches([' ', ':'])
            .to_string();
    }
    let statuses = ["initContainerStatuses", "containerStatuses"]
        .iter()
        .filter_map(|k| pod.pointer(&format!("/status/{k}"))?.as_array())
        .flatten();
    for cs in statuses {
        let cname = cs["name"].as_str().unwrap_or("?");
        let restarts = cs["restartCount"].as_i64().unwrap_or(0);
        let restarted = match restarts {
            0 => String::new(),
            n => format!(" ({n} restarts)"),
        };
        if let Some(w) = cs.pointer("/state/waiting") {
            let reason = w["reason"].as_str().unwrap_or("waiting");
            let msg = w["message"]
                .as_str()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            return format!("{head}, container {cname} {reason}{msg}{restarted}");
        }
        if let Some(t) = cs.pointer("/state/terminated")
            && t["exitCode"].as_i64() != Some(0)
        {
            let reason = t["reason"].as_str().unwrap_or("terminated");
            let code = t["exitCode"].as_i64().unwrap_or(-1);
            return format!("{head}, container {cname} {reason} (exit code {code}){restarted}");
        }
        if cs["ready"] == false && cs.pointer("/state/running").is_some() {
            return format!(
                "{head}, container {cname} running but not ready (readiness probe failing){restarted}"
            );
        }
    }
    match condition(pod, "Ready") {
        Some(c) if c["status"] != "True" => {
            let reason = c["reason"].as_str().unwrap_or("not ready");
            format!("{head}, {reason}")
        }
        _ => head,
    }
}
