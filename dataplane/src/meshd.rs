//! The connection to meshd: one lazily (re)connecting gRPC channel, and node authentication.
//!
//! Owns how to reach meshd (`unix:/path`, root only, or `host:port` over TLS) and how to attach
//! the node token (read again from its file when it changes, see [`Meshd::with_token_file`]).
//! Over TCP meshd must present a certificate for [`MeshdTls::server_name`]
//! chaining to a root in [`MeshdTls::ca_file`] (the mesh root, given out of band: what meshd
//! itself sends cannot vouch for meshd); there is no plaintext TCP. Does not know what is asked
//! over it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use meshcore::nodeauth::AUTH_METADATA;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum MeshdError {
    #[error("bad meshd address {addr:?}: {reason} (use unix:/path/to/meshd.sock or host:port)")]
    Address { addr: String, reason: String },
    #[error(
        "meshd at {0} is over TCP, which needs TLS: pass --meshd-ca with the mesh root certificate (PEM)"
    )]
    NoTls(String),
    #[error("bad meshd server name {0:?}: {1}")]
    ServerName(String, String),
    #[error("meshd CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("node token {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error("node token {0} is empty")]
    EmptyToken(String),
}

/// How to verify meshd over TCP.
#[derive(Debug, Clone)]
pub struct MeshdTls {
    /// PEM root certificate(s) meshd's server certificate must chain to. Read at every
    /// connection, so adding a new root during a CA rotation needs no restart.
    pub ca_file: PathBuf,
    /// The DNS name meshd's certificate must carry (`meshd.<trust domain>`).
    pub server_name: String,
}

impl MeshdTls {
    /// The client TLS configuration: TLS 1.3, ALPN h2, the server verified by rustls' WebPKI
    /// verifier against the roots in the CA file only.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, MeshdError> {
        let bad = |reason: String| MeshdError::CaFile {
            path: self.ca_file.display().to_string(),
            reason,
        };
        let pem = std::fs::read(&self.ca_file).map_err(|e| bad(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no PEM certificate in it".to_string()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    fn name(&self) -> Result<ServerName<'static>, MeshdError> {
        ServerName::try_from(self.server_name.clone())
            .map_err(|e| MeshdError::ServerName(self.server_name.clone(), e.to_string()))
    }
}

/// A handle for making authenticated calls to meshd. Clone is cheap.
#[derive(Clone)]
pub struct Meshd {
    pub channel: Channel,
    auth: Auth,
}

type AuthValue = MetadataValue<tonic::metadata::Ascii>;

/// The `authorization` value requests carry.
#[derive(Clone)]
enum Auth {
    Fixed(AuthValue),
    /// Read again whenever the file changes: kubelet replaces projected service-account tokens
    /// before they expire (an atomic symlink swap), and a long-lived client must present the
    /// new one.
    File(Arc<TokenFile>),
}

struct TokenFile {
    path: String,
    /// What the file was (identity, size, modification time) when `value` was read from it.
    current: Mutex<(Option<FileStamp>, AuthValue)>,
}

type FileStamp = (u64, u64, u64, Option<std::time::SystemTime>);

fn stamp(path: &str) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).ok()?;
    Some((md.dev(), md.ino(), md.len(), md.modified().ok()))
}

fn auth_value(token: &str) -> Option<AuthValue> {
    format!("Bearer {}", token.trim()).parse().ok()
}

impl TokenFile {
    /// The current token: the cached one unless the file changed. A file that changed into
    /// something unusable (mid-write, removed, empty) leaves the last good token in use.
    fn value(&self) -> AuthValue {
        let Ok(mut cur) = self.current.lock() else {
            // Poisoned only if a holder panicked; nothing here can panic while holding it.
            return AuthValue::from_static("");
        };
        let now = stamp(&self.path);
        if now.is_some() && now != cur.0 {
            match Meshd::read_token(&self.path).map(|t| auth_value(&t)) {
                Ok(Some(v)) => {
                    tracing::info!(path = %self.path, "token file changed; using the new token");
                    *cur = (now, v);
                }
                Ok(None) => {
                    tracing::warn!(path = %self.path, "token file holds a token that is not valid ASCII metadata; keeping the previous token")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the new token; keeping the previous one")
                }
            }
        }
        cur.1.clone()
    }
}

