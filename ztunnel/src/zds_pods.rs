//! The pods the CNI node agent handed over (ZDS), as a state machine fed one [`Request`] at a
//! time: each answer is the ack the agent gets. Add = adopt the netns fd, read the pod's
//! addresses there, enroll ([`crate::enroll`]) and only then answer Ok; anything that fails
//! answers the error and leaves nothing behind. Keep and SnapshotSent reconcile after a
//! (re)connect: pods neither added nor kept in the session's snapshot are unenrolled. A lost
//! connection changes nothing here (capture stays).
//!
//! Identity comes from the agent's WorkloadInfo; meshd's config (matched by namespace/name,
//! meshd's workload uid) only adds labels and annotations, applied when they arrive. Owns the
//! uid → enrolled pod map; not the socket ([`crate::zds_client`]).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use dataplane::zds::Request;
use dataplane::zds::proto::WorkloadInfo;
use meshcore::proto::config::Workload;
use meshcore::store::workload_identity;
use tracing::{error, info, warn};

use crate::enroll::{self, Enrolled};
use crate::pod_netns::{NetnsId, adopt_pod_netns, netns_ips};
use crate::pods::OnExit;
use crate::proxy::Ctx;

struct ZdsPod {
    info: WorkloadInfo,
    e: Enrolled,
    /// Whether meshd's config knew the pod when its view was last built.
    in_config: bool,
}

pub struct ZdsPods {
    ctx: Arc<Ctx>,
    /// `--trust-domain`: identities' trust domain until the config names one.
    trust_domain: String,
    pods: HashMap<String, ZdsPod>,
    /// The uids added or kept in this session's snapshot; `None` once it is sent.
    snapshot: Option<HashSet<String>>,
    swept: bool,
}

impl ZdsPods {
    pub fn new(ctx: Arc<Ctx>, trust_domain: String) -> ZdsPods {
        ZdsPods {
            ctx,
            trust_domain,
            pods: HashMap::new(),
            snapshot: None,
            swept: false,
        }
    }

    /// A new agent connection: its snapshot starts.
    pub fn new_session(&mut self) {
        self.snapshot = Some(HashSet::new());
    }

    /// Applies one request; the result is the ack.
    pub fn handle(&mut self, req: Request) -> Result<(), String> {
        let r = match req {
            Request::Add { uid, info, netns } => self.add(&uid, info, netns),
            Request::Keep { uid } => self.keep(&uid),
            Request::Del { uid } => {
                self.del(&uid);
                Ok(())
            }
            Request::SnapshotSent => self.snapshot_sent(),
        };
        self.retain_certs();
        r
    }

    fn add(
        &mut self,
        uid: &str,
        info: Option<WorkloadInfo>,
        fd: std::os::fd::OwnedFd,
    ) -> Result<(), String> {
        check_uid(uid)?;
        let info = info.ok_or_else(|| format!("add for pod {uid} without workload_info"))?;
        check_info(&info)?;
        if let Some(s) = &mut self.snapshot {
            s.insert(uid.to_string());
        }
        let taken: Vec<NetnsId> = self
            .pods
            .iter()
            .filter(|(u, _)| u.as_str() != uid)
            .filter_map(|(_, p)| p.e.netns_id)
            .collect();
        let what = format!("pod {}/{} (uid {uid})", info.namespace, info.name);
        let netns = adopt_pod_netns(fd, &what, &taken).map_err(|e| e.to_string())?;
        let id = crate::pod_netns::netns_id(&netns);
        if let Some(p) = self.pods.get(uid) {
            if id.is_some() && p.e.netns_id == id {
                return Ok(());
            }
            info!(pod = %uid, "pod's sandbox was re-created (new netns); replacing its enrollment");
            // Not `del`: the pod stays in this session's snapshot.
            self.unenroll(uid);
        }
        let ips = netns_ips(&netns).map_err(|e| format!("reading the addresses of {what}: {e}"))?;
        if ips.is_empty() {
            return Err(format!(
                "{what} has no address on any interface but loopback (is the primary CNI done?)"
            ));
        }
        let w = Arc::new(self.workload_for(&info, &ips));
        let in_config = self.config_workload(&info).is_some();
        self.ctx.certs.prefetch(&workload_identity(&w));
        let e =
            enroll::start(&self.ctx, w, netns).map_err(|e| format!("enrolling {what}: {e:#}"))?;
        info!(pod = %uid, workload = %e.pod.workload.uid, identity = %e.pod.identity, ips = ?e.pod.workload.ips,
            capture = %self.ctx.capture.mode(), in_config, "pod enrolled (ZDS)");
        let p = ZdsPod { info, e, in_config };
        self.register(uid, &p);
        self.pods.insert(uid.to_string(), p);
        Ok(())
    }

