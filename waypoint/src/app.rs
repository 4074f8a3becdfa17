//! Wiring: [`build`] turns a [`Config`] into an [`App`]; [`App::start`] binds its listeners and
//! runs it in this process (the binary and the tests do the same). Owns the shared [`Ctx`],
//! starting the config subscription and the background tasks (`background`), and readiness /
//! config dump; the traffic paths live in their own modules.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dataplane::certs::CertManager;
use dataplane::drain::Drain;
use dataplane::meshd::{Meshd, MeshdTls};
use dataplane::record_encryption::RecordEncryption;
use dataplane::subscription::{self, ConfigRx};
use dataplane::supervise::{Supervisor, TaskExit};
use meshcore::admission::{Gate, Throttle};
use meshcore::hbone::{Pool, PoolSettings};
use meshcore::proto::config::SubscribeRequest;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::admin::Endpoints;
use crate::balance::Balancer;
use crate::config::{Config, Source};
use crate::own_cert::OwnCert;
use crate::routing::Router;
use crate::telemetry::Metrics;
use crate::upstream::Upstream;
use crate::{background, inbound, plain};
use dataplane::admin::{AdminError, Listeners, Server};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Meshd(#[from] dataplane::meshd::MeshdError),
    #[error("the waypoint's certificate: {0}")]
    Cert(#[from] crate::own_cert::CertError),
    #[error("tracing: {0}")]
    Tracing(#[from] dataplane::spans::SpanError),
    #[error("cannot open the access log {to:?}: {source}")]
    AccessLog {
        to: crate::config::AccessLog,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Caps on what clients can make the waypoint hold, and throttled logs of what they can cause.
pub struct Admission {
    pub connections: Arc<Gate>,
    pub handshakes: Arc<Gate>,
    pub refused: Throttle,
    pub handshakes_failed: Throttle,
    pub accept_failed: Throttle,
    pub connect_refused: Throttle,
}

impl Default for Admission {
    fn default() -> Self {
        let period = Duration::from_secs(10);
        Admission {
            connections: Arc::new(Gate::new(16384, 4096)),
            handshakes: Arc::new(Gate::new(1024, 64)),
            refused: Throttle::new(period),
            handshakes_failed: Throttle::new(period),
            accept_failed: Throttle::new(period),
            connect_refused: Throttle::new(period),
        }
    }
}

/// What every connection and request shares.
pub struct Ctx {
    /// `ns/name` of our Gateway; only objects bound to it are served.
    pub gateway: String,
    pub config: ConfigRx,
    pub router: watch::Receiver<Router>,
    pub cert: OwnCert,
    pub balancer: Balancer,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub drain: Arc<Drain>,
    pub admission: Admission,
    pub sniff_timeout: Duration,
    /// The plain-HTTP listener's backend, whose pooled connections are never pruned.
    pub plain_backend: Option<SocketAddr>,
    /// Span export, when a collector is configured.
    pub tracing: Option<crate::trace::Tracing>,
    /// L7 policy compiled per config version, and the JWKS cache.
    pub authz: crate::authz::Authz,
    /// Whether HBONE's records go to the kernel (inbound and to upstreams).
    pub kernel_tls: RecordEncryption,
}

impl Ctx {
    /// Ready once there is a config and a certificate.
    pub fn ready(&self) -> Result<(), String> {
        if self.config.borrow().is_none() {
            return Err("no config from meshd yet".to_string());
        }
        if !self.cert.is_ready() {
            return Err("no certificate yet".to_string());
        }
        Ok(())
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let store = self.config.borrow().clone();
        let services: Vec<_> = store
            .iter()
            .flat_map(|s| s.services())
            .map(|s| serde_json::json!({"key": s.key, "hostname": s.hostname, "vips": s.vips,
                "ports": s.ports.iter().map(|p| serde_json::json!({"port": p.port, "name": p.name, "appProtocol": p.app_protocol})).collect::<Vec<_>>(),
                "endpoints": s.endpoints.len()}))
            .collect();
        serde_json::json!({
            "gateway": self.gateway,
            "identity": self.cert.identity().map(|i| i.to_string()),
            "configVersion": store.as_ref().map(|s| s.version),
            "services": services,
            "routes": self.router.borrow().dump(),
            "certificates": self.cert.status(),
            "connections": self.drain.active(),
            "circuitBreakers": self.upstream.dump(),
            "balancer": self.balancer.dump(&self.router.borrow()),
            "authz": store.as_ref().map(|s| self.authz.dump(s, &self.gateway)),
            "hboneRecordEncryption": self.kernel_tls.dump(),
        })
    }
}

/// A built waypoint, not yet listening.
pub struct App {
    config: Config,
    ctx: Arc<Ctx>,
    tasks: Supervisor,
    router_tx: watch::Sender<Router>,
}

/// A running waypoint.
pub struct Running {
    pub hbone_addr: SocketAddr,
    pub ready_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub plain_addr: Option<SocketAddr>,
    pub ctx: Arc<Ctx>,
    tasks: Supervisor,
    drain_timeout: Duration,
}

/// Builds the waypoint from `config`. Starts nothing until [`App::start`] (but needs a tokio
/// runtime: the meshd subscription is spawned here).
pub fn build(config: Config) -> Result<App, AppError> {
    let metrics = Metrics::new();
    let mut tasks = Supervisor::default();
    let (config_rx, cert) = match &config.source {
        Source::Standalone => {
            let (_tx, rx) = watch::channel(Some(Arc::default()));
            (rx, OwnCert::None)
        }
        Source::Static { store, cert } => {
            let (_tx, rx) = watch::channel(Some(store.clone()));
            // The sender is dropped: the config never changes, receivers keep the value.
            (rx, OwnCert::fixed(cert.clone())?)
        }
        Source::Channel { config, cert } => (config.clone(), OwnCert::fixed(cert.clone())?),
        Source::Meshd(m) => {
            let token = Meshd::read_token(&m.token_file.display().to_string())?;
            let tls = m.ca_file.clone().map(|ca_file| MeshdTls {
                ca_file,
                server_name: m.server_name.clone(),
            });
            // Read again when it changes (kubelet rotates projected tokens).
            let meshd =
                Meshd::with_token_file(&m.address, &m.token_file.display().to_string(), tls)?;
            let (gw_ns, gw_name) = config.gateway_parts();
            let service_account = m
                .service_account
                .clone()
                .or_else(|| token_service_account(&token))
                .unwrap_or_else(|| gw_name.to_string());
            let (tx, rx) = watch::channel(None);
            tasks.spawn(
                "config",
                subscription::run(
                    meshd.clone(),
                    SubscribeRequest {
                        node: config.node.clone(),
                        waypoint: config.gateway.clone(),
                    },
                    Duration::from_secs(10),
                    tx,
                ),
            );
            let manager = CertManager::new(meshd, metrics.clone());
            let cert = OwnCert::Managed {
                manager,
                config: rx.clone(),
                namespace: config.pod_namespace.clone().if_empty(gw_ns),
                service_account,
            };
            tasks.spawn(
                "certificate",
                background::prefetch(rx.clone(), cert.clone()),
            );
            (rx, cert)
        }
    };
    metrics.use_config(config_rx.clone());
    metrics
        .log_access_to(&config.access_log)
        .map_err(|source| AppError::AccessLog {
            to: config.access_log.clone(),
            source,
        })?;
    let tracing = match &config.tracing {
        Some(t) => {
            let (ns, name) = config.gateway_parts();
            // Istio names a proxy's spans `<canonical service>.<namespace>`.
            Some(crate::trace::Tracing::start(t, format!("{name}.{ns}"))?)
        }
        None => None,
    };
    let (router_tx, router_rx) = watch::channel(Router::default());
    let kernel_tls = RecordEncryption::probe(config.kernel_tls);
    let authz = crate::authz::Authz::start(config_rx.clone(), cert.clone(), kernel_tls.in_use());
    let ctx = Arc::new(Ctx {
        gateway: config.gateway.clone(),
        config: config_rx,
        router: router_rx,
        upstream: Upstream::new(
            Pool::new(PoolSettings {
                max_streams_per_conn: 200,
                kernel_tls: kernel_tls.in_use(),
                ..PoolSettings::default()
            }),
            cert.clone(),
        ),
        cert,
        balancer: Balancer::default(),
        metrics,
        drain: Arc::default(),
        admission: Admission::default(),
        sniff_timeout: config.sniff_timeout,
        plain_backend: config.plain_http.as_ref().map(|p| p.backend),
        tracing,
        authz,
        kernel_tls,
    });
    Ok(App {
        config,
        ctx,
        tasks,
        router_tx,
    })
}

trait IfEmpty {
    fn if_empty(self, other: &str) -> String;
}
impl IfEmpty for String {
    fn if_empty(self, other: &str) -> String {
        if self.is_empty() {
            other.to_string()
        } else {
            self
        }
    }
}

/// The service account a `sa:<namespace>:<serviceaccount>:...` token names.
fn token_service_account(token: &str) -> Option<String> {
    let mut parts = token.strip_prefix("sa:")?.split(':');
    let _ns = parts.next()?;
    parts.next().filter(|s| !s.is_empty()).map(str::to_string)
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { what, addr, source })
}

impl App {
    /// Binds every listener and starts serving.
    pub async fn start(self) -> Result<Running, AppError> {
        let App {
            config,
            ctx,
            mut tasks,
            router_tx,
        } = self;
        let hbone = bind("HBONE", config.hbone_addr).await?;
        let servers = dataplane::admin::bind(
            Arc::new(Endpoints(ctx.clone())),
            Listeners {
                admin: None,
                metrics: config.metrics_addr,
                ready: config.ready_addr,
            },
        )
        .await
        .map_err(
            |AdminError::Bind {
                 server,
                 addr,
                 source,
             }| AppError::Bind {
                what: server.name(),
                addr,
                source,
            },
        )?;
        let local = |l: &TcpListener| {
            l.local_addr().map_err(|source| AppError::Bind {
                what: "listener",
                addr: config.hbone_addr,
                source,
            })
        };
        let server_addr = |server: Server, configured: SocketAddr| {
            servers
                .addr(server)
                .unwrap_or_else(|| Err(std::io::Error::other("not bound")))
                .map_err(|source| AppError::Bind {
                    what: server.name(),
                    addr: configured,
                    source,
                })
        };
        let (hbone_addr, ready_addr, metrics_addr) = (
            local(&hbone)?,
            server_addr(Server::Ready, config.ready_addr)?,
            server_addr(Server::Metrics, config.metrics_addr)?,
        );
        let mut plain_addr = None;
        if let Some(p) = &config.plain_http {
            let l = bind("plain HTTP", p.listen).await?;
            plain_addr = Some(local(&l)?);
            tasks.spawn("plain-http", plain::serve(ctx.clone(), l, p.backend));
        }
        tasks.spawn("routes", background::routes(ctx.config.clone(), router_tx));
        tasks.spawn("prune-upstreams", background::prune_upstreams(ctx.clone()));
        tasks.spawn(
            "prune-metrics",
            crate::telemetry::prune_on_change(ctx.metrics.clone(), ctx.config.clone()),
        );
        tasks.spawn("hbone", inbound::serve(ctx.clone(), hbone));
        tasks.spawn("admin", servers.run());
        info!(gateway = %config.gateway, hbone = %hbone_addr, ready = %ready_addr, metrics = %metrics_addr,
            plain_http = ?plain_addr, "waypoint started");
        Ok(Running {
            hbone_addr,
            ready_addr,
            metrics_addr,
            plain_addr,
            ctx,
            tasks,
            drain_timeout: config.drain_timeout,
        })
    }
}

impl Running {
    /// Resolves when a background task ends (it never should: the caller exits).
    pub async fn first_exit(&mut self) -> TaskExit {
        self.tasks.first_exit().await
    }

    /// Stops listening, lets what is in flight finish (bounded), and stops. Returns how many
    /// connections were still open at the drain timeout.
    pub async fn stop(self) -> usize {
        let Running {
            tasks,
            ctx,
            drain_timeout,
            ..
        } = self;
        drop(tasks); // aborts the listeners and background tasks
        let left = ctx.drain.stop(drain_timeout).await;
        // Send the spans still queued (blocking: the exporter has its own thread).
        let ctx2 = ctx.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(t) = &ctx2.tracing {
                t.shutdown();
            }
        })
        .await;
        left
    }
}
