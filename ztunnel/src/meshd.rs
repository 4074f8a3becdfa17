//! The connection to meshd: one lazily (re)connecting gRPC channel, and node authentication.
//!
//! Owns how to reach meshd (`unix:/path` or `host:port`) and how to attach the node token.
//! Does not know what is asked over it.

use std::path::PathBuf;

use meshcore::nodeauth::AUTH_METADATA;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum MeshdError {
    #[error("bad meshd address {addr:?}: {reason} (use unix:/path/to/meshd.sock or host:port)")]
    Address { addr: String, reason: String },
    #[error("node token {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error("node token {0} is empty")]
    EmptyToken(String),
}

/// A handle for making authenticated calls to meshd. Clone is cheap.
#[derive(Clone)]
pub struct Meshd {
    pub channel: Channel,
    auth: MetadataValue<tonic::metadata::Ascii>,
}

impl Meshd {
    /// Builds a lazily connecting channel: calls made while meshd is away fail fast and the
    /// channel reconnects by itself when it returns.
    pub fn new(addr: &str, token: &str) -> Result<Meshd, MeshdError> {
        let bad = |reason: &str| MeshdError::Address {
            addr: addr.to_string(),
            reason: reason.to_string(),
        };
        let channel = if let Some(path) = addr.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            Endpoint::from_static("http://meshd.invalid").connect_with_connector_lazy(
                tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }),
            )
        } else {
            Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| bad(&e.to_string()))?
                .connect_lazy()
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
