//! Connections to endpoints: HBONE streams (with the waypoint's own identity, expecting the
//! endpoint's) or plain TCP, and pooled HTTP client connections on them, under the
//! destination's `connectionPool` limits.
//!
//! HTTP/1.1: kept-alive connections per endpoint, one request at a time each; a connection
//! goes back to the pool once its response has been read to the end. A request that finds no
//! idle connection opens one if `maxConnections` (per destination, counted in `circuit`)
//! allows, else waits for one in a queue bounded by `http1MaxPendingRequests` — beyond it,
//! [`UpstreamError::Overflow`]. `maxRequestsPerConnection` closes a connection after that many
//! requests (1: no keep-alive), `idleTimeout` closes idle ones, `connectTimeout` bounds making
//! one. HTTP/2 (and so gRPC): one multiplexed connection per endpoint. TCP passthrough takes
//! its connections ([`Upstream::connect`]) under the same limits. Bodies stream both ways.
//! Owns the pools and the transport; not which endpoint (`balance`) nor what the request says
//! (`pipeline`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshcore::hbone::{ConnectRequest, Dialer, Pool, PoolKey};
use meshcore::route::resilience::ConnectionPool;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::balance::{Endpoint, HBONE_PORT, Transport};
use crate::circuit::{ConnSlot, Slots, Waiting};
use crate::own_cert::{CertError, OwnCert};
use crate::routing::Backend;

/// A request or response body as the pipeline passes it on.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A byte stream to an endpoint.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type BoxIo = Pin<Box<dyn Io>>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no certificate: {0}")]
    Cert(#[from] CertError),
    #[error("HBONE to {hbone} for {target}: {source}")]
    Hbone {
        hbone: SocketAddr,
        target: SocketAddr,
        source: meshcore::hbone::HboneError,
    },
    #[error("connect {0}: {1}")]
    Tcp(SocketAddr, std::io::Error),
    /// No connection within the destination's `connectTimeout`.
    #[error("connect {0}: no connection within {1:?} (DestinationRule connectTimeout)")]
    ConnectTimeout(SocketAddr, Duration),
    #[error("HTTP handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
    /// The request was sent (or being sent) and failed.
    #[error("upstream {0}: {1}")]
    Request(SocketAddr, hyper::Error),
    /// A connection-pool limit (maxConnections + http1MaxPendingRequests) overflowed: Envoy's
    /// `UO`, answered 503 with `x-envoy-overloaded` and never retried. Nothing reached the
    /// endpoint.
    #[error("upstream {0}: connection pool overflow")]
    Overflow(SocketAddr),
}

impl UpstreamError {
    /// Whether it failed before anything reached the endpoint (Envoy's `UF`).
    pub fn is_connect(&self) -> bool {
        !matches!(
            self,
            UpstreamError::Request(..) | UpstreamError::Overflow(..)
        )
    }
}

/// HTTP version spoken to the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

type Key = (SocketAddr, Transport);

/// The pools. Cheap to share behind an `Arc`.
pub struct Upstream {
    hbone: Pool,
    cert: OwnCert,
    dial: Dialer,
    destinations: Mutex<HashMap<Backend, Arc<Destination>>>,
}

/// One destination's connections and their limits' counters.
#[derive(Default)]
struct Destination {
    slots: Arc<Slots>,
    http1: Mutex<HashMap<Key, Vec<Http1>>>,
    /// One slot per endpoint; its lock is held while the connection is made, so concurrent
    /// first requests share one connection instead of racing to make several.
    http2: Mutex<HashMap<Key, Http2Slot>>,
}

/// A pooled HTTP/1.1 connection and what its driver task watches.
struct Http1 {
    sender: http1::SendRequest<Body>,
    state: Arc<ConnState>,
}

#[derive(Clone)]
struct Http2 {
    sender: http2::SendRequest<Body>,
    served: Arc<AtomicU32>,
}

type Http2Slot = Arc<tokio::sync::Mutex<Option<Http2>>>;

