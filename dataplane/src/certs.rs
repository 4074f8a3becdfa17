//! Workload certificates: fetched from meshd's CA, cached per identity, refreshed at half-life.
//!
//! A certificate is fetched as soon as a pod with that identity appears on the node
//! ([`CertManager::prefetch`]), so it is normally ready before the pod's first connection.
//! One background task per identity keeps it fresh; failures are retried with backoff and the
//! previous certificate stays in use while it is valid. Owns keys and certificates; does not
//! decide who may use them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshcore::Identity;
use meshcore::proto::ca::CertificateRequest;
use meshcore::proto::ca::certificate_service_client::CertificateServiceClient;
use meshcore::tls::{self, WorkloadCert};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::meshd::Meshd;

/// What a certificate manager reports (a binary's metrics implement it).
pub trait CertEvents: Send + Sync {
    /// One certificate issued for `identity` (initial fetch or refresh).
    fn cert_issued(&self, identity: &str);
    /// One failed certificate fetch for `identity`.
    fn cert_fetch_failed(&self, identity: &str);
}

/// A certificate with the TLS server config built from it (built once, used per connection).
pub struct CertEntry {
    pub cert: Arc<WorkloadCert>,
    pub server_tls: Arc<rustls::ServerConfig>,
}

#[derive(Clone)]
enum CertState {
    Pending,
    Ready(Arc<CertEntry>),
    Failed {
        error: String,
        previous: Option<Arc<CertEntry>>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate for {identity} yet: {reason}")]
    Unavailable { identity: Identity, reason: String },
}

struct Slot {
    rx: watch::Receiver<CertState>,
    task: AbortHandle,
    /// Wakes the refresh task to renew now instead of at half-life.
    renew_now: Arc<Notify>,
}

pub struct CertManager {
    meshd: Meshd,
    metrics: Arc<dyn CertEvents>,
    /// How long `get` waits for a first certificate before failing the connection.
    wait: Duration,
    slots: Mutex<HashMap<Identity, Slot>>,
}

impl CertManager {
    pub fn new(meshd: Meshd, metrics: Arc<dyn CertEvents>) -> Arc<CertManager> {
        Arc::new(CertManager {
            meshd,
            metrics,
            wait: Duration::from_secs(10),
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// Whether a usable certificate for `id` is in hand now.
    pub fn is_ready(&self, id: &Identity) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(id).is_some_and(|s| match &*s.rx.borrow() {
            CertState::Ready(_) => true,
            CertState::Failed {
                previous: Some(e), ..
            } => e.cert.not_after > SystemTime::now(),
            _ => false,
        })
    }

    /// Every certificate this node holds, for the admin config dump.
    pub fn status(&self) -> Vec<serde_json::Value> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let unix = |t: SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        };
        let mut out: Vec<serde_json::Value> = slots
            .iter()
            .map(|(id, slot)| match &*slot.rx.borrow() {
                CertState::Pending => serde_json::json!({"identity": id.to_string(), "state": "pending"}),
                CertState::Ready(e) => serde_json::json!({
                    "identity": id.to_string(), "state": "ready",
                    "notBefore": unix(e.cert.not_before), "notAfter": unix(e.cert.not_after),
                    "expiresInSeconds": e.cert.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                    "roots": e.cert.roots_pem.len(),
                }),
                CertState::Failed { error, previous } => serde_json::json!({
                    "identity": id.to_string(), "state": "failing", "error": error,
                    "notAfter": previous.as_ref().map(|e| unix(e.cert.not_after)),
                }),
            })
            .collect();
        out.sort_by_key(|v| v["identity"].as_str().unwrap_or_default().to_string());
        out
    }

    /// Fetches every certificate again now (the trust bundle changed: new certificates carry
    /// the new roots, so peers signed by a new root verify).
    pub fn refresh_all(&self) {
        // The current certificates stay in use until their replacements arrive.
        for slot in self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            slot.renew_now.notify_one();
        }
    }

    /// Starts fetching (and refreshing) the certificate for `id`, if not already.
    pub fn prefetch(self: &Arc<Self>, id: &Identity) {
        self.watch(id);
    }

