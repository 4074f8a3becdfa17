//! The HBONE client: a pool of mTLS HTTP/2 connections that CONNECT streams are opened on.
//!
//! Owns: connection reuse per [`PoolKey`], sharing one handshake among concurrent callers,
//! the per-connection stream cap, idle and dead connection cleanup, and client keepalive.
//! Must not touch: how the TCP socket is made (the caller's [`Dialer`]) or which identities a
//! destination may have (the caller puts them in the key).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::Notify;

use super::stream::{H2Stream, StreamGuard};
use super::{
    CLIENT_MAX_HEADER_LIST_SIZE, CONNECTION_WINDOW, HboneError, MAX_FRAME_SIZE, PING_INTERVAL,
    PING_TIMEOUT, STREAM_WINDOW,
};
use crate::Identity;
use crate::tls::{self, WorkloadCert};

/// The future a [`Dialer`] returns.
pub type DialFuture = Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>>;

/// Opens the TCP connection under a tunnel.
///
/// ztunnel makes it inside the source pod's network namespace with the mesh socket mark;
/// tests simply `TcpStream::connect`:
///
/// ```
/// use std::sync::Arc;
/// use meshcore::hbone::Dialer;
/// let dial: Dialer = Arc::new(|addr| Box::pin(tokio::net::TcpStream::connect(addr)));
/// ```
pub type Dialer = Arc<dyn Fn(SocketAddr) -> DialFuture + Send + Sync>;

/// What makes two tunnels able to share a connection.
///
/// Streams share a connection only if everything here is equal: the same sockets owner, the
/// same client certificate identity, the same set of acceptable server identities, the same
/// destination address and the same destination instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Opaque: whose sockets these are (e.g. the source pod's uid), since the dialer may make
    /// them in that pod's network namespace.
    pub source: String,
    /// The identity the client certificate proves.
    pub src_identity: Identity,
    /// Identities the server may prove. The caller sorts them, so equal sets compare equal.
    pub dst_identities: Vec<Identity>,
    /// The HBONE address, usually `<pod or waypoint ip>:15008`.
    pub dst: SocketAddr,
    /// Opaque: which instance holds `dst` (a pod's uid; empty when the caller cannot tell). A
    /// pod given the address of one that is gone then never inherits that pod's connections,
    /// which may be dead without a word (its network namespace went with the pod) and would
    /// stall new streams until the keepalive gave up on them.
    pub dst_instance: String,
}

/// Pool tuning. [`Default`] gives Istio's values.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// A connection carrying this many live streams is full; new streams go to another one.
    pub max_streams_per_conn: usize,
    /// A connection with no live stream for this long is closed.
    pub idle_timeout: Duration,
    /// Limit for TCP connect + TLS handshake + HTTP/2 handshake.
    pub connect_timeout: Duration,
    /// Hand each connection's records to the kernel after the handshake (kTLS). Set it only
    /// where [`crate::ktls::probe`] found key updates; a socket that refuses the `tls` ULP
    /// still falls back to rustls in user space.
    pub kernel_tls: bool,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(5 * 60),
            connect_timeout: Duration::from_secs(10),
            kernel_tls: false,
        }
    }
}

/// One CONNECT to send.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The `:authority`: `<final destination ip>:<port>` or `<service hostname>:<port>`.
    pub authority: String,
    /// Extra request headers (`baggage`, `forwarded`, `traceparent`, ...).
    pub headers: http::HeaderMap,
}