/// Shared by a connection's pool entry and its driver task.
#[derive(Default)]
struct ConnState {
    served: AtomicU32,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    since: Option<Instant>,
    /// The driver is closing it for idleness: never hand it out again.
    closing: bool,
}

/// Limit on connecting when no DestinationRule says (Istio's `connectTimeout` default).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle connections are closed after this when no DestinationRule says (Istio: 1 h).
const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_HTTP1: usize = 32;

/// A connection for TCP passthrough, counted under `maxConnections` while held, noting when
/// bytes last moved either way (for `tcp.idleTimeout`).
pub struct Connection {
    io: BoxIo,
    _slot: ConnSlot,
    opened: Instant,
    /// Milliseconds after `opened` that bytes last moved.
    active_at: Arc<AtomicU64>,
    idle_timeout: Duration,
}

impl Connection {
    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.active_at.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved either way for the destination's `tcp.idleTimeout`.
    pub fn idle(&self) -> impl Future<Output = ()> + Send + 'static {
        let (opened, active_at, timeout) = (self.opened, self.active_at.clone(), self.idle_timeout);
        async move {
            loop {
                let last = opened + Duration::from_millis(active_at.load(Ordering::Relaxed));
                let deadline = last + timeout;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline.into()).await;
            }
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.io.as_mut().poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = self.io.as_mut().poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}

impl Upstream {
    pub fn new(hbone: Pool, cert: OwnCert) -> Upstream {
        Upstream {
            hbone,
            cert,
            dial: Arc::new(|addr| Box::pin(tokio::net::TcpStream::connect(addr))),
            destinations: Mutex::default(),
        }
    }

    fn destination(&self, backend: &Backend) -> Arc<Destination> {
        let mut m = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(backend.clone()).or_default().clone()
    }

    /// A new byte stream to `ep`: an HBONE CONNECT to `<ip>:<port>` via `<ip>:15008`, or TCP,
    /// within Istio's default connect timeout.
    pub async fn open(&self, ep: &Endpoint) -> Result<BoxIo, UpstreamError> {
        self.open_within(ep, CONNECT_TIMEOUT).await
    }

