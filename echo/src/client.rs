//! Client-side plumbing shared by `who` and the benchmarks: resolving
//! `HOST:PORT`, connecting with a timeout, and writing result lines to stdout.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::net::TcpStream;

/// Resolves `HOST:PORT` (literal IPs, `[v6]:port` or DNS names).
pub async fn resolve(addr: &str, timeout: Duration) -> anyhow::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| anyhow!("timed out after {timeout:?} resolving {addr}"))?
        .with_context(|| format!("resolving {addr:?} (expected HOST:PORT)"))?
        .collect();
    if addrs.is_empty() {
        bail!("{addr:?} resolved to no addresses");
    }
    Ok(addrs)
}

/// Connects to the first of `addrs` that accepts, each attempt bounded by
/// `timeout`; the error names every address tried.
pub async fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> anyhow::Result<TcpStream> {
    let mut failures = Vec::new();
    for &addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(err)) => failures.push(format!("{addr}: {err}")),
            Err(_) => failures.push(format!("{addr}: connect timed out after {timeout:?}")),
        }
    }
    bail!("could not connect ({})", failures.join("; "))
}

/// Writes one line to stdout and flushes it (errors such as a closed pipe are
/// returned instead of panicking like `println!`).
pub fn emit_line(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Serialises `value` as one JSON line on stdout.
pub fn emit_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let line = serde_json::to_string(value).context("encoding JSON output")?;
    emit_line(&line)
}
