//! `meshd run`: wires the resource source, translation and both gRPC services onto one
//! listener, and shuts them down gracefully.
//!
//! Owns start-up order, the listener (unix socket or TCP) and the translation loop. Each piece's
//! logic lives in its own module.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshcore::ca::CaError;
use meshcore::proto::ca::certificate_service_server::CertificateServiceServer;
use meshcore::proto::config::TrustBundle;
use meshcore::proto::config::config_service_server::ConfigServiceServer;
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tracing::{info, warn};

use crate::ca_service::CaService;
use crate::config_service::ConfigStream;
use crate::local_source::{LocalSource, SourceError};
use crate::resources::ResourceSet;
use crate::roots::{self, Roots};
use crate::settings::Listen;
use crate::state::{self, StateError};
use crate::translate::{self, Settings, VersionedView};

/// How long open connections get to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub listen: Listen,
    pub settings: Settings,
    pub cert_lifetime: Duration,
    pub poll_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("certificate authority in {dir}: {source}")]
    Ca { dir: String, source: CaError },
    #[error(transparent)]
    Roots(#[from] crate::roots::RootsError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs until `shutdown` completes, then stops accepting, ends open config streams and
/// returns once connections have closed (or after a grace period).
pub async fn run(
    cfg: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    state::ensure_dir(&cfg.state_dir)?;
    let auth = Arc::new(state::node_authority(&cfg.state_dir)?);
    let ca_dir = state::ca_dir(&cfg.state_dir);
    let first = roots::load(&ca_dir, &cfg.settings.trust_domain)?;
    let roots = roots::watch(
        ca_dir,
        cfg.settings.trust_domain.clone(),
        first,
        Duration::from_millis(500),
    );

    let (_source, resources) = LocalSource::start(&cfg.config_dir, cfg.poll_interval)?;
    let views = spawn_translation(resources, cfg.settings.clone(), roots.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let router = Server::builder()
        .add_service(ConfigServiceServer::new(ConfigStream::new(
            views.clone(),
            auth.clone(),
            stop_rx.clone(),
        )))
        .add_service(CertificateServiceServer::new(CaService::new(
            roots,
            auth,
            views,
            cfg.cert_lifetime,
        )));
    let signal = async move {
        shutdown.await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    };
    let listen = cfg.listen.clone();
    let listen_err = |reason: String| RunError::Listen {
        addr: listen.to_string(),
        reason,
    };
    let serve: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match &cfg.listen {
            Listen::Unix(path) => {
                let listener = bind_unix(path).map_err(listen_err)?;
                info!("meshd ready on {}", cfg.listen);
                Box::pin(
                    router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal),
                )
            }
            Listen::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| listen_err(e.to_string()))?;
                // The bound address, so that port 0 reports the port actually chosen.
                let bound = listener
                    .local_addr()
                    .map_or_else(|_| cfg.listen.clone(), Listen::Tcp);
                info!("meshd ready on {bound}");
                Box::pin(
                    router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal),
                )
            }
        };
    let mut stopping = stop_rx;
    let result = tokio::select! {
        r = serve => r.map_err(RunError::from),
        _ = async { let _ = stopping.wait_for(|s| *s).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            warn!("connections did not close within {SHUTDOWN_GRACE:?}; stopping anyway");
            Ok(())
        }
    };
    if let Listen::Unix(path) = &cfg.listen {
        let _ = std::fs::remove_file(path);
    }
    info!("stopped");
    result
}

/// Translates every new resource set and publishes the view when it changed, with the next
/// version. The task ends when the source goes away.
fn spawn_translation(
    mut resources: watch::Receiver<Arc<ResourceSet>>,
    settings: Settings,
    mut roots: watch::Receiver<Arc<Roots>>,
) -> watch::Receiver<Arc<VersionedView>> {
    let bundle = |r: &Roots| TrustBundle {
        trust_domain: settings.trust_domain.clone(),
        roots_pem: r.bundle.clone(),
    };
    let trust_bundle = bundle(&roots.borrow_and_update());
    let first = translate::translate(&resources.borrow_and_update(), &settings, &trust_bundle);
    info!(
        workloads = first.workloads.len(),
        services = first.services.len(),
        policies = first.policies.len(),
        "initial mesh view"
    );
    let (tx, rx) = watch::channel(Arc::new(VersionedView {
        version: 1,
        view: first,
    }));
    tokio::spawn(async move {
        loop {
            // A new resource set or a new trust bundle (root rotation) both make a new view.
            tokio::select! {
                r = resources.changed() => if r.is_err() { return },
                r = roots.changed() => if r.is_err() { return },
            }
            let set = resources.borrow_and_update().clone();
            let trust_bundle = TrustBundle {
                trust_domain: settings.trust_domain.clone(),
                roots_pem: roots.borrow_and_update().bundle.clone(),
            };
            let view = translate::translate(&set, &settings, &trust_bundle);
            tx.send_if_modified(|cur| {
                if cur.view == view {
                    return false;
                }
                let version = cur.version + 1;
                info!(
                    version,
                    workloads = view.workloads.len(),
                    services = view.services.len(),
                    policies = view.policies.len(),
                    "mesh view changed"
                );
                *cur = Arc::new(VersionedView { version, view });
                true
            });
        }
    });
    rx
}

/// Binds a unix socket, replacing a stale socket file but never a live meshd's socket or a
/// file that is not a socket.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err("another process is serving on it".to_string());
        }
        std::fs::remove_file(path).map_err(|e| format!("removing stale socket: {e}"))?;
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| e.to_string())?;
    // Open to every local user: the node token, not file permissions, is the authentication.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("chmod: {e}"))?;
    Ok(listener)
}
