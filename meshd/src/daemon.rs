//! `meshd run`: wires the resource source, translation and both gRPC services onto one
//! listener, and shuts them down gracefully.
//!
//! Owns start-up order, the gRPC server's limits and the translation loop. Each piece's logic
//! lives in its own module (who may connect: `listener`; who may call: `authn`).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshcore::ca::CaError;
use meshcore::proto::ca::certificate_service_server::CertificateServiceServer;
use meshcore::proto::config::TrustBundle;
use meshcore::proto::config::config_service_server::ConfigServiceServer;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tracing::{info, warn};

use crate::authn::NodeAuth;
use crate::ca_service::CaService;
use crate::config_service::ConfigStream;
use crate::listener::{self, ListenerError};
use crate::local_source::{LocalSource, SourceError};
use crate::outputs::{OutputError, Outputs};
use crate::resources::ResourceSet;
use crate::roots::{self, Roots};
use crate::route_gate::RouteGate;
use crate::settings::Listen;
use crate::state::{self, StateError};
use crate::translate::{self, RouteOrder, Settings, VersionedView};

/// How long open connections get to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Requests' bodies are tiny (a CSR is under 1 KiB, a subscription a node name): anything larger
/// is refused before it is buffered.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Streams one connection may have open at once (a ztunnel uses one per identity it renews,
/// plus its config stream).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Unary calls in progress per connection; more wait.
const CONCURRENCY_PER_CONNECTION: usize = 32;
/// A call that has not produced its response by then is cancelled (a config stream's response
/// is its first message, sent at once; the stream itself is not limited).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub listen: Listen,
    pub settings: Settings,
    /// Istio's root namespace (ztunnels' `--root-namespace`): its policies go to every node.
    pub root_namespace: String,
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
    #[error(transparent)]
    Tls(#[from] ListenerError),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Outputs(#[from] OutputError),
    #[error(transparent)]
    Kube(#[from] crate::kube::KubeError),
}

/// What `meshd run` does beyond serving (kept out of [`RunConfig`] so its users need not
/// change when an option is added).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Where rendered waypoint objects and status are written (`--write-dir`; see `outputs`).
    pub write_dir: Option<PathBuf>,
    /// Kubernetes mode: read the API instead of `config_dir`, keep the CA in a Secret, accept
    /// service-account tokens, and (as the elected leader) write waypoint objects and status.
    pub kube: Option<crate::kube::KubeSettings>,
}

/// Runs until `shutdown` completes, then stops accepting, ends open config streams and
/// returns once connections have closed (or after a grace period).
pub async fn run(
    cfg: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with(cfg, RunOptions::default(), shutdown).await
}

/// [`run`] with [`RunOptions`].
pub async fn run_with(
    cfg: RunConfig,
    opts: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    state::ensure_dir(&cfg.state_dir)?;
    let outputs = opts.write_dir.as_deref().map(Outputs::new).transpose()?;
    let auth = Arc::new(state::node_authority(&cfg.state_dir)?);
    let ca_dir = state::ca_dir(&cfg.state_dir);
    // Shutdown is a channel from the start: waiting for the API (below) must heed it too.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let kube = opts.kube.clone().map(|mut k| {
        k.root_namespace = cfg.root_namespace.clone();
        k
    });
    let mut stopped = stop_rx.clone();
    let started = tokio::select! {
        r = start_source(&cfg, kube.as_ref(), &ca_dir) => r?,
        _ = stopped.wait_for(|s| *s) => {
            info!("stopped before the resource source was ready");
            return Ok(());
        }
    };
    let Started {
        kube_client,
        _ca_sync,
        _source,
        resources,
    } = started;
    let first = roots::load(&ca_dir, &cfg.settings.trust_domain)?;
    let roots = roots::watch(
        ca_dir,
        cfg.settings.trust_domain.clone(),
        first,
        Duration::from_millis(500),
    );
    let views = spawn_translation(resources, cfg.settings.clone(), roots.clone());
    if let Some(outputs) = outputs {
        spawn_outputs(outputs, views.clone());
    }
    let mut kube_auth = crate::kube::identity::KubeAuthLayer::default();
    let mut elected = None;
    if let Some((client, k)) = &kube_client {
        let leader = crate::kube::leader::spawn(client.clone(), k);
        elected = Some(leader.clone());
        crate::kube::writer::spawn(client.clone(), k, views.clone(), leader.clone());
        crate::kube::ca_secret::publish_root(client.clone(), k, roots.clone(), leader);
        kube_auth.reviewer = Some(crate::kube::identity::TokenReviewer::new(
            client.clone(),
            k,
            views.clone(),
        ));
    }

    // Every service authenticates in an interceptor, which runs on the headers: no body of an
    // unauthenticated caller is ever decoded.
    let node_auth = NodeAuth::new(auth);
    let config_service = ConfigServiceServer::new(ConfigStream::new(
        views.clone(),
        cfg.root_namespace.clone(),
        stop_rx.clone(),
    ))
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let ca_service =
        CertificateServiceServer::new(CaService::new(roots.clone(), views, cfg.cert_lifetime))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
    let router = Server::builder()
        .layer(kube_auth)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .timeout(REQUEST_TIMEOUT)
        .add_service(InterceptedService::new(config_service, node_auth.clone()))
        .add_service(InterceptedService::new(ca_service, node_auth));
    let mut stop = stop_rx.clone();
    let signal = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let listen = cfg.listen.clone();
    let listen_err = |reason: String| RunError::Listen {
        addr: listen.to_string(),
        reason,
    };
    let incoming = match &cfg.listen {
        Listen::Unix(path) => {
            let listener = listener::bind_unix(path).map_err(listen_err)?;
            info!("meshd ready on {} (root only)", cfg.listen);
            listener::admit_root(listener, stop_rx.clone())
        }
        Listen::Tcp(addr) => {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| listen_err(e.to_string()))?;
            // The bound address, so that port 0 reports the port actually chosen.
            let bound = tcp
                .local_addr()
                .map_or_else(|_| cfg.listen.clone(), Listen::Tcp);
            let incoming =
                listener::admit_tls(tcp, roots, &cfg.settings.trust_domain, stop_rx.clone())?;
            info!("meshd ready on {bound} (TLS)");
            incoming
        }
    };
    let serve = router.serve_with_incoming_shutdown(incoming, signal);
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
    if let Some(leader) = &elected {
        // Stop writing and release the Lease before exiting: another replica leads at once.
        crate::kube::leader::resign_and_wait(leader).await;
    }
    info!("stopped");
    result
}

