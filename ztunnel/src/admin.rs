//! ztunnel's admin endpoints on the shared servers of [`dataplane::admin`] (metrics 15020,
//! readiness 15021, admin 127.0.0.1:15000 with `GET /config_dump`), plus ztunnel's own path:
//!
//! | port                   | path                      | answer                                   |
//! |------------------------|---------------------------|------------------------------------------|
//! | admin, 127.0.0.1:15000 | `POST /logging?level=F`   | 200 with the new filter, or 400 with why |
//!
//! Owns only the mapping of ztunnel's closures ([`AdminState`]) onto [`Handler`]; the
//! listeners, caps and common routes are `dataplane::admin`'s. *What* readiness, the config
//! dump and the log filter mean is the caller's. The admin port can change logging and reveals
//! the whole config, so bind it to loopback.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use dataplane::admin::{Handler, Listeners, Reply, only, text};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use tracing::info;

use crate::metrics::Metrics;

pub use dataplane::admin::{AdminError, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE, Server};

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

impl Handler for AdminState {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }
    fn ready(&self) -> Result<(), String> {
        (self.ready)()
    }
    fn config_dump(&self) -> serde_json::Value {
        (self.config_dump)()
    }
    fn extra(&self, server: Server, req: &Request<Incoming>) -> Option<Reply> {
        match (server, req.uri().path()) {
            (Server::Admin, "/logging") => Some(only(req, &Method::POST, || {
                logging(self, req.uri().query())
            })),
            _ => None,
        }
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
    let at = Listeners {
        admin: Some(admin_addr),
        metrics: metrics_addr,
        ready: ready_addr,
    };
    Ok(Bound(dataplane::admin::bind(state, at).await?))
}

/// The three bound listeners, ready to [`run`](Bound::run).
pub struct Bound(dataplane::admin::Bound);

impl Bound {
    fn addr(&self, server: Server) -> io::Result<SocketAddr> {
        self.0
            .addr(server)
            .unwrap_or_else(|| Err(io::Error::other("not bound")))
    }

    /// The address the admin server is bound to.
    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        self.addr(Server::Admin)
    }

    /// The address the metrics server is bound to.
    pub fn metrics_addr(&self) -> io::Result<SocketAddr> {
        self.addr(Server::Metrics)
    }

    /// The address the readiness server is bound to.
    pub fn ready_addr(&self) -> io::Result<SocketAddr> {
        self.addr(Server::Ready)
    }

    /// Serves all three until this future is dropped.
    pub async fn run(self) {
        self.0.run().await
    }
}

/// `POST /logging?level=<filter>`: hands the (percent-decoded) filter to the caller's closure.
fn logging(state: &AdminState, query: Option<&str>) -> Reply {
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