    /// [`Upstream::open`] within `limit`.
    pub async fn open_within(
        &self,
        ep: &Endpoint,
        limit: Duration,
    ) -> Result<BoxIo, UpstreamError> {
        match tokio::time::timeout(limit, self.open_unbounded(ep)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::ConnectTimeout(ep.addr, limit)),
        }
    }

    async fn open_unbounded(&self, ep: &Endpoint) -> Result<BoxIo, UpstreamError> {
        match &ep.transport {
            Transport::Plain => {
                let tcp = tokio::net::TcpStream::connect(ep.addr)
                    .await
                    .map_err(|e| UpstreamError::Tcp(ep.addr, e))?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::pin(tcp))
            }
            Transport::Hbone { identity } => {
                let entry = self.cert.get().await?;
                let hbone = SocketAddr::new(ep.addr.ip(), HBONE_PORT);
                let key = PoolKey {
                    source: "waypoint".to_string(),
                    src_identity: entry.cert.identity.clone(),
                    dst_identities: vec![identity.clone()],
                    dst: hbone,
                    // Endpoints carry no pod uid here (see `PoolKey::dst_instance`).
                    dst_instance: String::new(),
                };
                let req = ConnectRequest {
                    authority: ep.addr.to_string(),
                    headers: http::HeaderMap::new(),
                };
                let stream = self
                    .hbone
                    .connect(key, entry.cert.clone(), self.dial.clone(), req)
                    .await
                    .map_err(|source| UpstreamError::Hbone {
                        hbone,
                        target: ep.addr,
                        source,
                    })?;
                Ok(Box::pin(stream))
            }
        }
    }

    /// A connection to `ep` for TCP passthrough under `pool`'s `maxConnections` (waiting, up
    /// to `http1MaxPendingRequests` others, for one to close), `connectTimeout` and
    /// `tcp.idleTimeout` (see [`Connection::idle`]).
    pub async fn connect(
        &self,
        ep: &Endpoint,
        pool: &ConnectionPool,
    ) -> Result<Connection, UpstreamError> {
        let dest = self.destination(&ep.destination);
        let mut waiting: Option<Waiting> = None;
        let slot = loop {
            let changed = dest.slots.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(slot) = dest.slots.open(ep.addr, pool.max_connections) {
                break slot;
            }
            if waiting.is_none() {
                waiting = Some(
                    dest.slots
                        .wait(pool.max_pending_requests)
                        .map_err(|_| UpstreamError::Overflow(ep.addr))?,
                );
            }
            changed.await;
        };
        drop(waiting);
        let io = self.open_within(ep, pool.connect_timeout).await?;
        Ok(Connection {
            io,
            _slot: slot,
            opened: Instant::now(),
            active_at: Arc::default(),
            idle_timeout: pool.tcp_idle_timeout,
        })
    }

    /// Sends one request to `ep` over a pooled connection of `version`, under the
    /// destination's connection-pool limits.
    pub async fn send(
        &self,
        ep: &Endpoint,
        version: Version,
        req: http::Request<Body>,
        pool: &ConnectionPool,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let dest = self.destination(&ep.destination);
        let key = (ep.addr, ep.transport.clone());
        match version {
            Version::Http1 => {
                let mut conn = self.http1_connection(&dest, ep, &key, pool).await?;
                conn.state.served.fetch_add(1, Ordering::AcqRel);
                let resp = conn
                    .sender
                    .send_request(req)
                    .await
                    .map_err(|e| UpstreamError::Request(ep.addr, e))?;
                recycle_http1(dest, key, conn, pool.max_requests_per_connection);
                Ok(resp)
            }
            Version::Http2 => {
                let slot = {
                    let mut m = dest.http2.lock().unwrap_or_else(|p| p.into_inner());
                    m.entry(key).or_default().clone()
                };
                let limit = pool.max_requests_per_connection;
                let Http2 { mut sender, served } = {
                    let mut conn = slot.lock().await;
                    let usable = conn.as_ref().filter(|c| {
                        !c.sender.is_closed()
                            && (limit == 0 || c.served.load(Ordering::Acquire) < limit)
                    });
                    match usable {
                        Some(c) => c.clone(),
                        None => {
                            // The old one (if any) closes once its last stream ends.
                            *conn = None;
                            let Some(cslot) = dest.slots.open(ep.addr, pool.max_connections) else {
                                return Err(UpstreamError::Overflow(ep.addr));
                            };
                            let c = self.new_http2(ep, cslot, pool).await?;
                            *conn = Some(c.clone());
                            c
                        }
                    }
                };
                served.fetch_add(1, Ordering::AcqRel);
                sender
                    .ready()
                    .await
                    .map_err(|e| UpstreamError::Request(ep.addr, e))?;
                sender
                    .send_request(req)
                    .await
                    .map_err(|e| UpstreamError::Request(ep.addr, e))
            }
        }
    }

    /// An idle connection to `ep`, a new one if `maxConnections` allows, or the first to be
    /// released while this request waits (if `http1MaxPendingRequests` lets it wait).
    async fn http1_connection(
        &self,
        dest: &Arc<Destination>,
        ep: &Endpoint,
        key: &Key,
        pool: &ConnectionPool,
    ) -> Result<Http1, UpstreamError> {
        let mut waiting: Option<Waiting> = None;
        loop {
            let changed = dest.slots.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(c) = dest.idle_http1(key) {
                return Ok(c);
            }
            if let Some(slot) = dest.slots.open(ep.addr, pool.max_connections) {
                drop(waiting);
                return self.new_http1(ep, slot, pool).await;
            }
            if waiting.is_none() {
                waiting = Some(
                    dest.slots
                        .wait(pool.max_pending_requests)
                        .map_err(|_| UpstreamError::Overflow(ep.addr))?,
                );
            }
            changed.await;
        }
    }

    /// Drops the pooled connections of endpoints for which `keep` is false (gone from the
    /// config): their HTTP/2 connections close once their last request ends.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        let dests: Vec<Arc<Destination>> = self
            .destinations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for d in dests {
            d.http1
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(addr, _), _| keep(addr));
            d.http2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(addr, _), _| keep(addr));
        }
    }

    /// Open connections and requests waiting for one, per destination, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let m = self.destinations.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .map(|(b, d)| {
                let (open, pending) = d.slots.counts();
                serde_json::json!({
                    "destination": format!("{b:?}"),
                    "connections": open,
                    "pending": pending,
                })
            })
            .collect()
    }

    async fn new_http1(
        &self,
        ep: &Endpoint,
        slot: ConnSlot,
        pool: &ConnectionPool,
    ) -> Result<Http1, UpstreamError> {
        let io = self.open_within(ep, pool.connect_timeout).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Handshake(ep.addr, e))?;
        let state = Arc::new(ConnState::default());
        let idle_timeout = pool.http_idle_timeout.unwrap_or(IDLE_TIMEOUT);
        tokio::spawn(drive_http1(
            ep.addr,
            conn,
            slot,
            state.clone(),
            idle_timeout,
        ));
        Ok(Http1 { sender, state })
    }

    async fn new_http2(
        &self,
        ep: &Endpoint,
        slot: ConnSlot,
        pool: &ConnectionPool,
    ) -> Result<Http2, UpstreamError> {
        let io = self.open_within(ep, pool.connect_timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Handshake(ep.addr, e))?;
        let addr = ep.addr;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                debug!(upstream = %addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(Http2 {
            sender,
            served: Arc::default(),
        })
    }
}

