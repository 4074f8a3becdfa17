//! The HBONE server side: one accepted TCP connection, served as mTLS + HTTP/2 CONNECT.
//!
//! Owns: the TLS accept, server HTTP/2 settings and keepalive, request validation (400 for
//! anything but a well-formed CONNECT), handing each CONNECT to the caller's handler, and what
//! one connection may cost: header size, handlers alive at once (the stream limit, even when the
//! client resets streams), cancelling a handler whose stream was reset before it answered, and
//! closing connections that carry no stream for a while.
//! Must not touch: listening sockets, policy, or the upstream connection — the handler decides
//! and does those.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use h2::RecvStream;
use h2::server::SendResponse;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::stream::H2Stream;
use super::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME_SIZE, PING_INTERVAL, PING_TIMEOUT, STREAM_WINDOW,
};
use crate::Identity;
use crate::tls;

/// Istio's server limit on a request's header block.
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// Server tuning. [`Default`] gives Istio's values.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Per-stream flow-control window (4 MiB).
    pub stream_window: u32,
    /// Per-connection flow-control window (16 MiB).
    pub connection_window: u32,
    /// Largest HTTP/2 frame we accept (1 MiB).
    pub max_frame_size: u32,
    /// Concurrent CONNECT streams a client may open on one connection (200).
    pub max_concurrent_streams: u32,
    /// How often we PING the client (10 s).
    pub ping_interval: Duration,
    /// How long a PING may go unanswered before we drop the connection (20 s).
    pub ping_timeout: Duration,
    /// Limit for the TLS + HTTP/2 handshakes of a new connection (10 s): an unauthenticated
    /// peer holds a socket no longer than this.
    pub handshake_timeout: Duration,
    /// Largest header block a client may send, in bytes (64 KiB, as Istio's ztunnel). h2's
    /// default (16 MiB) let one CONNECT pin megabytes while its handler waited.
    pub max_header_list_size: u32,
    /// A connection that carried no stream for this long gets a GOAWAY and closes (5 min 30 s:
    /// a little longer than our client pool's 5 min idle timeout, so a well-behaved client
    /// closes first and never races our GOAWAY).
    pub idle_timeout: Duration,
    /// Hand each connection's records to the kernel after the handshake (kTLS); see
    /// [`super::PoolSettings::kernel_tls`].
    pub kernel_tls: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            max_frame_size: MAX_FRAME_SIZE,
            max_concurrent_streams: 200,
            ping_interval: PING_INTERVAL,
            ping_timeout: PING_TIMEOUT,
            handshake_timeout: Duration::from_secs(10),
            max_header_list_size: MAX_HEADER_LIST_SIZE,
            idle_timeout: Duration::from_secs(5 * 60 + 30),
            kernel_tls: false,
        }
    }
}

/// One CONNECT request that arrived, before it is answered.
///
/// The handler must answer it: [`accept`](InboundRequest::accept) to open the tunnel, or
/// [`reject`](InboundRequest::reject) with 400 (bad request), 401 (denied by policy) or 503
/// (unknown workload, upstream failed). Dropping it unanswered resets the stream. If the client
/// resets the stream before it is answered, the handler's future is dropped (whatever it was
/// waiting for, e.g. a dial, is cancelled).
pub struct InboundRequest {
    /// The `:authority`: where the client wants to go (`ip:port` or `hostname:port`).
    pub authority: String,
    /// The request headers (`baggage`, `forwarded`, `traceparent`, ...).
    pub headers: http::HeaderMap,
    /// Who the client proved to be in the TLS handshake (shared by every stream of the
    /// connection).
    pub peer_identity: Arc<Identity>,
    /// The client's TCP address.
    pub peer_addr: SocketAddr,
    /// The address the client reached us at (the HBONE socket's local address), v4-mapped
    /// addresses canonicalised to IPv4.
    pub local_addr: SocketAddr,
    /// Shared with the watcher that cancels the handler on a reset; empty once answered.
    respond: Arc<Mutex<Option<SendResponse<Bytes>>>>,
    recv: Option<RecvStream>,
}

impl std::fmt::Debug for InboundRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundRequest")
            .field("authority", &self.authority)
            .field("peer_identity", &self.peer_identity)
            .field("peer_addr", &self.peer_addr)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl InboundRequest {
    /// Answers with `status` (e.g. 400, 401, 503) and ends the stream.
    pub fn reject(self, status: http::StatusCode) {
        if let Some(mut respond) = lock(&self.respond).take() {
            respond_empty(&mut respond, status);
        }
    }

    /// Answers 200 with `headers` and returns the tunnel's byte stream.
    pub fn accept(mut self, headers: http::HeaderMap) -> Result<H2Stream, HboneError> {
        let mut response = http::Response::new(());
        *response.headers_mut() = headers;
        let (Some(mut respond), Some(recv)) = (lock(&self.respond).take(), self.recv.take()) else {
            return Err(HboneError::H2(h2::Reason::STREAM_CLOSED.into()));
        };
        let send = respond.send_response(response, false)?;
        Ok(H2Stream::new(send, recv, None))
    }
}

