//! ztunnel's three small HTTP/1.1 servers: metrics, readiness and admin.
//!
//! | port (Istio's)        | path                      | answer                                       |
//! |-----------------------|---------------------------|----------------------------------------------|
//! | metrics, 15020        | `GET /metrics`            | Prometheus scrape ([`crate::metrics`])       |
//! | readiness, 15021      | `GET /healthz/ready`      | 200 `ready`, or 503 with the reason          |
//! | admin, 127.0.0.1:15000| `GET /config_dump`        | the JSON config dump                         |
//! |                       | `POST /logging?level=F`   | 200 with the new filter, or 400 with why     |
//!
//! Any other path is 404; a known path with the wrong method is 405 (with `Allow`).
//!
//! Owns only the listeners and the routing. *What* readiness, the config dump and the log filter
//! mean is supplied by the caller as closures in [`AdminState`]; this module never reaches into
//! the proxy paths, certificates or config. The admin port can change logging and reveals the
//! whole config, so bind it to loopback; the metrics and readiness ports are meant to be reached
//! by the kubelet and Prometheus — and so can be reached by any pod: a client that connects and
//! sends nothing must not starve them. Each server accepts every connection and closes at once
//! what is over its caps ([`MAX_CONNECTIONS`] in all, [`MAX_CONNECTIONS_PER_SOURCE`] per
//! source IP, so one idle client cannot take every slot), and closes a connection that has not
//! sent a request within its header timeout (2 s on the metrics and readiness ports); readiness
//! answers with `Connection: close`, as probes open a connection per check.

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
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::limits::{Gate, LOG_PERIOD, Throttle};
use crate::metrics::{self, Metrics};

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

/// Answers readiness: `Ok(())` when ready, else `Err(reason)`.
pub type ReadyFn = Box<dyn Fn() -> Result<(), String> + Send + Sync>;
/// Produces the JSON config dump.
pub type ConfigDumpFn = Box<dyn Fn() -> serde_json::Value + Send + Sync>;
/// Applies a log filter: `Ok(())` once applied, else `Err(reason)` (invalid filter).
pub type SetLogLevelFn = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the servers answer with. The closures are the caller's; they are called per request
/// (from any thread), so keep them quick and non-blocking.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Whether ztunnel is ready (config received and certificates in for all enrolled pods):
    /// `Err(reason)` while not.
    pub ready: ReadyFn,
    /// The JSON config dump (workloads, services, policies with their effective L4 form,
    /// certificates with expiry, capture mode per pod).
    pub config_dump: ConfigDumpFn,
    /// Changes the log filter at runtime (e.g. `"debug"`, `"ztunnel=debug,info"`):
    /// `Err(reason)` if the filter is invalid.
    pub set_log_level: SetLogLevelFn,
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

/// Which of the three servers (they route differently).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Admin,
    Metrics,
    Ready,
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Server::Admin => "admin",
            Server::Metrics => "metrics",
            Server::Ready => "readiness",
        })
    }
}

/// Binds all three servers, then serves them until the task is dropped.
///
/// Returns only on a binding error (which names the server and address). Use [`bind`] instead
/// when the bound addresses must be known (e.g. port 0 in tests).
pub async fn serve(
    state: Arc<AdminState>,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    ready_addr: SocketAddr,
) -> Result<(), AdminError> {
    bind(state, admin_addr, metrics_addr, ready_addr)
        .await?
        .run()
        .await;
    Ok(())
}

