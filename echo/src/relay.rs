//! `mesh-echo relay`: a plain TCP relay, the bench's ceiling for any proxy that moves bytes
//! through user space.
//!
//! Every accepted connection is dialled on to `--to` and copied both ways with tokio's own
//! bidirectional copy (`--buffer` bytes per direction), `TCP_NODELAY` on both legs, half-close
//! passed on. No TLS, no HTTP/2, no policy, no metrics: two of these in a chain (one in the
//! client's pod, one in the server's) is what an HBONE path costs minus its encryption and
//! framing, measured on the same path as raw TCP. Owns only that copy; the chain is set up by
//! the bench (`localmesh::bench_l4`).

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Address to accept connections on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address every accepted connection is relayed to, HOST:PORT.
    #[arg(long)]
    pub to: String,
    /// Bytes of each direction's copy buffer (ztunnel's grow to 256 KiB).
    #[arg(long, default_value_t = 256 * 1024)]
    pub buffer: usize,
    /// Runtime worker threads (ztunnel runs one on nodes of up to two CPUs).
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
}

/// Accepts and relays until killed; a failed connection is logged and dropped alone.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    loop {
        let (inbound, peer) = listener.accept().await.context("accepting")?;
        let to = args.to.clone();
        let buffer = args.buffer;
        tokio::spawn(async move {
            if let Err(err) = relay(inbound, &to, buffer).await {
                tracing::debug!(%peer, %to, "relay ended: {err:#}");
            }
        });
    }
}

async fn relay(mut inbound: TcpStream, to: &str, buffer: usize) -> anyhow::Result<()> {
    let mut outbound = TcpStream::connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, buffer, buffer).await?;
    Ok(())
}
