//! Enrollment sources: which pods of this node ztunnel serves. One seam, two sources
//! (`--enrollment`):
//! - `config`: meshd's config — a local pod that is `captured` and names its network namespace
//!   (local mode's `mesh.local/netns` annotation) is enrolled; one that leaves (label removed,
//!   deleted) is unenrolled. Reconciled on every config change and on a timer.
//! - `zds`: the CNI node agent hands each pod's namespace over ZDS ([`crate::zds_client`],
//!   [`crate::zds_pods`]); the config only adds labels and annotations.
//!
//! Either way one pod's setup is [`crate::enroll`]'s. On shutdown the listeners close; capture
//! stays in place (pods fail closed until a ztunnel adopts them) unless told to unenroll
//! everything ([`OnExit`]). Certificates are prefetched as soon as a pod appears. Owns the
//! decision of which pods are enrolled; nothing inside a pod.
//!
//! Enrollment work runs off the runtime's workers ([`off_workers`]): it blocks on the kernel and
//! on subprocesses, and the proxy may have a single worker thread.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshcore::proto::config::Workload;
use tokio::sync::watch;
use tracing::{error, info};

use crate::enroll::{self, Enrolled};
use crate::pod_netns::{NetnsId, open_pod_netns};
use crate::proxy::Ctx;

pub use crate::exclusions::{
    EXCLUDE_INBOUND_ANNOTATION, EXCLUDE_OUTBOUND_ANNOTATION, ExclusionError, exclusions_from,
};
pub use crate::pod_netns::{NetnsRefused, POD_NETNS_DIRS};

/// What a stopping ztunnel does to the pods it enrolled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    /// A restart (the default, and what a DaemonSet rollout is): capture stays, so a pod's
    /// connections fail until the next ztunnel adopts it, and none leaves unencrypted.
    KeepCapture,
    /// Removing ztunnel from the node: every pod goes back to direct, plaintext traffic.
    Unenroll,
}

/// `--enrollment`: where ztunnel learns which pods to serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EnrollmentSource {
    /// meshd's config: captured workloads naming their netns (local mode's annotation).
    Config,
    /// The CNI node agent, over ZDS (`--zds-socket`): each pod's netns handed over as an fd.
    Zds,
}

impl std::fmt::Display for EnrollmentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EnrollmentSource::Config => "config",
            EnrollmentSource::Zds => "zds",
        })
    }
}

/// The running source, as readiness and the config dump see it.
pub enum SourceStatus {
    Config,
    Zds(crate::zds_client::ZdsStatus),
}

impl SourceStatus {
    pub fn zds(socket: PathBuf) -> SourceStatus {
        SourceStatus::Zds(crate::zds_client::ZdsStatus::new(socket))
    }
}

/// Runs until `shutdown` flips to true, then closes every pod's listeners and, with
/// [`OnExit::Unenroll`], removes its capture. The source is `ctx.enrollment`'s.
pub async fn run(
    ctx: Arc<Ctx>,
    shutdown: watch::Receiver<bool>,
    on_exit: OnExit,
    trust_domain: String,
) {
    match &ctx.enrollment {
        SourceStatus::Config => run_config(ctx, shutdown, on_exit).await,
        SourceStatus::Zds(_) => {
            crate::zds_client::run(ctx.clone(), shutdown, on_exit, trust_domain).await
        }
    }
}

async fn run_config(ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>, on_exit: OnExit) {
    let mut config = ctx.config.clone();
    let mut enrolled: HashMap<String, Enrolled> = HashMap::new();
    // Also retry on a timer: a pod whose netns could not be entered yet gets another chance.
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut swept = false;
    loop {
        enrolled = off_workers({
            let ctx = ctx.clone();
            move || {
                reconcile(&ctx, &mut enrolled);
                enrolled
            }
        })
        .await;
        // Once the first config is applied, whatever an earlier run left enrolled and we did
        // not enroll again belongs to pods that are gone or left the mesh.
        if !swept && ctx.config.borrow().is_some() {
            ctx.capture.sweep();
            swept = true;
        }
        tokio::select! {
            r = config.changed() => if r.is_err() { break },
            _ = tick.tick() => {},
            _ = shutdown.changed() => break,
        }
    }
    for (uid, e) in enrolled.drain() {
        match on_exit {
            OnExit::Unenroll => enroll::stop(&ctx, &uid, e),
            OnExit::KeepCapture => enroll::close(&uid, e),
        }
    }
}

