//! The plugin's one request to the node agent: connect to its unix socket, send the event as
//! one JSON line, read one reply line, all within a deadline. Owns that exchange only.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::event::{AgentReply, MAX_LINE, PluginEvent};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody listens (no socket file, refused): the agent is not running.
    #[error("cannot connect: {0}")]
    Unreachable(std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection failed: {0}")]
    Io(std::io::Error),
    #[error("unreadable answer (is the agent the same version as the plugin?): {0}")]
    BadReply(String),
}

/// Sends `event` to the agent at `socket` and returns its answer, or why there is none.
pub fn call(
    socket: &Path,
    event: &PluginEvent,
    timeout: Duration,
) -> Result<AgentReply, CallError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CallError::Io)?;
    runtime.block_on(async {
        tokio::time::timeout(timeout, exchange(socket, event))
            .await
            .map_err(|_| CallError::Timeout(timeout))?
    })
}

async fn exchange(socket: &Path, event: &PluginEvent) -> Result<AgentReply, CallError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(CallError::Unreachable)?;
    let mut line = serde_json::to_vec(event).map_err(|e| CallError::BadReply(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).await.map_err(CallError::Io)?;
    let mut reader = BufReader::new(stream.take(MAX_LINE as u64 + 1));
    let mut reply = Vec::new();
    reader
        .read_until(b'\n', &mut reply)
        .await
        .map_err(CallError::Io)?;
    if reply.len() > MAX_LINE {
        return Err(CallError::BadReply(format!("reply over {MAX_LINE} bytes")));
    }
    if reply.is_empty() {
        return Err(CallError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        )));
    }
    serde_json::from_slice(reply.trim_ascii()).map_err(|e| CallError::BadReply(e.to_string()))
}
