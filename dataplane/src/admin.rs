//! The small HTTP/1.1 servers every data-plane binary runs: metrics, readiness and admin.
//!
//! | port (Istio's)          | path                 | answer                                          |
//! |-------------------------|----------------------|-------------------------------------------------|
//! | metrics, 15020          | `GET /metrics`       | Prometheus scrape ([`Handler::metrics`])        |
//! | readiness, 15021        | `GET /healthz/ready` | 200 `ready`, or 503 `not ready: <reason>`       |
//! | admin, 127.0.0.1:15000  | `GET /config_dump`   | the JSON config dump ([`Handler::config_dump`]) |
//!
//! A binary without an admin listener (the waypoint's pod has only 15020 and 15021) serves
//! `/config_dump` on the metrics port instead. A binary's own paths (ztunnel's `/logging`)
//! come from [`Handler::extra`]. Any other path is 404; a known path with the wrong method is
//! 405 (with `Allow`).
//!
//! Owns only the listeners, their caps and the routing; *what* readiness, the dump and the
//! scrape say is the binary's [`Handler`]. The metrics and readiness ports are reached by the
//! kubelet and Prometheus — and so by any pod: a client that connects and sends nothing must
//! not starve them. Each server accepts every connection and closes at once what is over its
//! caps ([`MAX_CONNECTIONS`] in all, [`MAX_CONNECTIONS_PER_SOURCE`] per source IP), and closes
//! a connection that has not sent a request within its header timeout (2 s on the metrics and
//! readiness ports); readiness answers with `Connection: close`, as probes open a connection
//! per check.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use meshcore::admission::{Gate, Throttle};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// The `Content-Type` of a Prometheus scrape (OpenMetrics text 1.0).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A client has this long to send its request headers (slow clients would otherwise hold a
/// connection slot forever). hyper applies it between requests too, so it is also the idle
/// timeout of a kept-alive connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// [`HEADER_READ_TIMEOUT`] of the ports any pod can reach: a probe or a scrape sends its
/// request at once, and an idler's slot comes back quickly.
const PUBLIC_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections served at once per server; further ones are closed as soon as accepted (left in
/// the kernel's backlog, they would wait behind whoever holds the slots).
pub const MAX_CONNECTIONS: usize = 64;

/// Of those, from one source IP: kubelet probes and Prometheus come from their own addresses,
/// so a client holding its share of idle connections leaves them served.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;

/// At most one refused/accept-error line per this period per server.
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// An HTTP response of these servers.
pub type Reply = Response<Full<Bytes>>;

/// What a binary answers with. Called per request from any thread: keep it quick and
/// non-blocking.
pub trait Handler: Send + Sync + 'static {
    /// The OpenMetrics text exposition ([`METRICS_CONTENT_TYPE`]).
    fn metrics(&self) -> String;
    /// `Ok(())` when ready, else `Err(reason)`.
    fn ready(&self) -> Result<(), String>;
    /// The JSON config dump.
    fn config_dump(&self) -> serde_json::Value;
    /// This binary's own paths: `Some(reply)` if `req` on `server` is one of them.
    fn extra(&self, _server: Server, _req: &Request<Incoming>) -> Option<Reply> {
        None
    }
}

/// Why the servers could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the {server} server to {addr}: {source}")]
    Bind {
        server: Server,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Which server a listener is (they route differently).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Admin,
    Metrics,
    Ready,
}

impl Server {
    pub fn name(self) -> &'static str {
        match self {
            Server::Admin => "admin",
            Server::Metrics => "metrics",
            Server::Ready => "readiness",
        }
    }
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where to listen. Without `admin`, `/config_dump` is served on the metrics port.
#[derive(Clone, Copy, Debug)]
pub struct Listeners {
    pub admin: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub ready: SocketAddr,
}

/// Binds every listener (all or nothing) without serving yet.
pub async fn bind(handler: Arc<dyn Handler>, at: Listeners) -> Result<Bound, AdminError> {
    let admin = match at.admin {
        Some(addr) => Some(listen(Server::Admin, addr).await?),
        None => None,
    };
    let metrics = listen(Server::Metrics, at.metrics).await?;
    let ready = listen(Server::Ready, at.ready).await?;
    let dump_on = if admin.is_some() {
        Server::Admin
    } else {
        Server::Metrics
    };
    Ok(Bound {
        routes: Arc::new(Routes { handler, dump_on }),
        admin,
        metrics,
        ready,
    })
}

async fn listen(server: Server, addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind {
            server,
            addr,
            source,
        })
}

