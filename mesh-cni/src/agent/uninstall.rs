//! Uninstall, on request (the annotation `mesh.dev/uninstall: "true"` on the agent's own
//! DaemonSet — only who may patch that DaemonSet, and so could replace the agent anyway, can
//! strip every node's capture; or the file `<state dir>/uninstall` in local mode, which only
//! the node's root can write): take our entry out of the CNI chain, del every pod
//! (waiting for ztunnel's acks), remove the probe SNAT table, then say so (Kube: annotate the
//! agent's own pod `mesh.dev/uninstalled: "true"`; local: the file `<state dir>/uninstalled`),
//! which `meshctl uninstall` waits for on every node. Idempotent: a restarted agent that sees
//! the request does it again and enrolls nothing. Owns this sequence only.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Agent;
use super::view::View;

/// Local mode's trigger, in the state dir.
pub const UNINSTALL_FILE: &str = "uninstall";
/// Local mode's "done" marker, in the state dir.
pub const UNINSTALLED_FILE: &str = "uninstalled";
/// Set on the agent's own pod when done (Kube).
pub const UNINSTALLED_ANNOTATION: &str = "mesh.dev/uninstalled";
/// How often the trigger is looked for.
const POLL: Duration = Duration::from_secs(1);

/// Waits for the trigger (Kube: the DaemonSet watch's changes; local: polls the file); runs
/// the uninstall once.
pub async fn watch(agent: Arc<Agent>) {
    let mut changes = match &agent.view {
        View::Kube(k) => Some(k.trigger_changes()),
        View::Directory(_) => None,
    };
    while !agent.uninstalling() {
        match &mut changes {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    // The watch task ended (the runtime is stopping): nothing more to wait for.
                    return;
                }
            }
            None => tokio::time::sleep(POLL).await,
        }
        if agent.view.uninstall_requested(&agent.args.state_dir).await {
            run(&agent).await;
        }
    }
}

pub async fn run(agent: &Arc<Agent>) {
    if agent.uninstalling.swap(true, Ordering::SeqCst) {
        return;
    }
    tracing::info!("uninstall requested: removing the mesh from this node");
    // The install sidecar's --pause-file: it stops putting the entry back (local mode's
    // trigger is the same file, already there).
    let pause = agent.args.state_dir.join(UNINSTALL_FILE);
    if let Err(e) =
        std::fs::create_dir_all(&agent.args.state_dir).and_then(|()| std::fs::write(&pause, b""))
    {
        tracing::error!(file = %pause.display(), error = %e, "writing the installer's pause file");
    }
    remove_cni_entry(agent);
    let removed = {
        let mut state = agent.state.lock().await;
        let mut removed = Vec::new();
        for uid in state.uids() {
            removed.extend(state.del(&uid).await);
        }
        removed
    };
    // Out of the mesh: the pods no longer say they are captured (as Istio's agent does).
    for pod in &removed {
        let key = meshcore::enrollment::REDIRECTION_ANNOTATION;
        agent
            .view
            .annotate(&pod.info.namespace, &pod.info.name, key, None)
            .await;
    }
    // Again: an installer pass that began before the pause file existed may have put it back.
    remove_cni_entry(agent);
    if let Some(snat) = &agent.snat
        && let Err(e) = snat.remove_all()
    {
        tracing::error!(error = %e, "removing the probe SNAT table");
    }
    match &agent.view {
        View::Kube(_) => match &agent.args.pod_name {
            Some(name) => {
                agent
                    .view
                    .annotate(
                        &agent.args.mesh_namespace,
                        name,
                        UNINSTALLED_ANNOTATION,
                        Some("true"),
                    )
                    .await
            }
            None => tracing::warn!("no --pod-name/POD_NAME: cannot report the uninstall as done"),
        },
        View::Directory(_) => {
            let marker = agent.args.state_dir.join(UNINSTALLED_FILE);
            if let Err(e) = std::fs::write(&marker, b"") {
                tracing::error!(file = %marker.display(), error = %e, "writing the uninstall marker");
            }
        }
    }
    tracing::info!("uninstall done on this node");
}

/// At start without a request: a pause file left by an earlier uninstall (the state dir is a
/// host path that outlives the agent's pods) would keep a re-installed mesh's installer from
/// ever chaining our plugin, so every new pod would start uncaptured.
pub fn clear_stale_pause(agent: &Agent) {
    let pause = agent.args.state_dir.join(UNINSTALL_FILE);
    match std::fs::remove_file(&pause) {
        Ok(()) => {
            tracing::info!(file = %pause.display(), "removed an earlier uninstall's pause file: the installer chains mesh-cni again")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(file = %pause.display(), error = %e, "removing an earlier uninstall's pause file; the installer stays paused until it is gone")
        }
    }
}

fn remove_cni_entry(agent: &Agent) {
    if let Some(dir) = &agent.args.cni_conf_dir
        && let Err(e) = crate::install::remove(dir)
    {
        tracing::error!(error = %e, "removing mesh-cni from the CNI chain");
    }
}
