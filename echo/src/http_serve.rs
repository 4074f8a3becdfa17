//! `serve --http-port` / `--grpc-port`: one hyper server per port (HTTP/1.1 with keep-alive and
//! HTTP/2 cleartext, told apart by the connection preface) that answers
//! - gRPC (`content-type: application/grpc*`) with the echo service (`grpc_serve`);
//! - a WebSocket upgrade (any path) with a WebSocket echo of every message;
//! - `/health` with `OK`, `/status/NNN` with status NNN (echo-basic's handlers);
//! - `/control` (GET: the pod's behaviour and request count; POST: set it, see
//!   `echo::Behaviour`), and the files of `serve --file` at their paths;
//! - everything else with echo-basic's JSON description of the request (`echo::RequestAssertions`),
//!   unless the pod's behaviour or the request's `x-echo-fail`/`x-echo-delay` say to delay, fail
//!   with a status, reset or stall.
//!
//! Owns the HTTP listeners and request dispatch; must not touch the line protocol (`serve`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use echo::{
    Behaviour, Failure, Overrides, RequestAssertions, STALL_LIMIT, canonical_header_key,
    echo_set_headers, normalize_addr,
};
use futures::{SinkExt as _, StreamExt as _};
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{debug, info, warn};

use crate::control::Control;
use crate::grpc_serve;

/// Response body type shared with `grpc_serve`.
pub type Body = BoxBody<Bytes, Infallible>;

