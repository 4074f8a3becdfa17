//! Connections to endpoints: HBONE streams (with the waypoint's own identity, expecting the
//! endpoint's) or plain TCP, and pooled HTTP client connections on them.
//!
//! HTTP/1.1: a few kept-alive connections per endpoint, one request at a time each; a
//! connection goes back to the pool once its response has been read to the end. HTTP/2 (and
//! so gRPC): one multiplexed connection per endpoint. Bodies stream both ways. Owns the pools
//! and the transport; not which endpoint (`balance`) nor what the request says (`pipeline`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

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
use crate::own_cert::{CertError, OwnCert};

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
    #[error("HTTP handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
    /// The request was sent (or being sent) and failed.
    #[error("upstream {0}: {1}")]
    Request(SocketAddr, hyper::Error),
    /// A connection-pool limit (maxConnections + http1MaxPendingRequests) overflowed: Envoy's
    /// `UO`, answered 503 with `x-envoy-overloaded` and never retried.
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
    http1: Arc<Mutex<HashMap<Key, Vec<http1::SendRequest<Body>>>>>,
    /// One slot per endpoint; its lock is held while the connection is made, so concurrent
    /// first requests share one connection instead of racing to make several.
    http2: Mutex<HashMap<Key, Http2Slot>>,
}

type Http2Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

/// Limit on a plain TCP connect (HBONE's is the pool's, also 10 s).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_HTTP1: usize = 32;

impl Upstream {
    pub fn new(hbone: Pool, cert: OwnCert) -> Upstream {
        Upstream {
            hbone,
            cert,
            dial: Arc::new(|addr| Box::pin(tokio::net::TcpStream::connect(addr))),
            http1: Arc::default(),
            http2: Mutex::default(),
        }
    }

    /// A new byte stream to `ep`: an HBONE CONNECT to `<ip>:<port>` via `<ip>:15008`, or TCP.
    pub async fn open(&self, ep: &Endpoint) -> Result<BoxIo, UpstreamError> {
        match &ep.transport {
            Transport::Plain => {
                let connect = tokio::net::TcpStream::connect(ep.addr);
                let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                    Ok(r) => r.map_err(|e| UpstreamError::Tcp(ep.addr, e))?,
                    Err(_) => {
                        return Err(UpstreamError::Tcp(
                            ep.addr,
                            std::io::ErrorKind::TimedOut.into(),
                        ));
                    }
                };
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

    /// Sends one request to `ep` over a pooled connection of `version`.
    pub async fn send(
        &self,
        ep: &Endpoint,
        version: Version,
        req: http::Request<Body>,
        pool: &ConnectionPool,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        // The destination's connection-pool limits (issue 9: maxConnections, pending
        // requests, requests per connection, connect and idle timeouts).
        let _ = pool;
        let key = (ep.addr, ep.transport.clone());
        match version {
            Version::Http1 => {
                let mut sender = match self.idle_http1(&key) {
                    Some(s) => s,
                    None => self.new_http1(ep).await?,
                };
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| UpstreamError::Request(ep.addr, e))?;
                self.recycle_http1(key, sender);
                Ok(resp)
            }
            Version::Http2 => {
                let slot = {
                    let mut m = self.http2.lock().unwrap_or_else(|p| p.into_inner());
                    m.entry(key).or_default().clone()
                };
                let mut sender = {
                    let mut conn = slot.lock().await;
                    match conn.as_ref().filter(|s| !s.is_closed()) {
                        Some(s) => s.clone(),
                        None => {
                            let s = self.new_http2(ep).await?;
                            *conn = Some(s.clone());
                            s
                        }
                    }
                };
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

    /// Drops the pooled connections of endpoints for which `keep` is false (gone from the
    /// config): their HTTP/2 connections close once their last request ends.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.http1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(addr, _), _| keep(addr));
        self.http2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(addr, _), _| keep(addr));
    }

    fn idle_http1(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut m = self.http1.lock().unwrap_or_else(|p| p.into_inner());
        let idle = m.get_mut(key)?;
        while let Some(s) = idle.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    /// Back into the pool once the response has been read (hyper says ready); a connection
    /// that fails or was upgraded is dropped instead.
    fn recycle_http1(&self, key: Key, mut sender: http1::SendRequest<Body>) {
        let this = self.http1.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut m = this.lock().unwrap_or_else(|p| p.into_inner());
                let idle = m.entry(key).or_default();
                if idle.len() < MAX_IDLE_HTTP1 {
                    idle.push(sender);
                }
            }
        });
    }

    async fn new_http1(&self, ep: &Endpoint) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let io = self.open(ep).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Handshake(ep.addr, e))?;
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(upstream = %addr, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn new_http2(&self, ep: &Endpoint) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let io = self.open(ep).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Handshake(ep.addr, e))?;
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(upstream = %addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }
}