impl Meshd {
    /// Builds a lazily connecting channel: calls made while meshd is away fail fast and the
    /// channel reconnects by itself when it returns. A `host:port` address needs `tls`.
    pub fn new(addr: &str, token: &str, tls: Option<MeshdTls>) -> Result<Meshd, MeshdError> {
        let bad = |reason: &str| MeshdError::Address {
            addr: addr.to_string(),
            reason: reason.to_string(),
        };
        // The URI only names the channel: every connection comes from the connectors below.
        let endpoint = Endpoint::from_static("http://meshd.invalid");
        let channel = if let Some(path) = addr.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
        } else {
            let tls = tls.ok_or_else(|| MeshdError::NoTls(addr.to_string()))?;
            if !addr.contains(':') || addr.contains('/') {
                return Err(bad("expected host:port"));
            }
            // Checked now so that a bad name or CA file stops start-up instead of every call.
            let name = tls.name()?;
            tls.client_config()?;
            let addr = addr.to_string();
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                let (addr, tls, name) = (addr.clone(), tls.clone(), name.clone());
                async move {
                    let config = tls.client_config().map_err(std::io::Error::other)?;
                    let tcp = tokio::net::TcpStream::connect(&addr).await?;
                    let stream = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
        };
        let auth = auth_value(token).ok_or_else(|| bad("token is not valid ASCII metadata"))?;
        Ok(Meshd {
            channel,
            auth: Auth::Fixed(auth),
        })
    }

    /// [`Meshd::new`] with the token read from `path` now (errors as [`Meshd::read_token`]'s)
    /// and again whenever the file changes.
    pub fn with_token_file(
        addr: &str,
        path: &str,
        tls: Option<MeshdTls>,
    ) -> Result<Meshd, MeshdError> {
        let stamped = stamp(path);
        let token = Self::read_token(path)?;
        let mut meshd = Self::new(addr, &token, tls)?;
        let value = match &meshd.auth {
            Auth::Fixed(v) => v.clone(),
            Auth::File(f) => f.value(),
        };
        meshd.auth = Auth::File(Arc::new(TokenFile {
            path: path.to_string(),
            current: Mutex::new((stamped, value)),
        }));
        Ok(meshd)
    }

    /// Reads the node token from a file (as written by `meshd node-token`).
    pub fn read_token(path: &str) -> Result<String, MeshdError> {
        let t = std::fs::read_to_string(path).map_err(|source| MeshdError::Token {
            path: path.to_string(),
            source,
        })?;
        let t = t.trim().to_string();
        if t.is_empty() {
            return Err(MeshdError::EmptyToken(path.to_string()));
        }
        Ok(t)
    }

    /// Wraps a message in a request carrying the node token.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let auth = match &self.auth {
            Auth::Fixed(v) => v.clone(),
            Auth::File(f) => f.value(),
        };
        req.metadata_mut().insert(AUTH_METADATA, auth);
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private scratch directory, removed at the end of the test.
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sent(meshd: &Meshd) -> String {
        let req = meshd.request(());
        req.metadata()
            .get(AUTH_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    #[tokio::test]
    async fn a_rotated_token_file_is_read_again() {
        let dir = Scratch(std::env::temp_dir().join(format!(
            "meshd-token-test-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        )));
        std::fs::create_dir(&dir.0).unwrap();
        let path = dir.0.join("token");
        let path_s = path.display().to_string();
        std::fs::write(&path, "first\n").unwrap();
        let meshd = Meshd::with_token_file("unix:/nonexistent.sock", &path_s, None).unwrap();
        assert_eq!(sent(&meshd), "Bearer first");
        // As kubelet does: a new file swapped in atomically.
        let tmp = dir.0.join("token.new");
        std::fs::write(&tmp, "second\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(sent(&meshd), "Bearer second");
        assert_eq!(
            sent(&meshd.clone()),
            "Bearer second",
            "clones share the file"
        );
        // A file caught empty or gone keeps the last good token.
        std::fs::write(&path, "").unwrap();
        assert_eq!(sent(&meshd), "Bearer second");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(sent(&meshd), "Bearer second");
        std::fs::write(&path, "third").unwrap();
        assert_eq!(sent(&meshd), "Bearer third");
        // A fixed token stays fixed, and a missing file stops start-up as before.
        let fixed = Meshd::new("unix:/nonexistent.sock", "node:x", None).unwrap();
        assert_eq!(sent(&fixed), "Bearer node:x");
        let missing = Meshd::with_token_file("unix:/x", "/nonexistent/token", None);
        assert!(matches!(missing, Err(MeshdError::Token { .. })));
    }
}