impl Destination {
    fn idle_http1(&self, key: &Key) -> Option<Http1> {
        let mut m = self.http1.lock().unwrap_or_else(|p| p.into_inner());
        let idle = m.get_mut(key)?;
        while let Some(c) = idle.pop() {
            let mut i = c.state.idle.lock().unwrap_or_else(|p| p.into_inner());
            if i.closing || !c.sender.is_ready() {
                continue;
            }
            i.since = None;
            drop(i);
            return Some(c);
        }
        None
    }
}

/// Back into the pool once the response has been read (hyper says ready), and the waiters
/// told; a connection that failed, was upgraded or served its `maxRequestsPerConnection` is
/// dropped instead (and closes).
fn recycle_http1(dest: Arc<Destination>, key: Key, mut conn: Http1, max_requests: u32) {
    tokio::spawn(async move {
        if conn.sender.ready().await.is_err() {
            return;
        }
        if max_requests != 0 && conn.state.served.load(Ordering::Acquire) >= max_requests {
            return;
        }
        conn.state
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .since = Some(Instant::now());
        {
            let mut m = dest.http1.lock().unwrap_or_else(|p| p.into_inner());
            let idle = m.entry(key).or_default();
            if idle.len() >= MAX_IDLE_HTTP1 {
                return;
            }
            idle.push(conn);
        }
        dest.slots.released();
    });
}

/// Runs one HTTP/1.1 connection, holding its place under `maxConnections`, and closes it once
/// it has been idle for `idle_timeout`.
async fn drive_http1<T>(
    addr: SocketAddr,
    conn: http1::Connection<TokioIo<T>, Body>,
    _slot: ConnSlot,
    state: Arc<ConnState>,
    idle_timeout: Duration,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = conn.with_upgrades();
    tokio::pin!(conn);
    let mut check_in = idle_timeout;
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    debug!(upstream = %addr, error = %e, "upstream HTTP/1.1 connection ended");
                }
                return;
            }
            _ = tokio::time::sleep(check_in) => {
                let mut idle = state.idle.lock().unwrap_or_else(|p| p.into_inner());
                match idle.since.map(|t| t.elapsed()) {
                    Some(e) if e >= idle_timeout => {
                        idle.closing = true;
                        debug!(upstream = %addr, "closing idle upstream HTTP/1.1 connection");
                        return;
                    }
                    Some(e) => check_in = idle_timeout - e,
                    None => check_in = idle_timeout,
                }
            }
        }
    }
}
