//! HBONE: TCP tunnelled through HTTP/2 CONNECT over mutual TLS, byte-compatible with Istio's
//! ztunnel (see `shared/notes/hbone.md`).
//!
//! Owns: the HBONE client connection pool ([`Pool`]), the server side of one connection
//! ([`serve_connection`]), and the tunnel byte stream ([`H2Stream`]).
//!
//! Must not touch: network namespaces, socket marks or policy — the caller brings a
//! [`Dialer`] for the first two and decides, in its handler, whether to accept an
//! [`InboundRequest`]. Certificates come from [`crate::tls`].
//!
//! # Wire shape
//!
//! One CONNECT per proxied TCP connection, in the classic form: only `:method CONNECT` and
//! `:authority` (h2 omits `:scheme` and `:path` for a CONNECT without `:protocol`). The body of
//! a 200 reply is the raw byte stream both ways. Both ends use Istio's HTTP/2 settings
//! (stream window 4 MiB, connection window 16 MiB, max frame 1 MiB, header list 64 KiB on the
//! server and 16 KiB on the client) and PING every 10 s, giving up on a connection whose PING is
//! unanswered for 20 s.

mod client;
mod kernel;
mod readahead;
mod server;
mod stream;
mod transport;

use std::time::Duration;

pub use client::{ConnectRequest, DialFuture, Dialer, Pool, PoolKey, PoolSettings};
pub use kernel::handed_over as kernel_tls_connections;
pub use readahead::ReadAhead;
pub use server::{
    InboundRequest, ServerSettings, serve_connection, serve_connection_limited,
    serve_connection_until,
};
pub use stream::H2Stream;
pub(crate) use transport::Transport;

/// The TCP socket under an HBONE connection's TLS: reads buffered ([`ReadAhead`]).
pub(crate) type Wire = ReadAhead<tokio::net::TcpStream>;

/// Encrypted bytes rustls may hold before a write must wait for the socket (its default is
/// 64 KiB): a bulk tunnel's 256 KiB chunks go out in one `writev` of sixteen records.
pub(crate) const TLS_SEND_BUFFER: usize = 512 * 1024;

/// Istio's per-stream flow-control window.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Istio's per-connection flow-control window.
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Bytes h2 takes from one stream's writer before the connection has written them out (h2's
/// default is 400 KiB): room for a few of [`H2Stream`]'s large writes, so the writer is not
/// parked while the connection task encrypts the previous one.
pub(crate) const STREAM_SEND_BUFFER: usize = 1024 * 1024;
/// Istio's maximum HTTP/2 frame size.
pub(crate) const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// How often each end PINGs an otherwise quiet connection.
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection is declared dead.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest response header block our client accepts (Istio's client value).
pub(crate) const CLIENT_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Everything that can go wrong opening or serving an HBONE tunnel.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// A socket operation failed (dial, accept, read, write).
    #[error("HBONE I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake failed; the message says why (e.g. which identity was seen and which
    /// were expected).
    #[error("HBONE TLS handshake failed: {0}")]
    Tls(String),
    /// Our own TLS material is unusable (bad certificate or key).
    #[error("HBONE TLS configuration: {0}")]
    TlsConfig(#[from] crate::tls::TlsError),
    /// HTTP/2 failed: protocol error, GOAWAY, reset stream.
    #[error("HBONE HTTP/2 error: {0}")]
    H2(#[from] h2::Error),
    /// The peer answered the CONNECT with something other than 200.
    #[error("HBONE peer answered CONNECT with {0}")]
    Status(http::StatusCode),
    /// Connecting (TCP + TLS + HTTP/2 handshake, limited by `connect_timeout`) or a keepalive
    /// PING (20 s) took too long.
    #[error("HBONE timed out (connection handshake or keepalive PING)")]
    Timeout,
    /// Server side: the client did not finish TLS + HTTP/2 within `handshake_timeout`, so it
    /// never proved an identity.
    #[error("HBONE client did not finish its handshake in time")]
    HandshakeTimeout,
    /// The request could not be built (e.g. an authority that is not `host:port`).
    #[error("bad HBONE request: {0}")]
    BadRequest(String),
}

impl HboneError {
    /// Server side: the connection failed before the client proved who it is (TLS refused or
    /// abandoned, handshake timed out). Anyone who can reach the port can cause these, so they
    /// are worth a counter, not a log line each.
    pub fn is_before_authentication(&self) -> bool {
        matches!(self, HboneError::Tls(_) | HboneError::HandshakeTimeout)
    }

    /// A copy of this error for the other waiters of a shared connection attempt.
    ///
    /// The error types inside are not `Clone`, so each variant is rebuilt as faithfully as
    /// its payload allows: same variant, same message.
    pub(crate) fn duplicate(&self) -> HboneError {
        match self {
            HboneError::Io(e) => HboneError::Io(std::io::Error::new(e.kind(), e.to_string())),
            HboneError::Tls(m) => HboneError::Tls(m.clone()),
            HboneError::TlsConfig(e) => HboneError::Tls(format!("configuration: {e}")),
            HboneError::H2(e) => match e.reason() {
                Some(reason) => HboneError::H2(reason.into()),
                None => HboneError::Io(std::io::Error::other(e.to_string())),
            },
            HboneError::Status(s) => HboneError::Status(*s),
            HboneError::Timeout => HboneError::Timeout,
            HboneError::HandshakeTimeout => HboneError::HandshakeTimeout,
            HboneError::BadRequest(m) => HboneError::BadRequest(m.clone()),
        }
    }
}

/// Sends a PING every `interval` and returns when one goes unanswered for `timeout` (or the
/// connection fails). Runs next to a connection's driver; the caller drops the connection
/// when this returns.
pub(crate) async fn keepalive(
    mut pings: h2::PingPong,
    interval: Duration,
    timeout: Duration,
) -> HboneError {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return HboneError::H2(e),
            Err(_) => return HboneError::Timeout,
        }
    }
}
