//! `mesh-echo hold`: opens N concurrent ECHO connections, checks every byte of a payload
//! distinct to each, holds them all open until a line (or EOF) on stdin, then checks a second
//! distinct payload on every one and closes them gracefully. Prints one JSON line after each
//! phase; exits 0 only if every connection passed both. Used to prove a mesh carries many idle
//! connections without losing, mixing or corrupting any. Owns only this client; the server side
//! is `serve`'s ECHO mode.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};
use futures::StreamExt as _;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::client::{connect_any, emit_json, resolve};

/// Largest `--count`: far beyond what a test needs, small enough to bound memory (a few KiB
/// of payload per connection in flight).
const MAX_COUNT: u32 = 200_000;
/// Descriptors kept free beyond one per connection (stdio, the runtime's, resolver's).
const SPARE_FDS: u64 = 64;
/// At most this many error messages are reported (the counts say how many failed).
const MAX_ERRORS: usize = 5;

#[derive(Debug, clap::Args)]
pub struct HoldArgs {
    /// Server address (a `serve --port`), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: String,
    /// Connections to open and hold.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_COUNT as i64))]
    pub count: u32,
    /// Connections being opened (or checked, in the second phase) at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub concurrency: u32,
    /// Bound on each step of one connection (connect, send, read the echo back, close).
    #[arg(long, default_value = "30s", value_parser = echo::parse_duration)]
    pub timeout: Duration,
}

/// The line printed once all connections are open (or failed), before holding.
#[derive(Serialize)]
struct Held {
    phase: &'static str,
    /// Connections established.
    open: u32,
    /// Of those, whose first payload came back intact.
    verified: u32,
    failed: u32,
    errors: Vec<String>,
}

/// The line printed after the release.
#[derive(Serialize)]
struct Released {
    phase: &'static str,
    /// Connections held through the pause.
    open: u32,
    /// Of those, whose second payload came back intact.
    verified: u32,
    /// Of those, closed gracefully (our FIN answered by the server's, no stray byte).
    closed: u32,
    failed: u32,
    errors: Vec<String>,
}

pub async fn run(args: HoldArgs) -> anyhow::Result<()> {
    let limit = crate::fd_limit::raise().context("raising the open-files limit")?;
    let need = u64::from(args.count) + SPARE_FDS;
    ensure!(
        limit >= need,
        "--count {} needs {need} open files but the limit is {limit}: raise it (ulimit -n) or run as root",
        args.count
    );
    let addrs: Arc<[SocketAddr]> = resolve(&args.addr, args.timeout).await?.into();
    let concurrency = usize::try_from(args.concurrency).unwrap_or(256);

    // Phase 1: open and check each, `concurrency` at a time.
    let timeout = args.timeout;
    let results: Vec<(u32, Result<TcpStream, Failure>)> = futures::stream::iter(0..args.count)
        .map(|i| {
            let addrs = addrs.clone();
            async move { (i, open_and_check(&addrs, i, timeout).await) }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut held = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    let (mut open, mut failed) = (0u32, 0u32);
    for (i, result) in results {
        match result {
            Ok(stream) => {
                open += 1;
                held.push((i, stream));
            }
            Err(e) => {
                // Connected but the echo was wrong: open, not verified.
                if !matches!(e, Failure::Connect(_)) {
                    open += 1;
                }
                failed += 1;
                if errors.len() < MAX_ERRORS {
                    errors.push(format!("connection {i}: {e:#}"));
                }
            }
        }
    }
    emit_json(&Held {
        phase: "held",
        open,
        verified: u32::try_from(held.len()).unwrap_or(u32::MAX),
        failed,
        errors,
    })?;
    ensure!(failed == 0, "{failed} of {} connections failed", args.count);

    // Hold until told: a line on stdin or its end.
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .context("reading stdin (the release signal)")?;

    // Phase 2: every held connection must still carry bytes, then close gracefully.
    let held_count = u32::try_from(held.len()).unwrap_or(u32::MAX);
    let results: Vec<(u32, Result<(), Failure>)> = futures::stream::iter(held)
        .map(|(i, stream)| async move { (i, check_and_close(stream, i, timeout).await) })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut report = Released {
        phase: "released",
        open: held_count,
        verified: 0,
        closed: 0,
        failed: 0,
        errors: Vec::new(),
    };
    for (i, result) in results {
        match result {
            Ok(()) => {
                report.verified += 1;
                report.closed += 1;
            }
            Err(e) => {
                // A connection that echoed but did not close cleanly still verified.
                if matches!(e, Failure::Close(_)) {
                    report.verified += 1;
                }
                report.failed += 1;
                if report.errors.len() < MAX_ERRORS {
                    report.errors.push(format!("connection {i}: {e:#}"));
                }
            }
        }
    }
    emit_json(&report)?;
    if report.failed > 0 {
        bail!(
            "{} of {held_count} held connections failed after the hold",
            report.failed
        );
    }
    Ok(())
}

/// Why one connection failed, by step.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("connect: {0:#}")]
    Connect(anyhow::Error),
    #[error("echo: {0:#}")]
    Check(anyhow::Error),
    #[error("close: {0:#}")]
    Close(anyhow::Error),
}

/// Connects, asks for ECHO and checks payload 1 comes back byte for byte.
async fn open_and_check(addrs: &[SocketAddr], i: u32, t: Duration) -> Result<TcpStream, Failure> {
    let mut stream = connect_any(addrs, t).await.map_err(Failure::Connect)?;
    // Small writes go out at once; no Nagle wait between the request and the read.
    let _ = stream.set_nodelay(true);
    let expected = payload(i, 1);
    let mut first = Vec::with_capacity(5 + expected.len());
    first.extend_from_slice(b"ECHO\n");
    first.extend_from_slice(&expected);
    within(t, "sending ECHO and payload 1", stream.write_all(&first))
        .await
        .map_err(Failure::Check)?;
    read_and_compare(&mut stream, i, 1, &expected, t)
        .await
        .map_err(Failure::Check)?;
    Ok(stream)
}

/// Sends payload 2 on a held connection and checks it, then closes our side and expects the
/// server's close (and nothing else) in return.
async fn check_and_close(mut stream: TcpStream, i: u32, t: Duration) -> Result<(), Failure> {
    let expected = payload(i, 2);
    within(t, "sending payload 2", stream.write_all(&expected))
        .await
        .map_err(Failure::Check)?;
    read_and_compare(&mut stream, i, 2, &expected, t)
        .await
        .map_err(Failure::Check)?;
    within(t, "shutting down our side", stream.shutdown())
        .await
        .map_err(Failure::Close)?;
    let mut rest = [0u8; 64];
    let n = within(t, "waiting for the server's close", stream.read(&mut rest))
        .await
        .map_err(Failure::Close)?;
    if n > 0 {
        return Err(Failure::Close(anyhow!(
            "{n} unexpected byte(s) after the echo instead of the close"
        )));
    }
    Ok(())
}

/// Reads exactly `expected.len()` bytes and compares them, naming the first difference (and,
/// when the header names another connection, that the streams were crossed).
async fn read_and_compare(
    stream: &mut TcpStream,
    i: u32,
    phase: u8,
    expected: &[u8],
    t: Duration,
) -> anyhow::Result<()> {
    let mut got = vec![0u8; expected.len()];
    within(t, "reading the echo", stream.read_exact(&mut got))
        .await
        .with_context(|| format!("phase {phase}: {} bytes expected", expected.len()))?;
    let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) else {
        return Ok(());
    };
    let from = header_index(&got).filter(|&j| j != i);
    let crossed = from.map_or(String::new(), |j| {
        format!(" (it carries connection {j}'s data)")
    });
    bail!(
        "phase {phase}: byte {at} of {} differs: sent {:#04x}, got {:#04x}{crossed}",
        expected.len(),
        expected[at],
        got[at]
    )
}

