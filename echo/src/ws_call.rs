//! `mesh-echo ws`: a WebSocket client. Sends `--message` `--count` times over one connection,
//! waiting for each echo, and prints each echoed text on its own line; fails if an echo differs
//! from what was sent or the connection ends early. Closes cleanly at the end.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use echo::parse_duration;
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

use crate::client::emit_line;

#[derive(Debug, clap::Args)]
pub struct WsArgs {
    /// WebSocket URL, ws://HOST:PORT/PATH.
    #[arg(long)]
    pub url: String,
    /// Text sent in each message.
    #[arg(long, default_value = "hello")]
    pub message: String,
    /// Messages sent, one after another, each waiting for its echo.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Limit for the handshake and for each echo (e.g. 500ms, 5s, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub async fn run(args: WsArgs) -> anyhow::Result<()> {
    let limit = args.timeout;
    let (mut ws, _resp) =
        tokio::time::timeout(limit, tokio_tungstenite::connect_async(args.url.as_str()))
            .await
            .map_err(|_| {
                anyhow!(
                    "WebSocket handshake with {} timed out after {limit:?}",
                    args.url
                )
            })?
            .with_context(|| format!("WebSocket handshake with {}", args.url))?;
    for i in 0..args.count {
        ws.send(Message::text(args.message.clone()))
            .await
            .with_context(|| format!("sending message {i}"))?;
        let echoed = loop {
            let next = tokio::time::timeout(limit, ws.next())
                .await
                .map_err(|_| anyhow!("no echo of message {i} within {limit:?}"))?;
            match next {
                Some(Ok(Message::Text(t))) => break t.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => bail!("expected the echo of message {i}, got {other:?}"),
                Some(Err(e)) => {
                    return Err(e).with_context(|| format!("reading echo of message {i}"));
                }
                None => bail!("connection closed before the echo of message {i}"),
            }
        };
        emit_line(&echoed)?;
        if echoed != args.message {
            bail!("echo of message {i} differs from what was sent: {echoed:?}");
        }
    }
    // Best effort: the echoes already arrived.
    let _ = tokio::time::timeout(limit, ws.close(None)).await;
    Ok(())
}
