//! Leader election with a coordination.k8s.io/v1 Lease (`meshd-leader` in meshd's namespace),
//! client-go's algorithm: take the Lease when it is free or expired, renew it every retry
//! period, and stop leading when a renewal has not succeeded within the renew deadline. Every
//! write is a compare-and-swap on the Lease's resourceVersion (a 409 means another replica
//! got there first). Expiry is judged on this replica's clock, from when it last saw the
//! record change, as client-go does: clocks of replicas need not agree.
//!
//! Owns the Lease and the "am I leader" channel. Does not write anything else; the writers
//! (`writer`, `ca_secret::publish_root`) check the channel before each write.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{KubeSettings, LEASE_NAME, LeaseTimings};

/// Runs the elector until this replica resigns ([`resign`], when meshd stops: the Lease is
/// released so another replica takes over at once). `true` while this replica leads: a writer
/// must check it before each write and stop at once when it turns false.
pub fn spawn(client: kube::Client, settings: &KubeSettings) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let stop = Arc::new(Notify::new());
    let (done_tx, done) = watch::channel(false);
    registry().push(Entry {
        leader: rx.clone(),
        stop: stop.clone(),
        done,
    });
    let elector = Elector {
        api: Api::namespaced(client, &settings.namespace),
        identity: settings.identity.clone(),
        timings: settings.lease,
        observed: None,
    };
    let watched = rx.clone();
    tokio::spawn(async move {
        elector.run(tx, stop).await;
        registry().retain(|e| !e.leader.same_channel(&watched));
        done_tx.send_replace(true);
    });
    rx
}

/// Ends the elector behind `leader` (a receiver [`spawn`] returned, or a clone): it stops
/// leading and releases the Lease. For a stopping meshd; see [`resign_and_wait`].
pub fn resign(leader: &watch::Receiver<bool>) {
    let _ = take(leader);
}

/// [`resign`], and returns once the Lease is released (or releasing it failed): a process
/// that exits right after still hands over at once.
pub async fn resign_and_wait(leader: &watch::Receiver<bool>) {
    if let Some(mut done) = take(leader) {
        let _ = done.wait_for(|d| *d).await;
    }
}

fn take(leader: &watch::Receiver<bool>) -> Option<watch::Receiver<bool>> {
    let mut reg = registry();
    let i = reg.iter().position(|e| e.leader.same_channel(leader))?;
    let e = reg.swap_remove(i);
    e.stop.notify_one();
    Some(e.done)
}

/// A running elector: its channel, how to stop it, and whether it has ended.
struct Entry {
    leader: watch::Receiver<bool>,
    stop: Arc<Notify>,
    done: watch::Receiver<bool>,
}

/// Electors that can be asked to resign, by their channel.
fn registry() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    static REG: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    REG.lock().unwrap_or_else(|p| p.into_inner())
}

struct Elector {
    api: Api<Lease>,
    identity: String,
    timings: LeaseTimings,
    /// The Lease's spec as last seen, and when (our clock) it was first seen so.
    observed: Option<(LeaseSpec, Instant)>,
}

/// What one attempt at acquiring or renewing found.
enum Attempt {
    /// We hold the Lease (just written).
    Held,
    /// Another replica holds it, unexpired.
    Taken(String),
    /// The API refused or could not be reached (or another replica won a race).
    Failed(String),
}

