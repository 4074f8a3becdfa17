//! The HTTPS front: accepting connections (and cutting them all for `go_down`), TLS, bearer
//! authentication, the failure/hold hooks, the request log, the body cap, and routing a path
//! to discovery or to a resource handler. The verbs themselves live in `handlers`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::errors::ApiErr;
use super::hooks::Hooks;
use super::store::State;
use super::{ApiOptions, RequestRecord, meta, routing};

pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Body = BoxBody<Bytes, BodyError>;

/// Request bodies above this are refused (the real server's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// How much of an oversized body is read and dropped before the connection is given up.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// Everything the server tasks and the Rust API share.
pub(crate) struct Shared {
    state: Mutex<State>,
    pub opts: ApiOptions,
    pub admin_token: String,
    pub hooks: Hooks,
    /// `drop_watches`: (generation, clean).
    pub drop_tx: watch::Sender<(u64, bool)>,
    /// `go_down`: bumping it cuts every open connection.
    pub down_tx: watch::Sender<u64>,
    pub watchers: AtomicUsize,
    /// `enforce_rbac`: service-account tokens are authorized by `rbac`.
    pub rbac: AtomicBool,
    /// Open connections (`go_down` waits for none).
    pub connections: AtomicUsize,
}

impl Shared {
    pub fn new(opts: ApiOptions, state: State, admin_token: String) -> Self {
        Shared {
            state: Mutex::new(state),
            opts,
            admin_token,
            hooks: Hooks::new(),
            drop_tx: watch::channel((0, true)).0,
            down_tx: watch::channel(0).0,
            watchers: AtomicUsize::new(0),
            rbac: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        }
    }

    /// The store; a panic while holding it (a bug) must not wedge every later request.
    pub fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one request is, after parsing (handlers read it).
pub(crate) struct Req {
    pub method: http::Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub user_agent: String,
    pub body: Bytes,
    /// Who the bearer token authenticated (`admin` or a service account's username).
    pub user: String,
}

impl Req {
    pub fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }
    pub fn flag(&self, k: &str) -> bool {
        matches!(self.q(k), Some("true" | "1"))
    }
    /// `fieldManager`, else what the real server derives from the User-Agent.
    pub fn manager(&self) -> String {
        match self.q("fieldManager") {
            Some(m) if !m.is_empty() => m.to_string(),
            _ => {
                let ua = self.user_agent.split('/').next().unwrap_or_default();
                if ua.is_empty() {
                    "unknown".into()
                } else {
                    ua.chars().take(128).collect()
                }
            }
        }
    }
}

pub(crate) fn json(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(v.to_string()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn error(e: &ApiErr) -> Response<Body> {
    let mut r = json(e.code, &e.status());
    if e.code == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

/// A streamed 200 (watch).
pub(crate) fn streaming(
    rx: tokio::sync::mpsc::Receiver<Result<hyper::body::Frame<Bytes>, BodyError>>,
) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Binds `127.0.0.1:port` (0: any) with SO_REUSEADDR so `come_back` gets the same port.
pub(crate) fn bind(port: u16) -> std::io::Result<TcpListener> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind((std::net::Ipv4Addr::LOCALHOST, port).into())?;
    sock.listen(1024)
}

/// Counts a connection until its task ends.
struct Counted(Arc<Shared>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, tls: TlsAcceptor) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "kubeapi double: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (shared, tls) = (shared.clone(), tls.clone());
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let counted = Counted(shared.clone());
        // Subscribed before the task runs, so a go_down from now on reaches it.
        let mut down = shared.down_tx.subscribe();
        tokio::spawn(async move {
            let _counted = counted;
            let serve = async {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(shared, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            };
            tokio::select! {
                _ = serve => {}
                _ = down.changed() => {}
            }
        });
    }
}

/// Who the bearer token authenticates: (user, bound pod).
fn authenticate(shared: &Shared, req: &Request<Incoming>) -> Option<(String, Option<String>)> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .trim();
    if token == shared.admin_token {
        return Some(("admin".into(), None));
    }
    let user = shared.lock_state().tokens.user(token, meta::now_unix())?;
    Some((user.username, user.pod))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or_default().to_string();
    let query = routing::parse_query(&raw_query);
    let mut rec = RequestRecord {
        method: method.clone(),
        path: path.clone(),
        query: raw_query,
        user: String::new(),
        pod: None,
        field_manager: query.get("fieldManager").cloned(),
        code: 0,
    };
    let resp = match authenticate(&shared, &req) {
        None => error(&ApiErr::new(401, "Unauthorized", "Unauthorized")),
        Some((user, pod)) => {
            rec.user = user;
            rec.pod = pod;
            if let Some(code) = shared.hooks.failure(&method, &path) {
                error(&ApiErr::for_code(code))
            } else {
                shared.hooks.wait_unheld(&method, &path).await;
                match read(req, path.clone(), query, rec.user.clone()).await {
                    Ok(r) => routing::route(&shared, r).unwrap_or_else(|e| error(&e)),
                    Err(e) => error(&e),
                }
            }
        }
    };
    rec.code = resp.status().as_u16();
    tracing::debug!(method = %rec.method, path = %rec.path, code = rec.code, "kubeapi double");
    shared.hooks.log(rec);
    resp
}

async fn read(
    req: Request<Incoming>,
    path: String,
    query: BTreeMap<String, String>,
    user: String,
) -> Result<Req, ApiErr> {
    let header_text = |h: header::HeaderName| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let content_type = header_text(header::CONTENT_TYPE);
    let user_agent = header_text(header::USER_AGENT);
    let method = req.method().clone();
    let body = read_body(req.into_body()).await?;
    Ok(Req {
        method,
        path,
        query,
        content_type,
        user_agent,
        body,
        user,
    })
}

/// The body, up to [`MAX_BODY`]. A larger one is read on (up to [`DRAIN_LIMIT`]) and
/// discarded so the client, still sending, gets the 413 instead of a reset connection.
async fn read_body(mut body: Incoming) -> Result<Bytes, ApiErr> {
    let mut buf = bytes::BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiErr::bad_request(format!("reading the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= MAX_BODY {
                buf.extend_from_slice(&data);
            } else if total > DRAIN_LIMIT {
                break;
            }
        }
    }
    if total > MAX_BODY {
        return Err(ApiErr::new(
            413,
            "RequestEntityTooLarge",
            "the request body is too large (limit 3 MiB)",
        ));
    }
    Ok(buf.freeze())
}
