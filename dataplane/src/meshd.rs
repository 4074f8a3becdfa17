//! The connection to meshd: one lazily (re)connecting gRPC channel, and node authentication.
//!
//! Owns how to reach meshd (`unix:/path`, root only, or `host:port` over TLS) and how to attach
//! the node token. Over TCP meshd must present a certificate for [`MeshdTls::server_name`]
//! chaining to a root in [`MeshdTls::ca_file`] (the mesh root, given out of band: what meshd
//! itself sends cannot vouch for meshd); there is no plaintext TCP. Does not know what is asked
//! over it.

use std::path::PathBuf;
use std::sync::Arc;

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
    auth: MetadataValue<tonic::metadata::Ascii>,
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
        let auth = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| bad("token is not valid ASCII metadata"))?;
        Ok(Meshd { channel, auth })
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
        req.metadata_mut().insert(AUTH_METADATA, self.auth.clone());
        req
    }
}
