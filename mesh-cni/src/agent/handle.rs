//! The plugin's requests: ADD (look the pod up, decide, open its netns, ZDS add to the newest
//! ztunnel and wait for the ack, then probe SNAT and the redirection annotation), DEL (ZDS del
//! to all, forget), CHECK. Every field of a [`PluginEvent`] is untrusted: the pod must be
//! found in the view, its netns must be a pod's. Owns the answers; the cache and ZDS are
//! [`super::ztunnels`]'s.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::zds::proto::WorkloadInfo;

use super::Agent;
use super::netns;
use super::view::PodFacts;
use super::ztunnels::CachedPod;
use crate::event::{AgentReply, Command, PluginEvent};

/// How long an ADD waits for the view to show the pod (the API's watch may lag the sandbox).
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(5);
const LOOKUP_RETRY: Duration = Duration::from_millis(100);

pub async fn handle(agent: &Arc<Agent>, ev: PluginEvent) -> AgentReply {
    let pod = format!("{}/{}", ev.pod_namespace, ev.pod_name);
    let reply = match ev.command {
        Command::Add => add(agent, ev).await,
        Command::Del => del(agent, ev).await,
        Command::Check => check(agent, ev).await,
    };
    tracing::debug!(%pod, ?reply, "plugin request answered");
    reply
}

fn skipped(reason: impl Into<String>) -> AgentReply {
    AgentReply::Skipped {
        reason: reason.into(),
    }
}

fn failed(error: impl Into<String>) -> AgentReply {
    AgentReply::Failed {
        error: error.into(),
    }
}

/// Namespace and name are Kubernetes names (DNS labels / subdomains): anything else is not a
/// pod, and must never reach a URL path of an API request.
fn valid_names(ev: &PluginEvent) -> bool {
    let ok = |s: &str, max: usize, dots: bool| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.')
            })
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.'])
    };
    ok(&ev.pod_namespace, 63, false) && ok(&ev.pod_name, 253, true)
}

/// The pod as the view shows it, waiting up to [`LOOKUP_DEADLINE`]; a uid the runtime passed
/// must match (else the view still shows an older pod of that name).
async fn find(agent: &Agent, ev: &PluginEvent) -> Result<(PodFacts, Option<String>), String> {
    let deadline = Instant::now() + LOOKUP_DEADLINE;
    let mut last = String::from("not found");
    loop {
        match agent.view.lookup(&ev.pod_namespace, &ev.pod_name).await {
            Ok(Some((pod, ns)))
                if ev.pod_uid.is_empty() || pod.uid.contains('/') || pod.uid == ev.pod_uid =>
            {
                return Ok((pod, ns));
            }
            Ok(Some((pod, _))) => {
                last = format!("it has UID {}, the runtime's is {}", pod.uid, ev.pod_uid)
            }
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "pod {}/{} on node {} was not found in {} within {:?} ({last})",
                ev.pod_namespace,
                ev.pod_name,
                agent.node,
                agent.view.describe(),
                LOOKUP_DEADLINE
            ));
        }
        tokio::time::sleep(LOOKUP_RETRY).await;
    }
}

/// The cache entry for `pod` (what ztunnel is told of it: uid, names, service account), by
/// ADD or by the reconciler's discovery (`container_id` None).
pub fn cached_pod(
    pod: &PodFacts,
    netns: OwnedFd,
    ips: Vec<IpAddr>,
    container_id: Option<String>,
) -> CachedPod {
    CachedPod {
        uid: pod.uid.clone(),
        info: WorkloadInfo {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
        },
        netns,
        ips,
        container_id,
    }
}

