//! meshd's listeners: who may open a connection to its API, and over what.
//!
//! Owns accepting connections and handing the gRPC server only admitted ones, as one stream of
//! [`Conn`]s:
//! - a unix socket (local mode): mode 0600, and each connection's peer credentials
//!   (`SO_PEERCRED`) must say uid 0 — anyone else is closed at once, with a (rate-limited) log
//!   line. Plaintext: only root on this host reaches it.
//! - TCP: always TLS 1.3. The server certificate is issued by the mesh CA's signing root for the
//!   DNS name [`server_name`] (`meshd.<trust domain>`, like istiod's `istiod.<ns>.svc`), renewed
//!   at half-life and whenever the roots change. Clients verify it against the mesh root they
//!   were given out of band (ztunnel's `--meshd-ca`). Handshakes are bounded in time and number,
//!   and connections in number, in total and per peer address.
//!
//! Every connection must carry a request with a valid node token (the interceptor marks its
//! [`ConnAuth`]) within [`UNAUTHENTICATED_CONN_TIMEOUT`] of being admitted, or it is closed: an
//! unauthenticated client holds nothing for long.
//!
//! Does not authenticate nodes (that is `authn`, per request) and does not serve gRPC.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use meshcore::admission::{Gate, Pass, Throttle};
use meshcore::ca::CaError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, error, info, warn};

use crate::roots::Roots;

/// Lifetime of meshd's serving certificate; it is renewed at half of it.
const SERVING_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// A TLS handshake not done by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in flight at once; connections beyond are closed unanswered.
const MAX_HANDSHAKES: usize = 64;
/// Accepted connections waiting for the gRPC server.
const QUEUE: usize = 64;
/// TLS connections open at once, and from one peer address.
const MAX_CONNECTIONS: usize = 1024;
const MAX_CONNECTIONS_PER_PEER: usize = 32;
/// A connection that has carried no authenticated request this long after it was admitted is
/// closed.
pub const UNAUTHENTICATED_CONN_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one log line per this interval about refused socket peers.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("issuing meshd's serving certificate: {0}")]
    Ca(#[from] CaError),
    #[error("meshd's serving certificate: {0}")]
    Pem(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The DNS name in meshd's serving certificate, which clients must dial it as.
pub fn server_name(trust_domain: &str) -> String {
    format!("meshd.{trust_domain}")
}

/// Admitted connections, for `serve_with_incoming_shutdown`.
pub type Incoming = ReceiverStream<Result<Conn, io::Error>>;

/// Whether a connection has carried an authenticated request. The gRPC server puts it in every
/// request's extensions; the interceptor marks it.
#[derive(Debug, Clone, Default)]
pub struct ConnAuth(Arc<AtomicBool>);

impl ConnAuth {
    pub fn mark_authenticated(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_authenticated(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// An admitted connection: a root peer on the unix socket, or a finished TLS handshake.
pub struct Conn {
    io: Io,
    auth: ConnAuth,
    /// Until the first authenticated request; when it fires first, the connection is closed.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Its place among the TLS connections (released when the connection is dropped).
    _slot: Option<Pass>,
}

enum Io {
    Unix(UnixStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    fn new(io: Io, slot: Option<Pass>) -> Conn {
        Conn {
            io,
            auth: ConnAuth::default(),
            deadline: Some(Box::pin(tokio::time::sleep(UNAUTHENTICATED_CONN_TIMEOUT))),
            _slot: slot,
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnAuth;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.auth.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The server always has a read pending, so polling the deadline here wakes it in time.
        if let Some(deadline) = this.deadline.as_mut() {
            if this.auth.is_authenticated() {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                debug!("closing a connection that sent no authenticated request in time");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no authenticated request in time",
                )));
            }
        }
        match &mut this.io {
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Binds a unix socket only root may use (0600), replacing a stale socket file but never a
/// live meshd's socket or a file that is not a socket.
pub fn bind_unix(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err("another process is serving on it".to_string());
        }
        std::fs::remove_file(path).map_err(|e| format!("removing stale socket: {e}"))?;
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| e.to_string())?;
    // Root only: the socket speaks plaintext, and tokens are not all a local user could try.
    // The peer-credential check below holds even if someone widens the mode.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod: {e}"))?;
    Ok(listener)
}

/// Accepts on `listener` until `stop`, admitting only peers running as uid 0.
pub fn admit_root(listener: UnixListener, mut stop: watch::Receiver<bool>) -> Incoming {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let refusals = Throttle::new(REFUSAL_LOG_EVERY);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
                _ = tx.closed() => return,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == 0 => {
                    if tx
                        .send(Ok(Conn::new(Io::Unix(stream), None)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                // Dropping the stream closes it before a byte is read.
                Ok(cred) => {
                    if let Some(suppressed) = refusals.hit() {
                        warn!(
                            uid = cred.uid(),
                            pid = cred.pid(),
                            refused_since_last_line = suppressed,
                            "refused a connection to meshd's socket: only root may use it"
                        );
                    }
                }
                Err(e) => warn!(error = %e, "cannot read a socket peer's credentials; closed"),
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Accepts on `listener` until `stop`, admitting connections that complete a TLS handshake
/// with meshd's serving certificate (kept current from `roots`).
pub fn admit_tls(
    listener: TcpListener,
    mut roots: watch::Receiver<Arc<Roots>>,
    trust_domain: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<Incoming, ListenerError> {
    let name = server_name(trust_domain);
    let first = serving_config(&roots.borrow_and_update(), &name)?;
    info!(server_name = %name, "meshd serves TLS with a certificate from the mesh CA");
    let (config_tx, config_rx) = watch::channel(first);
    let renew_stop = stop.clone();
    tokio::spawn(renew(name, roots.clone(), config_tx, renew_stop));
    let (tx, rx) = mpsc::channel(QUEUE);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let connections = Arc::new(Gate::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                debug!(%peer, "too many TLS handshakes in flight; connection closed");
                continue;
            };
            let conn_slot = match connections.enter(peer.ip()) {
                Ok(slot) => slot,
                Err(full) => {
                    debug!(%peer, reason = %full, "too many connections; connection closed");
                    continue;
                }
            };
            let acceptor = TlsAcceptor::from(config_rx.borrow().clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                // Failures are the peer's business and anyone can cause them: debug, not warn.
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let conn = Conn::new(Io::Tls(Box::new(tls)), Some(conn_slot));
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Re-issues the serving certificate at half-life and when the roots change (a rotation's
/// `activate` makes a new signer), until `stop`.
async fn renew(
    name: String,
    mut roots: watch::Receiver<Arc<Roots>>,
    tx: watch::Sender<Arc<rustls::ServerConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = roots.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(SERVING_CERT_LIFETIME / 2) => {},
            _ = stop.wait_for(|s| *s) => return,
        }
        let current = roots.borrow_and_update().clone();
        match serving_config(&current, &name) {
            Ok(c) => {
                info!(server_name = %name, "renewed meshd's serving certificate");
                tx.send_replace(c);
            }
            Err(e) => {
                error!(error = %e, "cannot renew meshd's serving certificate; keeping the current one")
            }
        }
    }
}

fn serving_config(roots: &Roots, name: &str) -> Result<Arc<rustls::ServerConfig>, ListenerError> {
    let (chain_pem, key_pem) = roots.signer.mint_server(name, SERVING_CERT_LIFETIME)?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ListenerError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ListenerError::Pem(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// An accept error (say, out of file descriptors) is waited out, not spun on.
async fn accept_failed(e: &io::Error) {
    warn!(error = %e, "accept failed; pausing 100ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