struct Routes {
    handler: Arc<dyn Handler>,
    /// The server `/config_dump` is on.
    dump_on: Server,
}

/// The bound listeners, ready to [`run`](Bound::run).
pub struct Bound {
    routes: Arc<Routes>,
    admin: Option<TcpListener>,
    metrics: TcpListener,
    ready: TcpListener,
}

impl Bound {
    /// The address `server` is bound to (`None` for an admin server not asked for).
    pub fn addr(&self, server: Server) -> Option<io::Result<SocketAddr>> {
        match server {
            Server::Admin => self.admin.as_ref().map(TcpListener::local_addr),
            Server::Metrics => Some(self.metrics.local_addr()),
            Server::Ready => Some(self.ready.local_addr()),
        }
    }

    /// Serves every listener until this future is dropped. Accept errors (e.g. out of file
    /// descriptors) are logged and retried after a pause; they never stop a server.
    pub async fn run(self) {
        let Bound {
            routes,
            admin,
            metrics,
            ready,
        } = self;
        let admin = async {
            if let Some(admin) = admin {
                accept_loop(Server::Admin, admin, Arc::clone(&routes)).await;
            }
        };
        tokio::join!(
            admin,
            accept_loop(Server::Metrics, metrics, Arc::clone(&routes)),
            accept_loop(Server::Ready, ready, Arc::clone(&routes)),
        );
    }
}

async fn accept_loop(server: Server, listener: TcpListener, routes: Arc<Routes>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%server, %addr, "serving");
    }
    let slots = Arc::new(Gate::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE));
    let (refused, accept_errors) = (Throttle::new(LOG_PERIOD), Throttle::new(LOG_PERIOD));
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new());
    match server {
        Server::Admin => builder.header_read_timeout(HEADER_READ_TIMEOUT),
        Server::Metrics => builder.header_read_timeout(PUBLIC_HEADER_READ_TIMEOUT),
        // A probe is one request per connection: closing after it frees the slot at once.
        Server::Ready => builder
            .header_read_timeout(PUBLIC_HEADER_READ_TIMEOUT)
            .keep_alive(false),
    };
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                if let Some(suppressed) = accept_errors.hit() {
                    warn!(%server, error = %e, errors_since_last_line = suppressed, "accept failed; retrying");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match slots.enter(peer.ip()) {
            Ok(permit) => permit,
            Err(full) => {
                if let Some(suppressed) = refused.hit() {
                    warn!(%server, %peer, reason = %full, refused_since_last_line = suppressed, "connection refused: too many connections");
                }
                continue;
            }
        };
        let routes = Arc::clone(&routes);
        let builder = Arc::clone(&builder);
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let routes = Arc::clone(&routes);
                async move { Ok::<_, Infallible>(routes.answer(server, &req)) }
            });
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                debug!(%server, %peer, error = %e, "connection ended with an error");
            }
        });
    }
}

impl Routes {
    /// Answers one request. Never fails: every outcome is an HTTP status.
    fn answer(&self, server: Server, req: &Request<Incoming>) -> Reply {
        let h = &self.handler;
        let path = req.uri().path();
        match (server, path) {
            (Server::Metrics, "/metrics") => only(req, &Method::GET, || {
                respond(StatusCode::OK, METRICS_CONTENT_TYPE, h.metrics())
            }),
            (Server::Ready, "/healthz/ready") => only(req, &Method::GET, || match h.ready() {
                Ok(()) => text(StatusCode::OK, "ready\n".to_string()),
                Err(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            }),
            (s, "/config_dump") if s == self.dump_on => only(req, &Method::GET, || {
                match serde_json::to_string_pretty(&h.config_dump()) {
                    Ok(mut json) => {
                        json.push('\n');
                        respond(StatusCode::OK, "application/json", json)
                    }
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot encode the config dump: {e}\n"),
                    ),
                }
            }),
            _ => h
                .extra(server, req)
                .unwrap_or_else(|| text(StatusCode::NOT_FOUND, format!("no such path: {path}\n"))),
        }
    }
}

/// Runs `ok` if the request's method is `allowed`, else answers 405 with `Allow`.
pub fn only(req: &Request<Incoming>, allowed: &Method, ok: impl FnOnce() -> Reply) -> Reply {
    if req.method() == allowed {
        return ok();
    }
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, format!("use {allowed}\n"));
    if let Ok(v) = header::HeaderValue::from_str(allowed.as_str()) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

/// A `text/plain` reply.
pub fn text(status: StatusCode, body: String) -> Reply {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
