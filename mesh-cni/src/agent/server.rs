//! The agent's two sockets: the plugin socket (event.rs: one JSON line each way, one request
//! per connection, bounded, mode 0600, a dead agent's socket file replaced) and the ZDS
//! listener (ztunnels connect; accepts rate-limited; each gets the snapshot). Owns accepting
//! and framing; answers are [`super::handle`]'s, the cache [`super::ztunnels`]'s.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dataplane::zds::{AgentSession, EXCHANGE_TIMEOUT, ZdsListener};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::Agent;
use super::handle::handle;
use crate::event::{AgentReply, MAX_LINE, PluginEvent};

/// Plugin requests handled at once (more wait in the accept queue).
const MAX_CONCURRENT: usize = 64;
/// How long a plugin has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// ZDS accepts at most this often (Istio: 5/s), so a crash-looping peer cannot spin the agent.
const ACCEPT_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("plugin socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "plugin socket {0}: another agent is serving it (stop it first, or pass another --plugin-socket)"
    )]
    InUse(String),
    #[error("plugin socket {0}: exists and is not a socket; refusing to replace it")]
    NotSocket(String),
}

/// Binds the plugin socket: created under a temporary name, made 0600, then renamed over the
/// path, so no moment exists where another user could connect.
pub async fn bind_plugin(path: &Path) -> Result<UnixListener, SocketError> {
    let shown = path.display().to_string();
    let io = |source| SocketError::Io {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(SocketError::InUse(shown));
            }
        }
        Ok(_) => return Err(SocketError::NotSocket(shown)),
        Err(_) => {}
    }
    let mut tmp = PathBuf::from(path);
    tmp.set_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("plugin.sock"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(listener)
}

/// Serves plugin requests for ever.
pub async fn serve_plugin(agent: Arc<Agent>, listener: UnixListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "plugin socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            one_request(&agent, stream).await;
            drop(permit);
        });
    }
}

async fn one_request(agent: &Arc<Agent>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64 + 1));
    let mut line = Vec::new();
    let reply =
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Err(_) => AgentReply::Failed {
                error: format!("no request within {REQUEST_TIMEOUT:?}"),
            },
            Ok(Err(e)) => AgentReply::Failed {
                error: format!("reading the request: {e}"),
            },
            Ok(Ok(_)) if line.len() > MAX_LINE => AgentReply::Failed {
                error: format!("request over {MAX_LINE} bytes"),
            },
            Ok(Ok(_)) => match serde_json::from_slice::<PluginEvent>(line.trim_ascii()) {
                Ok(ev) => handle(agent, ev).await,
                Err(e) => AgentReply::Failed {
                    error: format!(
                        "malformed request (is the plugin the same version as the agent?): {e}"
                    ),
                },
            },
        };
    let Ok(mut text) = serde_json::to_vec(&reply) else {
        return;
    };
    text.push(b'\n');
    let _ = write.write_all(&text).await;
    let _ = write.shutdown().await;
}

/// Accepts ztunnels for ever: each says hello, gets the snapshot, and becomes the newest.
pub async fn serve_zds(agent: Arc<Agent>, listener: ZdsListener) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    let session =
                        match tokio::time::timeout(EXCHANGE_TIMEOUT, AgentSession::accept(conn))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "ztunnel hello failed");
                                return;
                            }
                            Err(_) => {
                                tracing::warn!("ztunnel sent no hello");
                                return;
                            }
                        };
                    if agent.uninstalling() {
                        return;
                    }
                    agent.state.lock().await.attach(session).await;
                });
            }
            Err(e) => tracing::warn!(error = %e, "ZDS accept failed"),
        }
        tokio::time::sleep(ACCEPT_INTERVAL).await;
    }
}