/// Why a pod is not in the mesh, or `None` if it is.
pub fn skip_reason(agent: &Agent, pod: &PodFacts, ns_label: Option<&str>) -> Option<String> {
    if agent.excluded(&pod.namespace) {
        return Some(format!(
            "namespace {} is excluded (the mesh's own)",
            pod.namespace
        ));
    }
    if meshcore::enrollment::is_ambient(ns_label, pod.mode_label.as_deref(), pod.host_network) {
        return None;
    }
    Some(if pod.host_network {
        "host-network pod".to_string()
    } else if pod.mode_label.as_deref() == Some("none") {
        "pod opted out (istio.io/dataplane-mode=none)".to_string()
    } else {
        format!(
            "namespace {} is not labelled istio.io/dataplane-mode=ambient",
            pod.namespace
        )
    })
}

async fn add(agent: &Arc<Agent>, ev: PluginEvent) -> AgentReply {
    if agent.uninstalling() {
        return skipped("the mesh is being uninstalled from this node");
    }
    if ev.pod_namespace.is_empty() || ev.pod_name.is_empty() {
        return skipped("not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME)");
    }
    if agent.excluded(&ev.pod_namespace) {
        return skipped(format!("namespace {} is excluded", ev.pod_namespace));
    }
    if !valid_names(&ev) {
        return failed("K8S_POD_NAMESPACE/K8S_POD_NAME are not Kubernetes names");
    }
    let _inflight = agent.inflight(&ev.pod_namespace, &ev.pod_name);
    let (pod, ns_label) = match find(agent, &ev).await {
        Ok(found) => found,
        Err(e) => return failed(e),
    };
    if let Some(reason) = skip_reason(agent, &pod, ns_label.as_deref()) {
        return skipped(reason);
    }
    let fd = match netns::open_checked(&ev.netns, &agent.forbidden) {
        Ok(fd) => fd,
        Err(e) => return failed(format!("CNI_NETNS: {e}")),
    };
    let ips = if ev.ips.is_empty() {
        pod.ips.clone()
    } else {
        ev.ips.clone()
    };
    let container_id = Some(ev.container_id.clone()).filter(|c| !c.is_empty());
    let cached = cached_pod(&pod, fd, ips.clone(), container_id);
    let result = {
        let mut state = agent.state.lock().await;
        let r = state.add(cached).await;
        if r.is_err() && state.get(&pod.uid).is_some() {
            // Found earlier by discovery: a failed ADD leaves nothing behind.
            state.del(&pod.uid).await;
        }
        r
    };
    if let Err(e) = result {
        tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e, "ADD failed");
        return failed(format!(
            "enrolling pod {}/{} in the mesh: {e}",
            pod.namespace, pod.name
        ));
    }
    agent.enrolled_side_effects(&pod, &ips).await;
    AgentReply::Enrolled
}

async fn del(agent: &Arc<Agent>, ev: PluginEvent) -> AgentReply {
    let mut state = agent.state.lock().await;
    let Some(uid) = state.find(&ev.pod_uid, &ev.pod_namespace, &ev.pod_name) else {
        return AgentReply::Done;
    };
    let stale = state
        .get(&uid)
        .and_then(|p| p.container_id.as_deref())
        .is_some_and(|c| !ev.container_id.is_empty() && c != ev.container_id);
    if stale {
        // DEL of an older sandbox of the same pod: the enrolled one stays.
        return AgentReply::Done;
    }
    let removed = state.del(&uid).await;
    drop(state);
    if let Some(pod) = removed {
        agent.snat_remove(&pod.ips);
    }
    AgentReply::Done
}

async fn check(agent: &Arc<Agent>, ev: PluginEvent) -> AgentReply {
    if agent.uninstalling() || !valid_names(&ev) {
        return AgentReply::Done;
    }
    if agent
        .state
        .lock()
        .await
        .find(&ev.pod_uid, &ev.pod_namespace, &ev.pod_name)
        .is_some()
    {
        return AgentReply::Done;
    }
    match find(agent, &ev).await {
        Ok((pod, ns)) if skip_reason(agent, &pod, ns.as_deref()).is_none() => failed(format!(
            "pod {}/{} is ambient but not enrolled with ztunnel on this node",
            pod.namespace, pod.name
        )),
        _ => AgentReply::Done,
    }
}