    fn watch(self: &Arc<Self>, id: &Identity) -> watch::Receiver<CertState> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(id) {
            return slot.rx.clone();
        }
        let (tx, rx) = watch::channel(CertState::Pending);
        let renew_now = Arc::new(Notify::new());
        let task = tokio::spawn(refresh_loop(
            self.meshd.clone(),
            self.metrics.clone(),
            id.clone(),
            tx,
            renew_now.clone(),
        ))
        .abort_handle();
        slots.insert(
            id.clone(),
            Slot {
                rx: rx.clone(),
                task,
                renew_now,
            },
        );
        rx
    }

    /// The current certificate for `id`, waiting (bounded) for the first fetch.
    pub async fn get(self: &Arc<Self>, id: &Identity) -> Result<Arc<CertEntry>, CertError> {
        let mut rx = self.watch(id);
        let wait = tokio::time::timeout(self.wait, async {
            loop {
                match &*rx.borrow_and_update() {
                    CertState::Ready(e) => return Ok(e.clone()),
                    CertState::Failed {
                        previous: Some(e), ..
                    } if e.cert.not_after > SystemTime::now() => {
                        return Ok(e.clone());
                    }
                    _ => {}
                }
                if rx.changed().await.is_err() {
                    return Err("certificate task stopped".to_string());
                }
            }
        })
        .await;
        match wait {
            Ok(Ok(e)) => Ok(e),
            Ok(Err(reason)) => Err(CertError::Unavailable {
                identity: id.clone(),
                reason,
            }),
            Err(_) => {
                let reason = match &*rx.borrow() {
                    CertState::Failed { error, .. } => format!("CA request failing: {error}"),
                    _ => format!("CA did not answer within {:?}", self.wait),
                };
                Err(CertError::Unavailable {
                    identity: id.clone(),
                    reason,
                })
            }
        }
    }

    /// Forgets identities no local pod uses any more.
    pub fn retain(&self, keep: &HashSet<Identity>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|id, slot| {
            let k = keep.contains(id);
            if !k {
                slot.task.abort();
                info!(%id, "certificate no longer needed on this node; dropped");
            }
            k
        });
    }
}

async fn refresh_loop(
    meshd: Meshd,
    metrics: Arc<dyn CertEvents>,
    id: Identity,
    tx: watch::Sender<CertState>,
    renew_now: Arc<Notify>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        match fetch(&meshd, &id).await {
            Ok(entry) => {
                backoff.reset();
                metrics.cert_issued(&id.to_string());
                let remaining = entry
                    .cert
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                info!(%id, expires_in_s = remaining.as_secs(), "workload certificate issued");
                tx.send_replace(CertState::Ready(entry));
                // A key pair, a CSR and a chain's parse were made and dropped.
                crate::memory::trim_soon();
                // Renew at half-life counted from receipt: the CA backdates notBefore for clock
                // skew, so notBefore would make short certificates renew almost at once.
                let wake = remaining / 2;
                tokio::select! {
                    _ = tokio::time::sleep(wake.max(Duration::from_millis(500))) => {},
                    _ = renew_now.notified() => info!(%id, "renewing certificate now (trust bundle changed)"),
                }
            }
            Err(error) => {
                warn!(%id, %error, "workload certificate request failed; retrying with backoff");
                metrics.cert_fetch_failed(&id.to_string());
                let previous = match &*tx.borrow() {
                    CertState::Ready(e) => Some(e.clone()),
                    CertState::Failed { previous, .. } => previous.clone(),
                    CertState::Pending => None,
                };
                tx.send_replace(CertState::Failed { error, previous });
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

async fn fetch(meshd: &Meshd, id: &Identity) -> Result<Arc<CertEntry>, String> {
    let (key_pem, csr_pem) = meshcore::ca::generate_csr(id).map_err(|e| e.to_string())?;
    let mut client = CertificateServiceClient::new(meshd.channel.clone());
    let req = CertificateRequest {
        csr_pem,
        identity: id.to_string(),
        validity_seconds: 0,
    };
    let resp = client
        .create_certificate(meshd.request(req))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let cert = WorkloadCert::new(
        id.clone(),
        resp.cert_chain_pem,
        key_pem,
        resp.trust_bundle_pem,
    )
    .map_err(|e| e.to_string())?;
    let server_tls = tls::server_config(&cert).map_err(|e| e.to_string())?;
    Ok(Arc::new(CertEntry {
        cert: Arc::new(cert),
        server_tls,
    }))
}
