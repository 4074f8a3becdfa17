//! What the leader writes to the API: each waypoint Gateway's ServiceAccount, Deployment and
//! Service (server-side apply, owner-referenced to the Gateway), the `istio-waypoint`
//! GatewayClass if absent, and status (Gateways, routes, policies) — only on change, with the
//! right observedGeneration.
//!
//! Owns the write loop: one pass per published view (bursts coalesced, at most one pass per
//! [`MIN_PASS_INTERVAL`]), only while this replica leads, failed writes retried with backoff.
//! Every write first checks the leader channel ([`Ctx::check`]): the moment leadership is
//! lost, the pass stops. Remembers what it wrote so that an unchanged view costs no request;
//! that memory is dropped on every change of leadership and every [`RESYNC`], after which the
//! objects are read again and written only where they differ. The objects themselves are
//! `writer_objects`; status is `writer_status`. Does not elect (`leader`) nor read the
//! resources meshd acts on (`source`).

#[path = "writer_objects.rs"]
mod objects;
#[path = "writer_status.rs"]
mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::KubeSettings;
use crate::translate::{MeshView, VersionedView};

/// Bursts of views within this are one pass (a rate limit on writes).
pub const MIN_PASS_INTERVAL: Duration = Duration::from_millis(200);
/// How often what was written is checked against the API again (someone may have edited or
/// deleted an object behind meshd's back).
pub const RESYNC: Duration = Duration::from_secs(300);
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Writes while `leader` is true, from every published view. Ends when the views end (meshd
/// stops), and then resigns leadership ([`super::leader::resign`]) so that another replica
/// takes over at once.
pub fn spawn(
    client: kube::Client,
    settings: &KubeSettings,
    views: watch::Receiver<Arc<VersionedView>>,
    leader: watch::Receiver<bool>,
) {
    let ctx = Ctx {
        client,
        leader,
        root_namespace: settings.root_namespace.clone(),
    };
    tokio::spawn(run(ctx, views));
}

/// What every write needs: the client, and the leader channel it checks first.
pub(crate) struct Ctx {
    client: kube::Client,
    leader: watch::Receiver<bool>,
    /// Istio's root namespace (policies there may target the waypoint GatewayClass).
    root_namespace: String,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    #[error("no longer leader")]
    NotLeader,
    #[error("{what}: {source}")]
    Api { what: String, source: kube::Error },
}

impl WriteError {
    fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> WriteError {
        let what = what.into();
        move |source| WriteError::Api { what, source }
    }
}

impl Ctx {
    /// Call right before every write.
    fn check(&self) -> Result<(), WriteError> {
        if *self.leader.borrow() {
            Ok(())
        } else {
            Err(WriteError::NotLeader)
        }
    }

    fn api(&self, ar: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        }
    }
}

/// `group/version` `kind` with its plural, as the API serves it.
pub(crate) fn resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// What was last written (or found already right), by object, as a fingerprint of what the
/// view asked for: an unchanged fingerprint means no request at all.
#[derive(Default)]
pub(crate) struct Memory {
    written: HashMap<String, String>,
    /// The GatewayClass is known to exist.
    class_present: bool,
    /// The waypoints whose objects the last orphan sweep kept (`None`: sweep due).
    swept_for: Option<Vec<String>>,
}

impl Memory {
    fn unchanged(&self, key: &str, fingerprint: &str) -> bool {
        self.written.get(key).map(String::as_str) == Some(fingerprint)
    }
    fn remember(&mut self, key: String, fingerprint: String) {
        self.written.insert(key, fingerprint);
    }
    fn forget(&mut self, key: &str) {
        self.written.remove(key);
    }
}

/// Counts of one pass, for logs and retries.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub writes: usize,
    pub failures: usize,
}

impl Tally {
    /// Records a write's outcome; `Err(NotLeader)` stops the pass.
    fn record(&mut self, r: Result<bool, WriteError>) -> Result<(), WriteError> {
        match r {
            Ok(wrote) => {
                self.writes += usize::from(wrote);
                Ok(())
            }
            Err(WriteError::NotLeader) => Err(WriteError::NotLeader),
            Err(e) => {
                warn!("{e}");
                self.failures += 1;
                Ok(())
            }
        }
    }
}