impl Elector {
    async fn run(mut self, tx: watch::Sender<bool>, stop: Arc<Notify>) {
        let retry = self.timings.retry_period;
        // While leading: when the renew deadline runs out, counted from the last renewal.
        let mut deadline: Option<Instant> = None;
        let mut last_taken_by: Option<String> = None;
        loop {
            if let Some(d) = deadline
                && Instant::now() >= d
            {
                // Before the Lease can expire for the others: never two leaders.
                warn!(identity = %self.identity, "could not renew the lease within {:?}; no longer leader", self.timings.renew_deadline);
                deadline = None;
                tx.send_replace(false);
            }
            // A hung request cannot outlive the renew deadline.
            let limit = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => retry.max(Duration::from_millis(200)),
            };
            let attempt = tokio::select! {
                a = tokio::time::timeout(limit, self.attempt(deadline.is_some())) => match a {
                    Ok(a) => a,
                    Err(_) => Attempt::Failed(format!("the API did not answer within {limit:?}")),
                },
                _ = stop.notified() => break,
                _ = tx.closed() => break,
            };
            match attempt {
                Attempt::Held => {
                    if deadline.is_none() {
                        info!(identity = %self.identity, lease = LEASE_NAME, "became leader");
                        tx.send_replace(true);
                    }
                    deadline = Some(Instant::now() + self.timings.renew_deadline);
                    last_taken_by = None;
                }
                Attempt::Taken(holder) => {
                    if deadline.take().is_some() {
                        warn!(identity = %self.identity, %holder, "another replica holds the lease; no longer leader");
                        tx.send_replace(false);
                    }
                    if last_taken_by.as_deref() != Some(holder.as_str()) {
                        info!(identity = %self.identity, %holder, "another replica leads");
                        last_taken_by = Some(holder);
                    }
                }
                Attempt::Failed(why) => {
                    debug!(identity = %self.identity, leading = deadline.is_some(), "lease attempt failed: {why}")
                }
            }
            // Renew (or retry) every retry period; wake at the deadline to step down on time.
            let mut wake = Instant::now() + retry;
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.notified() => break,
                _ = tx.closed() => break,
            }
        }
        if deadline.is_some() || *tx.borrow() {
            tx.send_replace(false);
            self.release().await;
        }
    }

    async fn attempt(&mut self, leading: bool) -> Attempt {
        let now = Timestamp::now();
        let duration_secs = i32::try_from(self.timings.duration.as_secs().max(1)).unwrap_or(15);
        let mut want = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(duration_secs),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..Default::default()
        };
        let current = match self.api.get_opt(LEASE_NAME).await {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(format!("reading Lease {LEASE_NAME}: {e}")),
        };
        let Some(current) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.to_string()),
                    ..Default::default()
                },
                spec: Some(want.clone()),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.observed = Some((want, Instant::now()));
                    Attempt::Held
                }
                Err(e) => Attempt::Failed(format!("creating Lease {LEASE_NAME}: {e}")),
            };
        };
        let old = current.spec.clone().unwrap_or_default();
        let seen_at = match &self.observed {
            Some((spec, at)) if *spec == old => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((old.clone(), at));
                at
            }
        };
        let holder = old.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        let valid_for = Duration::from_secs(
            u64::try_from(old.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        );
        if !holder.is_empty() && !ours && seen_at.elapsed() < valid_for {
            return Attempt::Taken(holder);
        }
        let transitions = old.lease_transitions.unwrap_or(0);
        if ours && leading {
            want.acquire_time = old.acquire_time.clone();
            want.lease_transitions = Some(transitions);
        } else {
            want.lease_transitions = Some(transitions.saturating_add(1));
        }
        let mut lease = current;
        lease.spec = Some(want.clone());
        // `lease.metadata.resourceVersion` is the one just read: a PUT with it is the CAS.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.observed = Some((want, Instant::now()));
                Attempt::Held
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Attempt::Failed("another replica wrote the Lease first".into())
            }
            Err(e) => Attempt::Failed(format!("writing Lease {LEASE_NAME}: {e}")),
        }
    }

    /// Gives the Lease up (holder cleared, as client-go's ReleaseOnCancel does), so another
    /// replica takes it at its next try instead of waiting for expiry.
    async fn release(&mut self) {
        let limit = self.timings.retry_period.max(Duration::from_secs(1));
        let result = tokio::time::timeout(limit, async {
            let mut lease = self.api.get(LEASE_NAME).await?;
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(false);
            };
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(false);
            }
            let now = Timestamp::now();
            spec.holder_identity = Some(String::new());
            spec.lease_duration_seconds = Some(1);
            spec.acquire_time = Some(MicroTime(now));
            spec.renew_time = Some(MicroTime(now));
            self.api
                .replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
                .map(|_| true)
        })
        .await;
        match result {
            Ok(Ok(true)) => info!(identity = %self.identity, "released the lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(identity = %self.identity, "could not release the lease: {e}"),
            Err(_) => {
                warn!(identity = %self.identity, "could not release the lease: the API did not answer")
            }
        }
    }
}
