//! Keeping the cache in line with the view without a CNI event: an enrolled pod that is gone
//! or no longer ambient is deleted; a pod of this node that is ambient but not enrolled (a
//! label flipped on, or pods found again after an agent restart) has its netns found
//! (Directory: the `mesh.local/netns` annotation; Kube: host /proc) and is added. Owns that
//! decision; never answers the plugin.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::handle::{cached_pod, skip_reason};
use super::view::{PodFacts, View};
use super::{Agent, netns};

/// A pass runs at least this often even without view changes (retries of pods whose netns
/// was not found or that ztunnel refused).
const RESYNC: Duration = Duration::from_secs(5);

/// Directory view: how long a pod must have been gone from the files before the reconciler
/// takes it out itself. Local mode's kubelet takes a leaving pod out of the files first and
/// stops it (with a CNI DEL) only once its connections have drained, which takes at most 15 s
/// (every ztunnel forgetting it, 10 s; the drain, 5 s). Taking it out at once would tear down
/// its capture and its apps' reply routes under connections still being served. A Kubernetes
/// API keeps a terminating pod until its containers stopped, so the Kube view needs no wait.
pub const DIRECTORY_GONE_GRACE: Duration = Duration::from_secs(20);

/// What the reconciler remembers between passes.
#[derive(Default)]
pub struct Reconciler {
    /// uid → ambient at the last pass (a false → true change is a label flip).
    last_ambient: HashMap<String, bool>,
    /// Pods to enroll that could not be yet (netns not found, ztunnel refused).
    pending: HashSet<String>,
    started: bool,
    /// Directory view: uid → when the pod was first seen gone from the files.
    gone_since: HashMap<String, std::time::Instant>,
}

impl Reconciler {
    /// Whether an ambient, unenrolled pod should be found and added now. Kube: any such pod
    /// with an IP (its sandbox's CNI ADD is over); Directory: at start, on a label flip, or
    /// when pending (local mode's kubelet writes the pod before its ADD, and a failed ADD
    /// must not be undone by discovery).
    fn wants(&self, view: &View, pod: &PodFacts) -> bool {
        match view {
            View::Kube(_) => !pod.ips.is_empty(),
            View::Directory(_) => {
                !self.started
                    || self.last_ambient.get(&pod.uid) == Some(&false)
                    || self.pending.contains(&pod.uid)
            }
        }
    }

    /// One pass over the view.
    pub async fn pass(&mut self, agent: &Arc<Agent>) {
        if agent.uninstalling() {
            return;
        }
        let snap = agent.view.snapshot();
        let ambient = |pod: &PodFacts| {
            let ns = snap
                .namespaces
                .get(&pod.namespace)
                .and_then(|l| l.as_deref());
            skip_reason(agent, pod, ns).is_none()
        };
        // Gone, replaced (another uid under the name) or no longer ambient: del.
        let mut gone = Vec::new();
        {
            let state = agent.state.lock().await;
            let now = std::time::Instant::now();
            let directory = matches!(agent.view, View::Directory(_));
            let mut still_gone = HashMap::new();
            for uid in state.uids() {
                let Some(cached) = state.get(&uid) else {
                    continue;
                };
                let key = (cached.info.namespace.clone(), cached.info.name.clone());
                let listed = snap.pods.get(&key).filter(|p| p.uid == uid);
                if listed.is_some_and(&ambient) {
                    continue;
                }
                if directory && listed.is_none() {
                    // Absent from the files: maybe a pod the kubelet is still draining.
                    let since = *self.gone_since.get(&uid).unwrap_or(&now);
                    still_gone.insert(uid.clone(), since);
                    if now.duration_since(since) < DIRECTORY_GONE_GRACE {
                        continue;
                    }
                }
                gone.push((uid, key));
            }
            self.gone_since = still_gone;
        }
        for (uid, (ns, name)) in gone {
            if agent.is_inflight(&ns, &name) {
                continue;
            }
            // The snapshot may lag what an ADD just read (Kube: a GET on a watch miss): ask
            // the source again before taking a pod out.
            if let Ok(Some((pod, ns_label))) = agent.view.lookup(&ns, &name).await
                && pod.uid == uid
                && skip_reason(agent, &pod, ns_label.as_deref()).is_none()
            {
                continue;
            }
            let removed = agent.state.lock().await.del(&uid).await;
            if let Some(pod) = removed {
                agent.snat_remove(&pod.ips);
                if snap.pods.contains_key(&(ns.clone(), name.clone())) {
                    let key = meshcore::enrollment::REDIRECTION_ANNOTATION;
                    agent.view.annotate(&ns, &name, key, None).await;
                }
            }
        }
        // Ambient and not enrolled: find the netns, add.
        let mut wanted = Vec::new();
        {
            let state = agent.state.lock().await;
            for pod in snap.pods.values() {
                if ambient(pod)
                    && state.get(&pod.uid).is_none()
                    && !agent.is_inflight(&pod.namespace, &pod.name)
                    && self.wants(&agent.view, pod)
                {
                    wanted.push(pod.clone());
                }
            }
        }
        let mut fds = find_netns(agent, &wanted).await;
        self.pending.clear();
        for pod in wanted {
            let Some(fd) = fds.remove(&pod.uid) else {
                tracing::debug!(pod = %format!("{}/{}", pod.namespace, pod.name), "netns not found yet");
                self.pending.insert(pod.uid.clone());
                continue;
            };
            let cached = cached_pod(&pod, fd, pod.ips.clone(), None);
            let result = agent.state.lock().await.add_or_keep(cached).await;
            match result {
                Ok(()) => agent.enrolled_side_effects(&pod, &pod.ips).await,
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e, "enrolling a discovered pod failed; will retry");
                    self.pending.insert(pod.uid.clone());
                }
            }
        }
        self.last_ambient = snap
            .pods
            .values()
            .map(|p| (p.uid.clone(), ambient(p)))
            .collect();
        self.started = true;
    }

    /// Passes on every view change and every [`RESYNC`], for ever.
    pub async fn run(mut self, agent: Arc<Agent>) {
        let mut changes = agent.view.changes();
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(RESYNC) => {}
            }
            self.pass(&agent).await;
        }
    }
}

/// Opens the netns of each pod: Directory from its annotation, Kube by one host /proc scan.
async fn find_netns(
    agent: &Arc<Agent>,
    pods: &[PodFacts],
) -> HashMap<String, std::os::fd::OwnedFd> {
    if pods.is_empty() {
        return HashMap::new();
    }
    let agent = agent.clone();
    let pods = pods.to_vec();
    let found = tokio::task::spawn_blocking(move || match &agent.view {
        View::Directory(_) => pods
            .iter()
            .filter_map(|p| {
                let path = p.netns_annotation.as_deref()?;
                match netns::open_annotated(path, &agent.forbidden) {
                    Ok(fd) => Some((p.uid.clone(), fd)),
                    Err(e) => {
                        tracing::warn!(pod = %format!("{}/{}", p.namespace, p.name), error = %e, "pod's netns annotation refused");
                        None
                    }
                }
            })
            .collect(),
        View::Kube(_) => {
            let uids: Vec<String> = pods.iter().map(|p| p.uid.clone()).collect();
            netns::find_by_uid(&agent.host_proc, &uids, &agent.forbidden)
        }
    })
    .await;
    found.unwrap_or_default()
}