/// Binds all three listeners (all or nothing) without serving yet.
pub async fn bind(
    state: Arc<AdminState>,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    ready_addr: SocketAddr,
) -> Result<Bound, AdminError> {
    let admin = listen(Server::Admin, admin_addr).await?;
    let metrics = listen(Server::Metrics, metrics_addr).await?;
    let ready = listen(Server::Ready, ready_addr).await?;
    Ok(Bound {
        state,
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

/// The three bound listeners, ready to [`run`](Bound::run).
pub struct Bound {
    state: Arc<AdminState>,
    admin: TcpListener,
    metrics: TcpListener,
    ready: TcpListener,
}

impl Bound {
    /// The address the admin server is bound to.
    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// The address the metrics server is bound to.
    pub fn metrics_addr(&self) -> io::Result<SocketAddr> {
        self.metrics.local_addr()
    }

    /// The address the readiness server is bound to.
    pub fn ready_addr(&self) -> io::Result<SocketAddr> {
        self.ready.local_addr()
    }

    /// Serves all three until this future is dropped. Accept errors (e.g. out of file
    /// descriptors) are logged and retried after a pause; they never stop a server.
    pub async fn run(self) {
        let Bound {
            state,
            admin,
            metrics,
            ready,
        } = self;
        tokio::join!(
            accept_loop(Server::Admin, admin, Arc::clone(&state)),
            accept_loop(Server::Metrics, metrics, Arc::clone(&state)),
            accept_loop(Server::Ready, ready, state),
        );
    }
}

async fn accept_loop(server: Server, listener: TcpListener, state: Arc<AdminState>) {
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
        let state = Arc::clone(&state);
        let builder = Arc::clone(&builder);
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(server, &state, &req)) }
            });
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                debug!(%server, %peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Answers one request. Never fails: every outcome is an HTTP status.
fn route(server: Server, state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (server, path) {
        (Server::Metrics, "/metrics") => only(req, &Method::GET, || {
            respond(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                state.metrics.encode(),
            )
        }),
        (Server::Ready, "/healthz/ready") => only(req, &Method::GET, || match (state.ready)() {
            Ok(()) => text(StatusCode::OK, "ready\n".to_string()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        }),
        (Server::Admin, "/config_dump") => only(req, &Method::GET, || {
            match serde_json::to_string_pretty(&(state.config_dump)()) {
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
        (Server::Admin, "/logging") => {
            only(req, &Method::POST, || logging(state, req.uri().query()))
        }
        _ => text(StatusCode::NOT_FOUND, format!("no such path: {path}\n")),
    }
}

/// `POST /logging?level=<filter>`: hands the (percent-decoded) filter to the caller's closure.
fn logging(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let level = match query_param(query.unwrap_or(""), "level") {
        Some(Ok(level)) if !level.is_empty() => level,
        Some(Ok(_)) | None => {
            return text(
                StatusCode::BAD_REQUEST,
                "missing ?level=<filter>, e.g. ?level=ztunnel=debug,info\n".to_string(),
            );
        }
        Some(Err(e)) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("bad level parameter: {e}\n"),
            );
        }
    };
    match (state.set_log_level)(&level) {
        Ok(()) => {
            info!(%level, "log filter changed over the admin port");
            text(StatusCode::OK, format!("log level set to {level}\n"))
        }
        Err(reason) => text(
            StatusCode::BAD_REQUEST,
            format!("invalid log level {level:?}: {reason}\n"),
        ),
    }
}

/// Runs `ok` if the request's method is `allowed`, else answers 405 with `Allow`.
fn only(
    req: &Request<Incoming>,
    allowed: &Method,
    ok: impl FnOnce() -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    if req.method() == allowed {
        return ok();
    }
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, format!("use {allowed}\n"));
    if let Ok(v) = header::HeaderValue::from_str(allowed.as_str()) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Why a query parameter could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("malformed percent-escape in {0:?}")]
    BadEscape(String),
    #[error("not UTF-8 after percent-decoding")]
    NotUtf8,
}

/// The first value of `name` in a query string (`a=1&b=2`), form-decoded (`%XX`, `+` → space).
///
/// Only the first `=` separates key from value, so an unescaped filter such as
/// `level=ztunnel=debug,info` works as well as its escaped form.
pub fn query_param(query: &str, name: &str) -> Option<Result<String, QueryError>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(key).ok()? == name).then(|| form_decode(value))
    })
}

fn form_decode(s: &str) -> Result<String, QueryError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                    return Err(QueryError::BadEscape(s.to_string()));
                };
                let (Some(hi), Some(lo)) = (hex_digit(hi), hex_digit(lo)) else {
                    return Err(QueryError::BadEscape(s.to_string()));
                };
                out.push(hi << 4 | lo);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8)
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_param_decodes() {
        assert_eq!(
            query_param("level=debug", "level"),
            Some(Ok("debug".into()))
        );
        assert_eq!(
            query_param("x=1&level=ztunnel=debug,info", "level"),
            Some(Ok("ztunnel=debug,info".into()))
        );
        assert_eq!(
            query_param("level=ztunnel%3Ddebug%2Cinfo", "level"),
            Some(Ok("ztunnel=debug,info".into()))
        );
        assert_eq!(query_param("level=a+b", "level"), Some(Ok("a b".into())));
        assert_eq!(query_param("other=1", "level"), None);
        assert_eq!(query_param("level", "level"), Some(Ok(String::new())));
        assert!(matches!(
            query_param("level=%zz", "level"),
            Some(Err(QueryError::BadEscape(_)))
        ));
        assert!(matches!(
            query_param("level=%4", "level"),
            Some(Err(QueryError::BadEscape(_)))
        ));
        assert!(matches!(
            query_param("level=%+1", "level"),
            Some(Err(QueryError::BadEscape(_)))
        ));
        assert_eq!(
            query_param("level=%ff", "level"),
            Some(Err(QueryError::NotUtf8))
        );
        // A multi-byte character right after '%' must not panic on a char boundary.
        assert!(matches!(
            query_param("level=%é", "level"),
            Some(Err(QueryError::BadEscape(_)))
        ));
    }
}