impl Drop for InboundRequest {
    fn drop(&mut self) {
        // Unanswered: dropping the SendResponse resets the stream now, not when the watcher
        // (which shares it) goes away.
        drop(lock(&self.respond).take());
    }
}

/// The slot holds plain data; a panic elsewhere cannot leave it inconsistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Resolves when the client resets the stream (or the connection fails) while it is still
/// unanswered; never once the handler has answered.
async fn reset_before_answer(respond: Arc<Mutex<Option<SendResponse<Bytes>>>>) {
    std::future::poll_fn(|cx| match lock(&respond).as_mut() {
        Some(r) => r.poll_reset(cx).map(|_| ()),
        None => Poll::Pending,
    })
    .await
}

fn respond_empty(respond: &mut SendResponse<Bytes>, status: http::StatusCode) {
    let mut response = http::Response::new(());
    *response.status_mut() = status;
    if let Err(e) = respond.send_response(response, true) {
        // The client already went away; nobody is left to tell.
        tracing::debug!(error = %e, %status, "could not send HBONE response");
    }
}

/// Serves one accepted TCP connection until it ends.
///
/// TLS accept with `tls` (build it with [`tls::server_config`]), then HTTP/2 with `settings`.
/// Each request that is not a CONNECT, or has no `:authority`, is answered 400 without calling
/// `handler`; every other request is passed to `handler` on its own task.
///
/// ```no_run
/// # async fn example(listener: tokio::net::TcpListener, tls: std::sync::Arc<rustls::ServerConfig>) {
/// use meshcore::hbone::{serve_connection, ServerSettings};
/// loop {
///     let Ok((tcp, _)) = listener.accept().await else { continue };
///     let tls = tls.clone();
///     tokio::spawn(serve_connection(tcp, tls, ServerSettings::default(), |req| async move {
///         // Authorize `req.peer_identity` for `req.authority`, then:
///         if let Ok(mut tunnel) = req.accept(http::HeaderMap::new()) {
///             let _ = tokio::io::AsyncWriteExt::shutdown(&mut tunnel).await;
///         }
///     }));
/// }
/// # }
/// ```
pub async fn serve_connection<H, F>(
    tcp: tokio::net::TcpStream,
    tls: Arc<rustls::ServerConfig>,
    settings: ServerSettings,
    handler: H,
) -> Result<(), HboneError>
where
    H: Fn(InboundRequest) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    serve_connection_until(tcp, tls, settings, handler, std::future::pending()).await
}

/// [`serve_connection`], draining when `drain` resolves: the client gets a GOAWAY (its pool
/// then opens new streams elsewhere), streams already open run to their end, and the
/// connection closes after the last one.
pub async fn serve_connection_until<H, F, D>(
    tcp: tokio::net::TcpStream,
    tls: Arc<rustls::ServerConfig>,
    settings: ServerSettings,
    handler: H,
    drain: D,
) -> Result<(), HboneError>
where
    H: Fn(InboundRequest) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    serve_connection_limited(tcp, tls, settings, handler, drain, ()).await
}