/// A pool of HBONE client connections. Cloning is cheap and clones share the pool.
///
/// ```no_run
/// # async fn example(cert: std::sync::Arc<meshcore::tls::WorkloadCert>, key: meshcore::hbone::PoolKey)
/// # -> Result<(), meshcore::hbone::HboneError> {
/// use std::sync::Arc;
/// use meshcore::hbone::{ConnectRequest, Dialer, Pool, PoolSettings};
/// let pool = Pool::new(PoolSettings::default());
/// let dial: Dialer = Arc::new(|addr| Box::pin(tokio::net::TcpStream::connect(addr)));
/// let req = ConnectRequest { authority: "10.0.0.7:8080".into(), headers: http::HeaderMap::new() };
/// let mut tunnel = pool.connect(key, cert, dial, req).await?;
/// // `tunnel` is an AsyncRead + AsyncWrite byte stream to 10.0.0.7:8080.
/// # let _ = &mut tunnel; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.inner.settings)
            .field("connections", &self.connection_count())
            .finish()
    }
}

struct PoolInner {
    settings: PoolSettings,
    keys: Mutex<HashMap<PoolKey, KeyState>>,
    next_id: AtomicU64,
}

/// The result every waiter of one handshake sees. Errors are behind an `Arc` because a shared
/// future's output must be `Clone`; each waiter gets its own copy via `duplicate`.
type Handshake = Shared<BoxFuture<'static, Result<Arc<Conn>, Arc<HboneError>>>>;

#[derive(Default)]
struct KeyState {
    conns: Vec<Arc<Conn>>,
    /// The handshake in flight for this key, if any: callers that find no usable connection
    /// wait on it instead of starting their own.
    connecting: Option<Handshake>,
}

/// One pooled HTTP/2 connection.
struct Conn {
    id: u64,
    send: h2::client::SendRequest<Bytes>,
    /// Streams reserved or alive on this connection.
    active: AtomicUsize,
    /// Bumped each time `active` drops to 0, so the idle timer can tell "idle since" apart.
    idle_epoch: AtomicU64,
    /// Woken when `active` drops to 0.
    went_idle: Notify,
    /// Set (under the pool lock) when the connection leaves the pool.
    dead: AtomicBool,
}

impl Conn {
    fn release(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_epoch.fetch_add(1, Ordering::AcqRel);
            self.went_idle.notify_waiters();
        }
    }
}

/// What `connect` decided to do while holding the lock.
enum Step {
    Use(Arc<Conn>),
    Wait(Handshake),
}