    fn keep(&mut self, uid: &str) -> Result<(), String> {
        let Some(s) = &mut self.snapshot else {
            return Err(format!("keep for {uid} after snapshot_sent"));
        };
        if !self.pods.contains_key(uid) {
            return Err(format!(
                "keep for pod {uid}, which this ztunnel does not serve (send add with its netns)"
            ));
        }
        s.insert(uid.to_string());
        Ok(())
    }

    fn del(&mut self, uid: &str) {
        if let Some(s) = &mut self.snapshot {
            s.remove(uid);
        }
        self.unenroll(uid);
    }

    fn unenroll(&mut self, uid: &str) {
        if let Some(p) = self.pods.remove(uid) {
            enroll::stop(&self.ctx, uid, p.e);
        }
    }

    fn snapshot_sent(&mut self) -> Result<(), String> {
        let Some(seen) = self.snapshot.take() else {
            return Err("snapshot_sent twice in one session".to_string());
        };
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|u| !seen.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            info!(pod = %uid, "not in the agent's snapshot; unenrolling");
            self.del(&uid);
        }
        // Whatever an earlier run left enrolled and this one did not adopt is gone.
        if !self.swept {
            self.ctx.capture.sweep();
            self.swept = true;
        }
        Ok(())
    }

    /// The config changed (or a retry is due): labels, annotations and the trust domain it
    /// supplies reach each pod.
    pub fn on_config(&mut self) {
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            let Some(p) = self.pods.get(&uid) else {
                continue;
            };
            // Sorted as at add (`netns_ips`): a set's order would differ from the enrolled
            // workload's and redo the pod's listeners at every config update.
            let mut ips: Vec<IpAddr> = p.e.pod.ips.iter().copied().collect();
            ips.sort();
            let want = self.workload_for(&p.info, &ips);
            let in_config = self.config_workload(&p.info).is_some();
            let Some(p) = self.pods.get_mut(&uid) else {
                continue;
            };
            if same_but_annotations(&want, &p.e.pod.workload) {
                enroll::update_exclusions(&self.ctx, &uid, &mut p.e, &want);
                continue;
            }
            self.ctx.certs.prefetch(&workload_identity(&want));
            match enroll::refresh(&self.ctx, &mut p.e, Arc::new(want)) {
                Ok(()) => {
                    p.in_config = in_config;
                    info!(pod = %uid, identity = %p.e.pod.identity, in_config, "pod's labels or identity updated from the config");
                    let p = &self.pods[&uid];
                    self.register(&uid, p);
                }
                Err(e) => {
                    error!(pod = %uid, error = %format!("{e:#}"), "updating the pod from the config failed; will retry")
                }
            }
        }
        self.retain_certs();
    }

    /// Stops serving: listeners close; capture stays unless ztunnel leaves the node.
    pub fn shutdown(&mut self, on_exit: OnExit) {
        for (uid, p) in self.pods.drain() {
            match on_exit {
                OnExit::Unenroll => enroll::stop(&self.ctx, &uid, p.e),
                OnExit::KeepCapture => enroll::close(&uid, p.e),
            }
        }
    }

    /// The uids of the pods served.
    pub fn uids(&self) -> Vec<String> {
        let mut u: Vec<String> = self.pods.keys().cloned().collect();
        u.sort();
        u
    }

    fn register(&self, uid: &str, p: &ZdsPod) {
        enroll::register(
            &self.ctx,
            uid,
            &p.e,
            serde_json::json!({"podUid": uid, "source": "zds", "inConfig": p.in_config}),
        );
    }

    fn retain_certs(&self) {
        let ids: HashSet<_> = self
            .pods
            .values()
            .map(|p| (*p.e.pod.identity).clone())
            .collect();
        self.ctx.certs.retain(&ids);
    }

    fn config_workload(&self, info: &WorkloadInfo) -> Option<Arc<Workload>> {
        let store = self.ctx.config.borrow().clone()?;
        store
            .workload(&format!("{}/{}", info.namespace, info.name))
            .cloned()
    }

    /// The pod as its listeners see it: who it is from the agent, where from its netns, labels
    /// and annotations from the config when it has the pod. `captured`/`netns` of the config
    /// play no part.
    fn workload_for(&self, info: &WorkloadInfo, ips: &[IpAddr]) -> Workload {
        let store = self.ctx.config.borrow().clone();
        let config = self.config_workload(info);
        let trust_domain = config
            .as_ref()
            .map(|w| w.trust_domain.clone())
            .filter(|t| !t.is_empty())
            .or_else(|| {
                store
                    .as_ref()
                    .and_then(|s| s.trust_bundle())
                    .map(|t| t.trust_domain.clone())
                    .filter(|t| !t.is_empty())
            })
            .unwrap_or_else(|| self.trust_domain.clone());
        let (labels, annotations, workload_name) = match &config {
            Some(w) => (
                w.labels.clone(),
                w.annotations.clone(),
                w.workload_name.clone(),
            ),
            None => Default::default(),
        };
        Workload {
            uid: format!("{}/{}", info.namespace, info.name),
            name: info.name.clone(),
            namespace: info.namespace.clone(),
            service_account: info.service_account.clone(),
            node: self.ctx.node.clone(),
            ips: ips.iter().map(IpAddr::to_string).collect(),
            labels,
            captured: true,
            netns: String::new(),
            trust_domain,
            annotations,
            waypoint: None,
            workload_name,
        }
    }
}