/// What start-up made before anything is served.
struct Started {
    kube_client: Option<(kube::Client, crate::kube::KubeSettings)>,
    /// Keeps the CA directory following the Secret while meshd runs.
    _ca_sync: Option<crate::kube::ca_secret::CaSecretSync>,
    _source: Source,
    resources: watch::Receiver<Arc<ResourceSet>>,
}

/// The resource source, and in Kubernetes mode the CA from the API first (every replica signs
/// with the root kept there, not one of its own). Returns once the source has a complete first
/// set: in Kubernetes mode that can wait for the API.
async fn start_source(
    cfg: &RunConfig,
    kube: Option<&crate::kube::KubeSettings>,
    ca_dir: &std::path::Path,
) -> Result<Started, RunError> {
    let Some(k) = kube else {
        let (s, resources) = LocalSource::start(&cfg.config_dir, cfg.poll_interval)?;
        return Ok(Started {
            kube_client: None,
            _ca_sync: None,
            _source: Source::Directory(s),
            resources,
        });
    };
    let client = crate::kube::client(k).await?;
    let ca_sync =
        crate::kube::ca_secret::sync(client.clone(), k, ca_dir, &cfg.settings.trust_domain).await?;
    info!("reading resources from the Kubernetes API");
    let (s, resources) = crate::kube::source::KubeSource::start(client.clone(), k).await?;
    Ok(Started {
        kube_client: Some((client, k.clone())),
        _ca_sync: Some(ca_sync),
        _source: Source::Kube(s),
        resources,
    })
}

/// The running resource source (stops when dropped).
enum Source {
    Directory(#[allow(dead_code)] LocalSource),
    Kube(#[allow(dead_code)] crate::kube::source::KubeSource),
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
    let mut order = RouteOrder::default();
    let set = resources.borrow_and_update().clone();
    order.update(&set);
    let mut gate = RouteGate::default();
    let mut first = translate::translate_ordered(&set, &settings, &trust_bundle, &order);
    gate.apply(&mut first, &settings.cluster_domain);
    log_binding_changes(&translate::MeshView::default(), &first);
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
            order.update(&set);
            let mut view = translate::translate_ordered(&set, &settings, &trust_bundle, &order);
            gate.apply(&mut view, &settings.cluster_domain);
            tx.send_if_modified(|cur| {
                if cur.view == view {
                    return false;
                }
                log_binding_changes(&cur.view, &view);
                let version = cur.version + 1;
                info!(
                    version,
                    workloads = view.workloads.len(),
                    services = view.services.len(),
                    policies = view.policies.len(),
                    routes = view.routes.len(),
                    waypoints = view.waypoints.len(),
                    "mesh view changed"
                );
                *cur = Arc::new(VersionedView { version, view });
                true
            });
        }
    });
    rx
}

/// Writes every published view's objects and status (`--write-dir`) until the views end.
fn spawn_outputs(mut outputs: Outputs, mut views: watch::Receiver<Arc<VersionedView>>) {
    tokio::spawn(async move {
        loop {
            let current = views.borrow_and_update().clone();
            // Small files, written only when changed: not worth a blocking-pool hop.
            outputs.write(&current.view);
            if views.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Says when a Service's or pod's waypoint binding becomes unusable or usable again: traffic to
/// it then bypasses the waypoint (or is refused, with ztunnel's fail-closed setting).
fn log_binding_changes(old: &translate::MeshView, new: &translate::MeshView) {
    let why = |b: Option<&meshcore::proto::config::WaypointBinding>| {
        b.map(|b| (b.gateway.clone(), b.unavailable.clone()))
    };
    let services = new.services.iter().map(|(k, s)| {
        let before = old.services.get(k).and_then(|o| why(o.waypoint.as_ref()));
        ("Service", k, before, why(s.waypoint.as_ref()))
    });
    let workloads = new.workloads.iter().map(|(k, w)| {
        let before = old.workloads.get(k).and_then(|o| why(o.waypoint.as_ref()));
        ("Pod", k, before, why(w.waypoint.as_ref()))
    });
    for (kind, key, before, now) in services.chain(workloads) {
        if before == now {
            continue;
        }
        match now {
            Some((gw, unavailable)) if !unavailable.is_empty() => {
                warn!("{kind} {key} is bound to waypoint {gw}, which cannot be used: {unavailable}")
            }
            Some((gw, _)) => info!("{kind} {key} goes through waypoint {gw}"),
            None if before.is_some() => info!("{kind} {key} is no longer bound to a waypoint"),
            None => {}
        }
    }
}