/// [`serve_connection_until`], holding `handshake_slot` until the TLS and HTTP/2 handshakes
/// end (either way): the caller's token for a cap on handshakes in flight (e.g. a semaphore
/// permit). A failed or timed-out handshake is [`HboneError::is_before_authentication`].
pub async fn serve_connection_limited<H, F, D, G>(
    tcp: tokio::net::TcpStream,
    tls: Arc<rustls::ServerConfig>,
    settings: ServerSettings,
    handler: H,
    drain: D,
    handshake_slot: G,
) -> Result<(), HboneError>
where
    H: Fn(InboundRequest) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let peer_addr = tcp.peer_addr()?;
    let local_addr = tcp.local_addr()?;
    let local_addr = SocketAddr::new(local_addr.ip().to_canonical(), local_addr.port());
    let _ = tcp.set_nodelay(true);
    let handshaken =
        tokio::time::timeout(settings.handshake_timeout, handshake(tcp, tls, &settings)).await;
    drop(handshake_slot);
    let (peer_identity, mut connection) = match handshaken {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(%peer_addr, error = %e, "HBONE handshake failed");
            return Err(e);
        }
        Err(_) => return Err(HboneError::HandshakeTimeout),
    };
    tracing::debug!(%peer_addr, %peer_identity, "HBONE connection accepted");
    let peer_identity = Arc::new(peer_identity);

    let keepalive = match connection.ping_pong() {
        Some(pings) => {
            super::keepalive(pings, settings.ping_interval, settings.ping_timeout).boxed()
        }
        None => futures::future::pending().boxed(),
    };
    tokio::pin!(keepalive);
    tokio::pin!(drain);
    let mut draining = false;

    // One permit per live handler, as many as the streams we advertise: a client that resets
    // streams frees h2's slots at once, but never gets more handlers than that running.
    let limit = settings.max_concurrent_streams.max(1) as usize;
    let slots = Arc::new(Semaphore::new(limit));
    let last_activity = Arc::new(Mutex::new(Instant::now()));
    let idle = tokio::time::sleep(settings.idle_timeout);
    tokio::pin!(idle);

    loop {
        let accepted = tokio::select! {
            // Requests first: a connection that is closing normally should end as Ok.
            biased;
            accepted = connection.accept() => accepted,
            _ = &mut drain, if !draining => {
                tracing::debug!(%peer_addr, "HBONE connection draining: GOAWAY sent");
                connection.graceful_shutdown();
                draining = true;
                continue;
            }
            e = &mut keepalive => {
                tracing::debug!(%peer_addr, error = %e, "HBONE keepalive failed; closing connection");
                return Err(e);
            }
            _ = &mut idle, if !draining => {
                let since = *lock(&last_activity);
                if slots.available_permits() == limit && since.elapsed() >= settings.idle_timeout {
                    tracing::debug!(%peer_addr, "HBONE connection idle: GOAWAY sent");
                    connection.graceful_shutdown();
                    draining = true;
                } else {
                    // Busy, or busy until recently: look again one idle period after that.
                    let next = if slots.available_permits() == limit { since } else { Instant::now() };
                    idle.as_mut().reset(next + settings.idle_timeout);
                }
                continue;
            }
        };
        let (request, mut respond) = match accepted {
            None => return Ok(()),
            Some(Ok(r)) => r,
            Some(Err(e)) if is_normal_close(&e) => return Ok(()),
            Some(Err(e)) => return Err(HboneError::H2(e)),
        };
        *lock(&last_activity) = Instant::now();
        let authority = request.uri().authority().map(|a| a.as_str().to_string());
        let authority = match authority {
            Some(a) if request.method() == http::Method::CONNECT => a,
            _ => {
                tracing::debug!(%peer_addr, method = %request.method(), uri = %request.uri(), "not an HBONE CONNECT; 400");
                respond_empty(&mut respond, http::StatusCode::BAD_REQUEST);
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Only a client that resets streams whose handlers are still winding down gets here.
            tracing::debug!(%peer_addr, limit, "HBONE stream refused: every handler slot of this connection is busy");
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        };
        let (parts, recv) = request.into_parts();
        let respond = Arc::new(Mutex::new(Some(respond)));
        let reset = reset_before_answer(Arc::clone(&respond));
        let inbound = InboundRequest {
            authority,
            headers: parts.headers,
            peer_identity: peer_identity.clone(),
            peer_addr,
            local_addr,
            respond,
            recv: Some(recv),
        };
        let handling = handler(inbound);
        let last_activity = Arc::clone(&last_activity);
        tokio::spawn(async move {
            tokio::select! {
                () = handling => {}
                () = reset => {
                    tracing::debug!(%peer_addr, "HBONE stream reset before it was answered; handler cancelled");
                }
            }
            *lock(&last_activity) = Instant::now();
            drop(slot);
        });
    }
}

type ServerConn = h2::server::Connection<super::Transport, Bytes>;

async fn handshake(
    tcp: tokio::net::TcpStream,
    tls: Arc<rustls::ServerConfig>,
    settings: &ServerSettings,
) -> Result<(Identity, ServerConn), HboneError> {
    // The verifier already required a SPIFFE identity; each path reads it back.
    let (peer_identity, transport) = if settings.kernel_tls && super::kernel::attach(&tcp).is_ok() {
        let session = rustls::server::UnbufferedServerConnection::new(tls)
            .map_err(|e| HboneError::Tls(e.to_string()))?;
        let (stream, certs) = super::kernel::handshake(tcp, session)
            .await
            .map_err(|e| HboneError::Tls(tls::describe_handshake_error(&e)))?;
        let peer_identity = tls::peer_identity(certs.as_deref().unwrap_or_default())?;
        let mut wire = super::ReadAhead::new(stream);
        wire.allow_large_reads();
        (peer_identity, super::Transport::Kernel(Box::new(wire)))
    } else {
        let mut stream = tokio_rustls::TlsAcceptor::from(tls)
            .accept(super::ReadAhead::new(tcp))
            .await
            .map_err(|e| HboneError::Tls(tls::describe_handshake_error(&e)))?;
        // Authenticated: bulk-sized reads and writes from now on.
        let (wire, session) = stream.get_mut();
        wire.allow_large_reads();
        session.set_buffer_limit(Some(super::TLS_SEND_BUFFER));
        let certs = stream.get_ref().1.peer_certificates().unwrap_or_default();
        let peer_identity = tls::peer_identity(certs)?;
        let transport = tokio_rustls::TlsStream::Server(stream);
        (peer_identity, super::Transport::User(Box::new(transport)))
    };
    let connection = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_send_buffer_size(super::STREAM_SEND_BUFFER)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_size)
        .handshake::<_, Bytes>(transport)
        .await?;
    Ok((peer_identity, connection))
}

/// A client that hangs up (possibly without TLS close_notify) is the normal end of a
/// connection, not an error worth reporting.
fn is_normal_close(e: &h2::Error) -> bool {
    if e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR) {
        return true;
    }
    match e.get_io() {
        Some(io) => matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        ),
        None => false,
    }
}
