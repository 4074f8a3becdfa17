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

/// The largest `--buffer` (per direction, per connection).
const MAX_BUFFER: i64 = 16 * 1024 * 1024;

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Address to accept connections on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Address every accepted connection is relayed to, HOST:PORT.
    #[arg(long)]
    pub to: String,
    /// Bytes of each direction's copy buffer (ztunnel's grow to 256 KiB). Not 0: a copy into
    /// an empty buffer reads as end of stream and would cut every connection short.
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u32).range(1..=MAX_BUFFER))]
    pub buffer: u32,
    /// Runtime worker threads (ztunnel runs one on nodes of up to two CPUs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: u16,
}

/// Accepts and relays until killed; a failed connection is logged and dropped alone.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    loop {
        let (inbound, peer) = listener.accept().await.context("accepting")?;
        let to = args.to.clone();
        let buffer = args.buffer as usize;
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        relay: RelayArgs,
    }

    fn parse(extra: &[&str]) -> Result<RelayArgs, clap::Error> {
        let base = ["relay", "--listen", "127.0.0.1:1", "--to", "127.0.0.1:2"];
        Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.relay)
    }

    #[test]
    fn an_empty_buffer_or_no_worker_thread_is_refused() {
        let ok = parse(&[]).unwrap();
        assert_eq!((ok.buffer, ok.worker_threads), (256 * 1024, 1));
        for bad in [
            ["--buffer", "0"],
            ["--worker-threads", "0"],
            ["--buffer", "16777217"],
        ] {
            let err = parse(&bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(err.to_string().contains(bad[0]), "{err}");
        }
    }
}