impl Pool {
    /// An empty pool.
    pub fn new(settings: PoolSettings) -> Self {
        Pool {
            inner: Arc::new(PoolInner {
                settings,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Opens a CONNECT stream to `req.authority` over a pooled connection for `key`.
    ///
    /// A new connection is made with `dial(key.dst)`, then TLS with
    /// [`tls::client_config`]`(cert, &key.dst_identities)` (ALPN h2), then HTTP/2 with Istio's
    /// settings. How connections are shared:
    ///
    /// - Callers for a key with no usable connection share **one** handshake at a time: a
    ///   burst of 200 concurrent connects with `max_streams_per_conn` 100 opens exactly two
    ///   connections, one after the other. A caller never gets a connection past that limit:
    ///   h2 would queue such a stream until a live one ends, which may be never.
    /// - An established connection carrying `max_streams_per_conn` live streams is full; a
    ///   caller finding only full connections opens a new one.
    /// - Dead connections (GOAWAY, error, PING timeout) leave the pool; connections with no
    ///   live stream for `idle_timeout` are closed.
    ///
    /// A reply other than 200 gives [`HboneError::Status`].
    pub async fn connect(
        &self,
        key: PoolKey,
        cert: Arc<WorkloadCert>,
        dial: Dialer,
        req: ConnectRequest,
    ) -> Result<H2Stream, HboneError> {
        let request = build_request(&req)?;
        // One retry: a pooled connection can die between checkout and use (GOAWAY in flight).
        let mut attempts = 0;
        loop {
            attempts += 1;
            let conn = self.checkout(&key, &cert, &dial).await?;
            let inner = Arc::clone(&self.inner);
            let guard_conn = Arc::clone(&conn);
            let guard = StreamGuard::new(move || guard_conn.release());
            match open_stream(&conn, request.clone()).await {
                Ok((status, send, recv)) if status == http::StatusCode::OK => {
                    return Ok(H2Stream::new(send, recv, Some(guard)));
                }
                Ok((status, _, _)) => return Err(HboneError::Status(status)),
                Err(e) => {
                    drop(guard);
                    // The stream never got an answer: if the connection is the problem, drop it
                    // from the pool so nobody else picks it.
                    if is_conn_level(&e) {
                        inner.remove(&key, &conn);
                    }
                    if attempts >= 2 || !retryable(&e) {
                        return Err(e);
                    }
                    tracing::debug!(conn = conn.id, error = %e, "HBONE stream failed on pooled connection; retrying");
                }
            }
        }
    }

    /// How many connections the pool holds now (tests, metrics).
    pub fn connection_count(&self) -> usize {
        self.inner.lock().values().map(|s| s.conns.len()).sum()
    }

    /// Finds or makes a connection for `key` and reserves one stream on it.
    async fn checkout(
        &self,
        key: &PoolKey,
        cert: &Arc<WorkloadCert>,
        dial: &Dialer,
    ) -> Result<Arc<Conn>, HboneError> {
        loop {
            let step = {
                let mut keys = self.inner.lock();
                let state = keys.entry(key.clone()).or_default();
                let max = self.inner.settings.max_streams_per_conn.max(1);
                // Least loaded first keeps streams spread over the connections we have.
                let best = state
                    .conns
                    .iter()
                    .filter(|c| c.active.load(Ordering::Acquire) < max)
                    .min_by_key(|c| c.active.load(Ordering::Acquire));
                match (best, &state.connecting) {
                    (Some(conn), _) => {
                        // Reserved under the lock, so the idle closer cannot race us.
                        conn.active.fetch_add(1, Ordering::AcqRel);
                        Step::Use(Arc::clone(conn))
                    }
                    (None, Some(handshake)) => Step::Wait(handshake.clone()),
                    (None, None) => {
                        let handshake =
                            self.start_handshake(key.clone(), Arc::clone(cert), Arc::clone(dial));
                        state.connecting = Some(handshake.clone());
                        Step::Wait(handshake)
                    }
                }
            };
            match step {
                Step::Use(conn) => return Ok(conn),
                Step::Wait(handshake) => {
                    let conn = handshake.await.map_err(|e| e.duplicate())?;
                    let _keys = self.inner.lock();
                    // The connection may have died (or idled out) between the handshake and now,
                    // or the burst that waited with us filled it: then look again (and make
                    // another). Streams past the server's limit would queue inside h2 until a
                    // live one ends, which for long-lived connections is never.
                    let max = self.inner.settings.max_streams_per_conn.max(1);
                    if !conn.dead.load(Ordering::Acquire)
                        && conn.active.load(Ordering::Acquire) < max
                    {
                        conn.active.fetch_add(1, Ordering::AcqRel);
                        return Ok(conn);
                    }
                }
            }
        }
    }

    /// Starts a handshake on its own task, so it completes (and lands in the pool) even if the
    /// caller that started it gives up.
    fn start_handshake(&self, key: PoolKey, cert: Arc<WorkloadCert>, dial: Dialer) -> Handshake {
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(async move {
            let timeout = inner.settings.connect_timeout;
            let kernel_tls = inner.settings.kernel_tls;
            let result = match tokio::time::timeout(
                timeout,
                handshake(&key, &cert, &dial, kernel_tls),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(HboneError::Timeout),
            };
            let mut keys = inner.lock();
            let state = keys.entry(key.clone()).or_default();
            state.connecting = None;
            match result {
                Ok((send, connection)) => {
                    let conn = Arc::new(Conn {
                        id: inner.next_id.fetch_add(1, Ordering::Relaxed),
                        send,
                        active: AtomicUsize::new(0),
                        idle_epoch: AtomicU64::new(0),
                        went_idle: Notify::new(),
                        dead: AtomicBool::new(false),
                    });
                    state.conns.push(Arc::clone(&conn));
                    drop(keys);
                    tracing::debug!(conn = conn.id, dst = %key.dst, "HBONE connection established");
                    tokio::spawn(drive(
                        Arc::clone(&inner),
                        key,
                        Arc::clone(&conn),
                        connection,
                    ));
                    Ok(conn)
                }
                Err(e) => {
                    if state.conns.is_empty() {
                        keys.remove(&key);
                    }
                    tracing::debug!(dst = %key.dst, error = %e, "HBONE connect failed");
                    Err(Arc::new(e))
                }
            }
        });
        async move {
            match task.await {
                Ok(r) => r,
                Err(join) => Err(Arc::new(HboneError::Io(std::io::Error::other(format!(
                    "HBONE connect task: {join}"
                ))))),
            }
        }
        .boxed()
        .shared()
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, KeyState>> {
        // A panic while holding the lock leaves plain data behind, still consistent enough to use.
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn remove(&self, key: &PoolKey, conn: &Arc<Conn>) {
        let mut keys = self.lock();
        Self::remove_locked(&mut keys, key, conn);
    }

    fn remove_locked(keys: &mut HashMap<PoolKey, KeyState>, key: &PoolKey, conn: &Arc<Conn>) {
        conn.dead.store(true, Ordering::Release);
        if let Some(state) = keys.get_mut(key) {
            state.conns.retain(|c| !Arc::ptr_eq(c, conn));
            if state.conns.is_empty() && state.connecting.is_none() {
                keys.remove(key);
            }
        }
    }
}

type Handshaken = (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<super::Transport, Bytes>,
);

/// TCP, then TLS (records sealed by the kernel where `kernel_tls` and the socket allow it),
/// then HTTP/2.
async fn handshake(
    key: &PoolKey,
    cert: &WorkloadCert,
    dial: &Dialer,
    kernel_tls: bool,
) -> Result<Handshaken, HboneError> {
    let config = tls::client_config(cert, &key.dst_identities)?;
    let tcp = dial(key.dst).await?;
    // Tunnels carry interactive traffic too; don't let Nagle hold back small writes.
    let _ = tcp.set_nodelay(true);
    let transport = if kernel_tls && super::kernel::attach(&tcp).is_ok() {
        let session =
            rustls::client::UnbufferedClientConnection::new(config, tls::dummy_server_name())
                .map_err(|e| HboneError::Tls(e.to_string()))?;
        let (stream, _) = super::kernel::handshake(tcp, session)
            .await
            .map_err(|e| HboneError::Tls(tls::describe_handshake_error(&e)))?;
        let mut wire = super::ReadAhead::new(stream);
        wire.allow_large_reads();
        super::Transport::Kernel(Box::new(wire))
    } else {
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(tls::dummy_server_name(), super::ReadAhead::new(tcp))
            .await
            .map_err(|e| HboneError::Tls(tls::describe_handshake_error(&e)))?;
        // Authenticated: bulk-sized reads and writes from now on.
        let (wire, session) = tls.get_mut();
        wire.allow_large_reads();
        session.set_buffer_limit(Some(super::TLS_SEND_BUFFER));
        super::Transport::User(Box::new(tokio_rustls::TlsStream::Client(tls)))
    };
    tracing::debug!(dst = %key.dst, records = transport.path(), "HBONE connection established");
    let result = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(super::STREAM_SEND_BUFFER)
        .max_header_list_size(CLIENT_MAX_HEADER_LIST_SIZE)
        .enable_push(false)
        .handshake::<_, Bytes>(transport)
        .await?;
    Ok(result)
}

/// Drives one connection until it fails, its keepalive fails, or it idles out; then takes it
/// out of the pool and closes it.
async fn drive(
    inner: Arc<PoolInner>,
    key: PoolKey,
    conn: Arc<Conn>,
    mut connection: h2::client::Connection<super::Transport, Bytes>,
) {
    let keepalive = match connection.ping_pong() {
        Some(pings) => super::keepalive(pings, PING_INTERVAL, PING_TIMEOUT).boxed(),
        None => futures::future::pending().boxed(),
    };
    tokio::pin!(keepalive);
    let idle_timeout = inner.settings.idle_timeout;
    loop {
        tokio::select! {
            result = &mut connection => {
                match result {
                    Ok(()) => tracing::debug!(conn = conn.id, "HBONE connection closed"),
                    Err(e) => tracing::debug!(conn = conn.id, error = %e, "HBONE connection failed"),
                }
                break;
            }
            e = &mut keepalive => {
                tracing::warn!(conn = conn.id, dst = %key.dst, error = %e, "HBONE connection keepalive failed; closing");
                break;
            }
            epoch = wait_idle(&conn, idle_timeout) => {
                let mut keys = inner.lock();
                // Still idle, and not briefly used in between: close. Checked under the lock
                // that checkout reserves under, so no stream can sneak in.
                if conn.active.load(Ordering::Acquire) == 0 && conn.idle_epoch.load(Ordering::Acquire) == epoch {
                    PoolInner::remove_locked(&mut keys, &key, &conn);
                    drop(keys);
                    tracing::debug!(conn = conn.id, "HBONE connection idle; closing");
                    // Dropping the h2 connection below closes the socket.
                    return;
                }
            }
        }
    }
    inner.remove(&key, &conn);
}

/// Waits until the connection has had no stream for `idle` and returns the idle epoch it saw.
async fn wait_idle(conn: &Conn, idle: Duration) -> u64 {
    loop {
        // Created before checking `active`, so a drop to 0 in between is not missed.
        let notified = conn.went_idle.notified();
        if conn.active.load(Ordering::Acquire) == 0 {
            let epoch = conn.idle_epoch.load(Ordering::Acquire);
            tokio::time::sleep(idle).await;
            return epoch;
        }
        notified.await;
    }
}

fn build_request(req: &ConnectRequest) -> Result<http::Request<()>, HboneError> {
    let authority: http::uri::Authority = req
        .authority
        .parse()
        .map_err(|e| HboneError::BadRequest(format!("authority {:?}: {e}", req.authority)))?;
    if authority.port_u16().is_none() {
        return Err(HboneError::BadRequest(format!(
            "authority {:?} has no port",
            req.authority
        )));
    }
    // An authority-only URI makes h2 send just `:method` and `:authority` for CONNECT
    // (no `:scheme`, no `:path`), the classic CONNECT form Istio speaks.
    let uri = http::Uri::from(authority);
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(uri)
        .body(())
        .map_err(|e| HboneError::BadRequest(e.to_string()))?;
    *request.headers_mut() = req.headers.clone();
    Ok(request)
}

async fn open_stream(
    conn: &Conn,
    request: http::Request<()>,
) -> Result<(http::StatusCode, h2::SendStream<Bytes>, h2::RecvStream), HboneError> {
    let mut send = conn.send.clone().ready().await?;
    let (response, stream) = send.send_request(request, false)?;
    let response = response.await?;
    let status = response.status();
    Ok((status, stream, response.into_body()))
}

/// Whether an error means the connection (not just this stream) is broken.
fn is_conn_level(e: &HboneError) -> bool {
    match e {
        HboneError::H2(h) => h.is_io() || h.is_go_away(),
        HboneError::Io(_) => true,
        _ => false,
    }
}

/// Whether trying again on another connection could help.
fn retryable(e: &HboneError) -> bool {
    match e {
        HboneError::H2(h) => {
            h.is_go_away() || h.is_io() || h.reason() == Some(h2::Reason::REFUSED_STREAM)
        }
        _ => false,
    }
}