async fn within<T, F>(t: Duration, what: &str, f: F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = std::io::Result<T>>,
{
    match tokio::time::timeout(t, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("{what}: {e}")),
        Err(_) => Err(anyhow!("{what}: timed out after {t:?}")),
    }
}

/// Header of every payload: `HOLD`, the connection index (4 bytes, big-endian), the phase.
const MAGIC: &[u8; 4] = b"HOLD";
const HEADER: usize = 9;

/// Connection `i`'s payload for `phase`: the header, then 247..=4087 pseudo-random bytes
/// (length and content both depend on `i` and `phase`), so no two connections' payloads are
/// alike and a swapped, cut or altered byte is caught.
fn payload(i: u32, phase: u8) -> Vec<u8> {
    let mut rng = SplitMix(u64::from(i) << 8 | u64::from(phase));
    let len = 256 + usize::try_from(rng.next() % 3841).unwrap_or(0);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&i.to_be_bytes());
    out.push(phase);
    while out.len() < len {
        let word = rng.next().to_le_bytes();
        let take = (len - out.len()).min(word.len());
        out.extend_from_slice(&word[..take]);
    }
    out
}

/// The connection index in a payload's header, if it has one.
fn header_index(bytes: &[u8]) -> Option<u32> {
    if bytes.len() < HEADER || &bytes[..4] != MAGIC {
        return None;
    }
    Some(u32::from_be_bytes(bytes[4..8].try_into().ok()?))
}

/// SplitMix64: a tiny, well-mixed generator; the payloads need variety, not secrecy.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_differ_per_connection_and_phase_and_name_their_owner() {
        let a = payload(7, 1);
        assert!((256..=4096).contains(&a.len()));
        assert_eq!(a, payload(7, 1), "deterministic");
        assert_ne!(a, payload(7, 2));
        assert_ne!(a, payload(8, 1));
        assert_eq!(header_index(&a), Some(7));
        assert_eq!(header_index(&payload(9_999, 2)), Some(9_999));
        assert_eq!(header_index(b"HOL"), None);
        let lens: std::collections::HashSet<usize> =
            (0..100).map(|i| payload(i, 1).len()).collect();
        assert!(lens.len() > 50, "lengths vary: {lens:?}");
    }
}
