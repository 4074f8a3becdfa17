//! The enrolled-pod cache and the ztunnels connected over ZDS, behind one lock so that what a
//! new ztunnel's snapshot holds and what adds/dels other ztunnels saw never disagree. Adds go
//! to the NEWEST ztunnel (a rolling update's new one), dels to all. Owns the ZDS exchanges
//! (acks correlate by order, so one exchange at a time per session — the lock gives that);
//! what to enroll is the caller's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use dataplane::zds::proto::WorkloadInfo;
use dataplane::zds::{AgentSession, EXCHANGE_TIMEOUT, ZdsError};

/// One enrolled pod: kept with its netns open, so a ztunnel connecting later gets it.
pub struct CachedPod {
    pub uid: String,
    pub info: WorkloadInfo,
    pub netns: OwnedFd,
    pub ips: Vec<IpAddr>,
    /// The sandbox the CNI ADD was for (`None`: found by discovery); a DEL for another
    /// sandbox of the same pod does not remove it.
    pub container_id: Option<String>,
}

struct Ztunnel {
    id: u64,
    session: AgentSession,
}

/// Why an add did not end with an ack.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(
        "no ztunnel is connected on this node: check that the ztunnel DaemonSet's pod is running on this node and uses the agent's ZDS socket"
    )]
    NoZtunnel,
    #[error("ztunnel refused the pod: {0}")]
    Nack(String),
}

/// The cache and the sessions.
#[derive(Default)]
pub struct Enrolled {
    pods: HashMap<String, CachedPod>,
    ztunnels: Vec<Ztunnel>,
    next_id: u64,
}

/// An exchange's bound beyond the session's own (a peer that stops reading must not hold the
/// lock for ever).
fn bound() -> Duration {
    EXCHANGE_TIMEOUT + Duration::from_secs(1)
}

async fn exchange<F>(f: F) -> Result<Result<(), String>, ZdsError>
where
    F: std::future::Future<Output = Result<Result<(), String>, ZdsError>>,
{
    match tokio::time::timeout(bound(), f).await {
        Ok(r) => r,
        Err(_) => Err(ZdsError::Timeout(bound())),
    }
}

impl Enrolled {
    pub fn get(&self, uid: &str) -> Option<&CachedPod> {
        self.pods.get(uid)
    }

    /// The cached pod for a plugin event: by uid if the runtime passed one we know, else by
    /// namespace and name.
    pub fn find(&self, uid: &str, namespace: &str, name: &str) -> Option<String> {
        if !uid.is_empty() && self.pods.contains_key(uid) {
            return Some(uid.to_string());
        }
        self.pods
            .values()
            .find(|p| p.info.namespace == namespace && p.info.name == name)
            .map(|p| p.uid.clone())
    }

    pub fn uids(&self) -> Vec<String> {
        self.pods.keys().cloned().collect()
    }

    /// Sends `add` to the newest ztunnel and waits for its ack; on success the pod is cached.
    /// A ztunnel whose session broke is dropped and the next newest tried.
    pub async fn add(&mut self, pod: CachedPod) -> Result<(), AddError> {
        while let Some(zt) = self.ztunnels.last_mut() {
            let info = pod.info.clone();
            match exchange(zt.session.add(&pod.uid, info, pod.netns.as_fd())).await {
                Ok(Ok(())) => {
                    tracing::info!(uid = %pod.uid, pod = %format!("{}/{}", pod.info.namespace, pod.info.name), ztunnel = zt.id, "pod enrolled");
                    self.pods.insert(pod.uid.clone(), pod);
                    return Ok(());
                }
                Ok(Err(reason)) => return Err(AddError::Nack(reason)),
                Err(e) => {
                    tracing::warn!(ztunnel = zt.id, error = %e, "ZDS session lost");
                    self.ztunnels.pop();
                }
            }
        }
        Err(AddError::NoZtunnel)
    }

    /// Caches a pod found by discovery: added to the newest ztunnel if one is connected, else
    /// kept for the next ztunnel's snapshot.
    pub async fn add_or_keep(&mut self, pod: CachedPod) -> Result<(), AddError> {
        if self.ztunnels.is_empty() {
            self.pods.insert(pod.uid.clone(), pod);
            return Ok(());
        }
        self.add(pod).await
    }

    /// Forgets `uid` and sends `del` to every ztunnel (a nack is logged: the pod is gone for
    /// the agent either way). Returns the pod that was cached.
    pub async fn del(&mut self, uid: &str) -> Option<CachedPod> {
        let pod = self.pods.remove(uid);
        let mut broken = Vec::new();
        for zt in &mut self.ztunnels {
            match exchange(zt.session.del(uid)).await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    tracing::warn!(%uid, ztunnel = zt.id, %reason, "ztunnel refused del")
                }
                Err(e) => {
                    tracing::warn!(ztunnel = zt.id, error = %e, "ZDS session lost");
                    broken.push(zt.id);
                }
            }
        }
        self.ztunnels.retain(|z| !broken.contains(&z.id));
        if pod.is_some() {
            tracing::info!(%uid, "pod removed from the mesh");
        }
        pod
    }

    /// A newly connected ztunnel: every cached pod (add with its netns), then `snapshot_sent`;
    /// then it is the newest. A session that breaks during the snapshot is dropped.
    pub async fn attach(&mut self, mut session: AgentSession) {
        let id = self.next_id;
        self.next_id += 1;
        for pod in self.pods.values() {
            match exchange(session.add(&pod.uid, pod.info.clone(), pod.netns.as_fd())).await {
                Ok(Ok(())) => {}
                // ztunnel keeps a refused pod pending and retries it; it stays enrolled here.
                Ok(Err(reason)) => {
                    tracing::warn!(uid = %pod.uid, ztunnel = id, %reason, "ztunnel refused a snapshot pod")
                }
                Err(e) => {
                    tracing::warn!(ztunnel = id, error = %e, "ZDS session lost during the snapshot");
                    return;
                }
            }
        }
        match exchange(session.snapshot_sent()).await {
            Ok(_) => {
                tracing::info!(
                    ztunnel = id,
                    pods = self.pods.len(),
                    "ztunnel connected; snapshot sent"
                );
                self.ztunnels.push(Ztunnel { id, session });
            }
            Err(e) => tracing::warn!(ztunnel = id, error = %e, "ZDS session lost at snapshot_sent"),
        }
    }
}