/// Who this server is, as echo-basic reports it (from the pod's environment).
#[derive(Debug, Clone)]
pub struct Identity {
    pub pod: String,
    pub namespace: String,
    pub service: String,
    pub ingress: String,
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

pub async fn accept_loop(listener: TcpListener, id: Arc<Identity>, ctl: Arc<Control>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (id, ctl) = (id.clone(), ctl.clone());
                tokio::spawn(
                    async move { serve_conn(stream, normalize_addr(peer), id, ctl).await },
                );
            }
            Err(err) => {
                // E.g. EMFILE: back off briefly instead of spinning.
                warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Returned by the service to make hyper drop the connection (HTTP/1) or stream (HTTP/2)
/// without an answer.
#[derive(Debug, thiserror::Error)]
#[error("reset on demand")]
struct ResetOnDemand;

async fn serve_conn(stream: TcpStream, peer: SocketAddr, id: Arc<Identity>, ctl: Arc<Control>) {
    let local = match stream.local_addr() {
        Ok(addr) => normalize_addr(addr),
        Err(err) => {
            warn!(%peer, error = %err, "getsockname failed; dropping connection");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let sock = Arc::new(SockLinger(socket2::SockRef::from(&stream).try_clone().ok()));
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    let service = hyper::service::service_fn(move |req| {
        counter.fetch_add(1, Ordering::Relaxed);
        let (id, ctl, sock) = (id.clone(), ctl.clone(), sock.clone());
        async move {
            let resp = handle(req, &id, &ctl, local.port()).await;
            if resp.is_none() {
                // An RST rather than a FIN on HTTP/1: a reset the proxy must see as one.
                sock.abort_on_close();
            }
            resp.ok_or(ResetOnDemand)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let result = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
    let requests = requests.load(Ordering::Relaxed);
    match result {
        Ok(()) => info!(%peer, %local, mode = "http", requests, "connection closed"),
        Err(err) => info!(%peer, %local, mode = "http", requests, error = %err, "connection ended"),
    }
}

/// A duplicate of the connection's socket, kept to turn its close into an RST on demand.
struct SockLinger(Option<socket2::Socket>);

impl SockLinger {
    fn abort_on_close(&self) {
        if let Some(s) = &self.0 {
            let _ = s.set_linger(Some(Duration::ZERO));
        }
    }
}

/// `None`: reset instead of answering.
async fn handle(
    req: Request<Incoming>,
    id: &Identity,
    ctl: &Control,
    port: u16,
) -> Option<Response<Body>> {
    debug!(method = %req.method(), uri = %req.uri(), version = ?req.version(), "request");
    let route = req.uri().path().replace("//", "/");
    if route == "/control" {
        return Some(control(req, ctl).await);
    }
    if let Some(file) = ctl.file(&route) {
        return Some(serve_file(file).await);
    }
    if route != "/health" {
        let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
        let own = match Overrides::parse(
            header("x-echo-fail"),
            header("x-echo-delay"),
            req.uri().query(),
        ) {
            Ok(o) => o,
            Err(e) => return Some(text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
        };
        let plan = ctl.plan(own);
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        match plan.fail {
            Failure::None => {}
            Failure::Status(code) => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
                return Some(text(status, format!("failing on demand: {code}\n")));
            }
            Failure::Reset => return None,
            Failure::Stall => {
                tokio::time::sleep(STALL_LIMIT).await;
                return None;
            }
        }
    }
    Some(answer(req, id, &route, port).await)
}

/// `GET /control` reports the behaviour; `POST /control` replaces it and reports the new one.
async fn control(req: Request<Incoming>, ctl: &Control) -> Response<Body> {
    if req.method() == http::Method::POST {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading body: {e}\n")),
        };
        match Behaviour::from_json(&body) {
            Ok(b) => {
                info!(behaviour = %b.to_json(), "behaviour set over /control");
                ctl.set(b);
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        }
    }
    let mut resp = Response::new(full(ctl.report().to_string()));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

async fn serve_file(path: &std::path::Path) -> Response<Body> {
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            let mut resp = Response::new(full(bytes));
            if path.extension().is_some_and(|e| e == "json") {
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            resp
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading {}: {e}\n", path.display()),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp
}

async fn answer(
    mut req: Request<Incoming>,
    id: &Identity,
    route: &str,
    port: u16,
) -> Response<Body> {
    let is_grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        return grpc_serve::handle(req, id);
    }
    if let Some(key) = websocket_key(&req) {
        return websocket(&mut req, &key);
    }
    // echo-basic routes on the path with `//` collapsed (its preserveSlashes wrapper).
    if route == "/health" {
        return plain(StatusCode::OK, "OK");
    }
    if route.starts_with("/status/") {
        let code = echo::status_for_path(&request_uri(&req));
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
        return plain(status, "");
    }
    echo_reply(req, id, port).await
}

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp
}

/// Go's `r.RequestURI`: the target as sent (`:path` on HTTP/2).
fn request_uri<B>(req: &Request<B>) -> String {
    match (req.version(), req.uri().path_and_query()) {
        (Version::HTTP_2, Some(pq)) => pq.to_string(),
        _ => req.uri().to_string(),
    }
}

async fn echo_reply(req: Request<Incoming>, id: &Identity, port: u16) -> Response<Body> {
    let path = request_uri(&req);
    let (parts, mut body) = req.into_parts();
    // Streamed and counted, never held: chunked uploads of any size are fine.
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_bytes += data.len() as u64;
                }
            }
            Err(err) => {
                debug!(error = %err, "request body failed");
                return plain(StatusCode::BAD_REQUEST, "request body failed\n");
            }
        }
    }
    let host = match parts.uri.authority() {
        Some(auth) => auth.to_string(),
        None => parts
            .headers
            .get(HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .unwrap_or_default(),
    };
    let mut headers = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (name, value) in &parts.headers {
        // Go moves these out of r.Header (into r.Host / r.TransferEncoding).
        if name == HOST || name == TRANSFER_ENCODING {
            continue;
        }
        headers
            .entry(canonical_header_key(name.as_str()))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let reply = RequestAssertions {
        path,
        host,
        method: parts.method.to_string(),
        proto: proto_name(parts.version).to_owned(),
        headers,
        http_port: port.to_string(),
        namespace: id.namespace.clone(),
        ingress: id.ingress.clone(),
        service: id.service.clone(),
        pod: id.pod.clone(),
        body_bytes,
    };
    let mut resp = Response::new(full(reply.to_json_pretty()));
    let asked = parts
        .headers
        .get_all("x-echo-set-header")
        .iter()
        .filter_map(|v| v.to_str().ok());
    for (name, value) in echo_set_headers(asked) {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            // Append: echo-basic merges only same-case names; others go out as separate lines.
            (Ok(name), Ok(value)) => {
                resp.headers_mut().append(name, value);
            }
            _ => debug!(%name, "X-Echo-Set-Header names an invalid header; skipped"),
        }
    }
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn proto_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// `Sec-WebSocket-Key` of an HTTP/1.1 WebSocket upgrade request (RFC 6455 §4.2.1).
fn websocket_key<B>(req: &Request<B>) -> Option<HeaderValue> {
    let has_token = |name: HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !(has_token(UPGRADE, "websocket") && has_token(CONNECTION, "upgrade")) {
        return None;
    }
    req.headers().get("sec-websocket-key").cloned()
}

fn websocket(req: &mut Request<Incoming>, key: &HeaderValue) -> Response<Body> {
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(err) => {
                debug!(error = %err, "websocket upgrade failed");
                return;
            }
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let mut echoed = 0u64;
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(msg) if msg.is_text() || msg.is_binary() => {
                    echoed += 1;
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
                // Pings are answered and closes acknowledged by tungstenite itself.
                Ok(_) => {}
                Err(err) => {
                    debug!(error = %err, "websocket read failed");
                    break;
                }
            }
        }
        info!(echoed, "websocket closed");
    });
    let mut resp = plain(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert("sec-websocket-accept", accept);
    }
    resp
}
