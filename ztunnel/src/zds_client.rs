//! ztunnel's ZDS client (`--enrollment zds`): connects to the CNI node agent's socket
//! (`--zds-socket`), says hello, and feeds each request to [`crate::zds_pods`], acking its
//! result. A lost or refused connection is retried with backoff (10 ms doubling to 15 s, as
//! Istio's ztunnel) and changes no pod: capture stays, and the next session's snapshot
//! reconciles. Owns the connection and what readiness and the dump know of it
//! ([`ZdsStatus`]); never a pod's setup.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane::zds::{Request, ZdsConn, ZdsError, ZtunnelSession};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::pods::{OnExit, SourceStatus, off_workers};
use crate::proxy::Ctx;
use crate::zds_pods::ZdsPods;

/// The first retry's delay; each failed attempt doubles it up to [`BACKOFF_MAX`].
pub const BACKOFF_START: Duration = Duration::from_millis(10);
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// How often pods get another chance at what the config asks of them (a failed update).
const RETRY: Duration = Duration::from_secs(2);

/// The agent connection's state, for readiness and the config dump.
pub struct ZdsStatus {
    socket: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    connected: bool,
    /// This session's snapshot has been processed.
    snapshot_processed: bool,
    /// A request received and not yet acked.
    pending: bool,
    sessions: u64,
    last_error: Option<String>,
    pods: Vec<String>,
}

impl ZdsStatus {
    pub fn new(socket: PathBuf) -> ZdsStatus {
        ZdsStatus {
            socket,
            state: Mutex::default(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Ready as Istio's ztunnel is: connected, this session's snapshot processed, nothing
    /// pending.
    pub fn ready(&self) -> Result<(), String> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !s.connected {
            return Err(format!(
                "not connected to the CNI agent at {}{}",
                self.socket.display(),
                s.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
        if !s.snapshot_processed {
            return Err("waiting for the CNI agent's snapshot".to_string());
        }
        if s.pending {
            return Err("a CNI agent request is being processed".to_string());
        }
        Ok(())
    }

    pub fn dump(&self) -> Value {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        json!({
            "source": "zds", "socket": self.socket.display().to_string(),
            "connected": s.connected, "snapshotProcessed": s.snapshot_processed,
            "pending": s.pending, "sessions": s.sessions, "lastError": s.last_error,
            "podUids": s.pods,
        })
    }
}

/// Serves the agent's requests until `shutdown`, reconnecting as needed.
pub async fn run(
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
    on_exit: OnExit,
    trust_domain: String,
) {
    let SourceStatus::Zds(status) = &ctx.enrollment else {
        return;
    };
    let pods = Arc::new(Mutex::new(ZdsPods::new(ctx.clone(), trust_domain)));
    let config_task = tokio::spawn(follow_config(ctx.clone(), pods.clone()));
    let mut backoff = BACKOFF_START;
    loop {
        let served = tokio::select! {
            r = session(status, &pods) => r,
            _ = shutdown.changed() => break,
        };
        let err = match served {
            Ok(never) => match never {},
            Err(e) => e,
        };
        let was_connected = status.state.lock().is_ok_and(|s| s.connected);
        let msg = err.to_string();
        let repeated = status
            .state
            .lock()
            .is_ok_and(|s| s.last_error.as_deref() == Some(msg.as_str()));
        if was_connected {
            warn!(socket = %status.socket.display(), error = %msg, "lost the CNI agent; pods stay enrolled, reconnecting");
            backoff = BACKOFF_START;
        } else if !repeated {
            warn!(socket = %status.socket.display(), error = %msg, retry_in = ?backoff, "cannot reach the CNI agent; retrying");
        }
        status.update(|s| {
            s.connected = false;
            s.snapshot_processed = false;
            s.pending = false;
            s.last_error = Some(msg);
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {},
            _ = shutdown.changed() => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    config_task.abort();
    lock(&pods).shutdown(on_exit);
    status.update(|s| s.pods.clear());
}

fn lock(pods: &Mutex<ZdsPods>) -> std::sync::MutexGuard<'_, ZdsPods> {
    pods.lock().unwrap_or_else(|p| p.into_inner())
}

/// One session: hello, then request → handle → ack until the connection fails.
async fn session(
    status: &ZdsStatus,
    pods: &Arc<Mutex<ZdsPods>>,
) -> Result<std::convert::Infallible, ZdsError> {
    let conn = ZdsConn::connect(&status.socket).await?;
    let mut session = ZtunnelSession::start(conn).await?;
    info!(socket = %status.socket.display(), "connected to the CNI agent");
    lock(pods).new_session();
    status.update(|s| {
        s.connected = true;
        s.snapshot_processed = false;
        s.sessions += 1;
        s.last_error = None;
    });
    loop {
        let req = session.next().await?;
        status.update(|s| s.pending = true);
        let snapshot = matches!(req, Request::SnapshotSent);
        let what = describe(&req);
        let shared = pods.clone();
        let (result, uids) = off_workers(move || {
            let add = matches!(req, Request::Add { .. });
            let mut p = lock(&shared);
            let out = (p.handle(req), p.uids());
            if add {
                // An eBPF load's BTF parse just freed ~20 MB; give it back now.
                dataplane::memory::trim();
            }
            out
        })
        .await;
        if let Err(e) = &result {
            warn!(request = %what, error = %e, "CNI agent request refused");
        }
        let ok = result.is_ok();
        session.ack(result).await?;
        status.update(|s| {
            s.pending = false;
            s.pods = uids;
            if snapshot && ok {
                s.snapshot_processed = true;
            }
        });
        if snapshot && ok {
            info!("CNI agent snapshot processed");
        }
    }
}

fn describe(req: &Request) -> String {
    match req {
        Request::Add { uid, .. } => format!("add {uid}"),
        Request::Keep { uid } => format!("keep {uid}"),
        Request::Del { uid } => format!("del {uid}"),
        Request::SnapshotSent => "snapshot_sent".to_string(),
    }
}

/// Brings config changes (labels, annotations, trust domain) to the pods, and retries.
async fn follow_config(ctx: Arc<Ctx>, pods: Arc<Mutex<ZdsPods>>) {
    let mut config = ctx.config.clone();
    let mut tick = tokio::time::interval(RETRY);
    loop {
        let p = pods.clone();
        off_workers(move || lock(&p).on_config()).await;
        crate::pods::prune_metrics(&ctx);
        tokio::select! {
            r = config.changed() => if r.is_err() { return },
            _ = tick.tick() => {},
        }
    }
}