/// Runs enrollment work (`f`) on a blocking thread and returns its result; a panic in it
/// panics the caller, as if it had run inline.
///
/// Enrolling a pod blocks: an eBPF load parses the kernel's BTF (5 MB, ~25 ms here) and waits
/// for the verifier, nftables mode runs `nft`, and there are sysctls and `setns`. On a runtime
/// worker that would stall every connection the worker serves: all of the node's, with one
/// worker thread.
pub async fn off_workers<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only a runtime shutting down cancels a blocking task; the caller is going too.
            Err(e) => panic!("enrollment task did not run: {e}"),
        },
    }
}

fn wanted(ctx: &Ctx) -> HashMap<String, Arc<Workload>> {
    let Some(store) = ctx.config.borrow().clone() else {
        return HashMap::new();
    };
    store
        .local_workloads(&ctx.node)
        .filter(|w| w.captured && !w.netns.is_empty() && !w.ips.is_empty())
        .map(|w| (w.uid.clone(), w.clone()))
        .collect()
}

fn reconcile(ctx: &Arc<Ctx>, enrolled: &mut HashMap<String, Enrolled>) {
    let want = wanted(ctx);
    let identities: HashSet<_> = want
        .values()
        .map(|w| meshcore::store::workload_identity(w))
        .collect();
    for id in &identities {
        ctx.certs.prefetch(id);
    }
    let stale: Vec<String> = enrolled
        .iter()
        .filter(|(uid, e)| want.get(*uid).is_none_or(|w| !same_pod(w, &e.pod.workload)))
        .map(|(uid, _)| uid.clone())
        .collect();
    for uid in stale {
        if let Some(e) = enrolled.remove(&uid) {
            enroll::stop(ctx, &uid, e);
        }
    }
    let mut enrolled_one = false;
    for (uid, w) in want {
        if let Some(e) = enrolled.get_mut(&uid) {
            enroll::update_exclusions(ctx, &uid, e, &w);
            continue;
        }
        let taken: Vec<NetnsId> = enrolled.values().filter_map(|e| e.netns_id).collect();
        let started = open_pod_netns(&w.netns, &taken)
            .map_err(anyhow::Error::from)
            .and_then(|netns| enroll::start(ctx, w, netns));
        match started {
            Ok(e) => {
                enrolled_one = true;
                enroll::register(ctx, &uid, &e, serde_json::json!({}));
                info!(pod = %uid, identity = %e.pod.identity, netns = %e.pod.netns.path().display(), capture = %ctx.capture.mode(), "pod enrolled");
                enrolled.insert(uid, e);
            }
            Err(err) => error!(pod = %uid, error = %err, "pod enrollment failed; will retry"),
        }
    }
    ctx.certs.retain(&identities);
    prune_metrics(ctx);
    if enrolled_one {
        // An eBPF load's BTF parse just freed ~20 MB; give it back now, not at the next trim.
        dataplane::memory::trim();
    }
}

/// Drops the metric series of workloads the config no longer has (pods churn; series must not
/// pile up).
pub fn prune_metrics(ctx: &Ctx) {
    let Some(store) = ctx.config.borrow().clone() else {
        return;
    };
    let workloads: HashSet<(&str, &str)> = store
        .workloads()
        .map(|w| (w.namespace.as_str(), w.name.as_str()))
        .collect();
    let pruned = ctx
        .metrics
        .prune(|ns, name| workloads.contains(&(ns, name)));
    if pruned > 0 {
        tracing::debug!(
            series = pruned,
            "pruned metric series of workloads that are gone"
        );
    }
}

/// Whether a config change leaves the pod's proxy valid as it is.
fn same_pod(a: &Workload, b: &Workload) -> bool {
    a.ips == b.ips
        && a.netns == b.netns
        && a.service_account == b.service_account
        && a.namespace == b.namespace
        && a.trust_domain == b.trust_domain
}