fn same_but_annotations(a: &Workload, b: &Workload) -> bool {
    let strip = |w: &Workload| Workload {
        annotations: Default::default(),
        ..w.clone()
    };
    strip(a) == strip(b)
}

/// A Kubernetes pod UID: printable, bounded (it keys our map and our logs).
fn check_uid(uid: &str) -> Result<(), String> {
    if uid.is_empty() || uid.len() > 128 || uid.chars().any(|c| c.is_control() || c == '/') {
        return Err(format!("pod uid {uid:?} is not a Kubernetes UID"));
    }
    Ok(())
}

/// Namespace, name and service account become the pod's identity and its workload uid: each
/// must be a Kubernetes name (DNS subdomain characters, at most 253).
fn check_info(info: &WorkloadInfo) -> Result<(), String> {
    for (field, v) in [
        ("namespace", &info.namespace),
        ("name", &info.name),
        ("service_account", &info.service_account),
    ] {
        let ok = !v.is_empty()
            && v.len() <= 253
            && v.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !ok {
            warn!(field, value = %v.escape_debug(), "ZDS workload_info refused");
            return Err(format!(
                "workload_info.{field} {v:?} is not a Kubernetes name (lowercase letters, digits, '-', '.')"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ns: &str, name: &str, sa: &str) -> WorkloadInfo {
        WorkloadInfo {
            namespace: ns.into(),
            name: name.into(),
            service_account: sa.into(),
        }
    }

    #[test]
    fn hostile_workload_info_and_uids_are_refused() {
        assert!(check_info(&info("a", "client-0", "default")).is_ok());
        for bad in [
            info("", "x", "sa"),
            info("a/b", "x", "sa"),
            info("a", "x", "sa/../admin"),
            info("a", "X", "sa"),
            info("a", "x\n", "sa"),
            info("a", &"x".repeat(254), "sa"),
        ] {
            let e = check_info(&bad).expect_err("must be refused");
            assert!(e.contains("not a Kubernetes name"), "{e}");
        }
        assert!(check_uid("0b5b2a3e-7c1d-4c55-9f3f-1b2c3d4e5f60").is_ok());
        for bad in ["", "a/b", "a\0b", &"u".repeat(129)] {
            assert!(check_uid(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_annotation_changes_leave_listeners_alone() {
        let a = Workload {
            uid: "a/x".into(),
            ..Default::default()
        };
        let mut b = a.clone();
        b.annotations.insert(
            crate::exclusions::EXCLUDE_INBOUND_ANNOTATION.into(),
            "80".into(),
        );
        assert!(same_but_annotations(&a, &b));
        b.labels.insert("app".into(), "x".into());
        assert!(!same_but_annotations(&a, &b));
    }
}