async fn run(mut ctx: Ctx, mut views: watch::Receiver<Arc<VersionedView>>) {
    let mut memory = Memory::default();
    let mut backoff: Option<Duration> = None;
    let mut resync_at = Instant::now() + RESYNC;
    loop {
        if !*ctx.leader.borrow_and_update() {
            // Whatever another leader did meanwhile is unknown: read again when leading.
            memory = Memory::default();
            tokio::select! {
                r = ctx.leader.changed() => if r.is_err() { break },
                r = views.changed() => if r.is_err() { break },
            }
            continue;
        }
        let view = views.borrow_and_update().clone();
        let tally = pass(&ctx, &mut memory, &view.view).await;
        match tally {
            Ok(t) if t.failures == 0 => {
                if t.writes > 0 {
                    info!(
                        version = view.version,
                        writes = t.writes,
                        "wrote to the API"
                    );
                }
                backoff = None;
            }
            Ok(t) => {
                let next = backoff.map_or(BACKOFF_FIRST, |b| (b * 2).min(BACKOFF_MAX));
                warn!(
                    version = view.version,
                    writes = t.writes,
                    failures = t.failures,
                    "some writes failed; retrying in {next:?}"
                );
                backoff = Some(next);
            }
            Err(_) => debug!("no longer leader: stopped writing"),
        }
        let retry = async {
            match backoff {
                Some(b) => tokio::time::sleep(b).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = views.changed() => if r.is_err() { break },
            r = ctx.leader.changed() => if r.is_err() { break },
            _ = retry => {}
            _ = tokio::time::sleep_until(resync_at) => {
                memory = Memory::default();
                resync_at = Instant::now() + RESYNC;
            }
        }
        tokio::time::sleep(MIN_PASS_INTERVAL).await;
    }
    super::leader::resign(&ctx.leader);
}

/// Brings the API in line with `view`, as far as meshd writes it.
async fn pass(ctx: &Ctx, memory: &mut Memory, view: &MeshView) -> Result<Tally, WriteError> {
    let mut tally = Tally::default();
    if !memory.class_present {
        let r = objects::ensure_gateway_class(ctx).await;
        memory.class_present = r.is_ok();
        tally.record(r)?;
    }
    for w in view.waypoints.values().filter(|w| w.accepted()) {
        for r in objects::apply_waypoint(ctx, memory, w).await {
            tally.record(r)?;
        }
    }
    let mut keep: Vec<String> = objects::kept_waypoints(view);
    keep.sort();
    if memory.swept_for.as_ref() != Some(&keep) {
        let r = objects::sweep(ctx, &keep).await;
        if r.is_ok() {
            memory.swept_for = Some(keep);
        }
        tally.record(r)?;
    }
    for r in status::write_all(ctx, memory, view).await? {
        tally.record(r)?;
    }
    Ok(tally)
}

/// Whether `live` already has everything `want` says (objects: each key; lists: same length,
/// item by item; anything else: equal). Fields the API added (defaults, status) don't count.
pub(crate) fn contains(live: &Value, want: &Value) -> bool {
    match (live, want) {
        (Value::Object(l), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| l.get(k).is_some_and(|lv| contains(lv, wv))),
        (Value::Array(l), Value::Array(w)) => {
            l.len() == w.len() && l.iter().zip(w).all(|(lv, wv)| contains(lv, wv))
        }
        _ => live == want,
    }
}

/// Now, as Kubernetes writes times.
pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    crate::status::rfc3339(secs)
}

/// A 404: the object went away meanwhile, which is no error for a writer.
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn contains_ignores_what_the_api_adds() {
        let want = json!({"spec": {"ports": [{"port": 1}], "selector": {"a": "b"}}});
        let live = json!({"spec": {"ports": [{"port": 1, "protocol": "TCP"}], "selector": {"a": "b"}, "clusterIP": "10.0.0.1"}});
        assert!(contains(&live, &want));
        let changed = json!({"spec": {"ports": [{"port": 2}], "selector": {"a": "b"}}});
        assert!(!contains(&live, &changed));
        let more = json!({"spec": {"ports": [{"port": 1}, {"port": 2}], "selector": {"a": "b"}}});
        assert!(!contains(&live, &more));
    }
}
