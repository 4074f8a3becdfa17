//! `echo bench-rr`, `bench-conn` and `bench-bulk`: the load-generating halves
//! of the ECHO / WHO / SINK modes. Each prints exactly one JSON report line
//! ([`BenchReport`]) on stdout on success; a run with no successful operation,
//! a corrupted echo, or a SINK byte-count mismatch is an error instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use echo::{
    BenchReport, BulkReport, ConnReport, LatencySummary, LineRead, RrReport, SinkReply, WhoReply,
    parse_duration, read_line_limited,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::client::{connect_any, emit_json, resolve};

/// Bound on a single connect / request / reply in the benchmarks.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time allowed beyond the configured run time before a stuck
/// benchmark is abandoned.
const GRACE: Duration = Duration::from_secs(10);
/// Write buffer size for bench-bulk.
const BULK_CHUNK: usize = 64 * 1024;
/// Largest accepted bench-rr request size.
const MAX_RR_SIZE: u64 = 16 * 1024 * 1024;

#[derive(Debug, clap::Args)]
pub struct RrArgs {
    /// Server address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: String,
    /// Request (and response) size in bytes.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=MAX_RR_SIZE))]
    pub size: u64,
    /// Measured run time (e.g. 500ms, 5s, 2m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up time before the measured run.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
}

#[derive(Debug, clap::Args)]
pub struct ConnArgs {
    /// Server address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: String,
    /// Run time (e.g. 500ms, 5s, 2m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Number of concurrent connect/WHO/close workers.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub concurrency: u32,
    /// Start connections at this many per second in all (paced, an open loop: a slow one does
    /// not delay the next start, a free worker takes it; every start scheduled within the run
    /// time happens, late if the workers are all busy); unset, each worker starts its next as
    /// soon as its last one closed.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate: Option<u32>,
}

#[derive(Debug, clap::Args)]
pub struct BulkArgs {
    /// Server address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: String,
    /// Run time (e.g. 500ms, 5s, 2m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Number of parallel SINK connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub streams: u32,
}

// ---------------------------------------------------------------- bench-rr

pub async fn run_rr(args: RrArgs) -> anyhow::Result<()> {
    let addrs = resolve(&args.addr, IO_TIMEOUT).await?;
    let size = usize::try_from(args.size).context("--size does not fit in memory")?;
    let limit = args.warmup + args.duration + GRACE;
    let (warmup_count, mut samples) = tokio::time::timeout(limit, rr_loop(&addrs, size, &args))
        .await
        .map_err(|_| {
            anyhow!(
                "bench-rr against {} stalled (no progress within {limit:?})",
                args.addr
            )
        })??;
    let s = LatencySummary::from_nanos(&mut samples);
    emit_json(&BenchReport::Rr(RrReport {
        count: s.count,
        warmup_count,
        p50_us: s.p50_us,
        p90_us: s.p90_us,
        p99_us: s.p99_us,
        mean_us: s.mean_us,
    }))
}

/// Runs warm-up then the measured loop; returns the warm-up's round trips and the measured
/// ones' latencies in ns.
/// The buffers are allocated once; the sample vector is pre-sized from the
/// warm-up rate so the measured loop normally never allocates.
async fn rr_loop(
    addrs: &[SocketAddr],
    size: usize,
    args: &RrArgs,
) -> anyhow::Result<(u64, Vec<u64>)> {
    let mut stream = connect_any(addrs, IO_TIMEOUT)
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    stream
        .write_all(b"ECHO\n")
        .await
        .context("sending ECHO request")?;

    let request: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut response = vec![0u8; size];

    let warm_start = Instant::now();
    let warm_end = warm_start + args.warmup;
    let mut warm_count: u64 = 0;
    while Instant::now() < warm_end {
        round_trip(&mut stream, &request, &mut response).await?;
        warm_count += 1;
    }
    let capacity = if warm_count > 0 {
        let rate = warm_count as f64 / warm_start.elapsed().as_secs_f64().max(1e-9);
        (rate * args.duration.as_secs_f64() * 1.25).min(50e6) as usize
    } else {
        64 * 1024
    };
    let mut samples = Vec::with_capacity(capacity.max(1024));

    let end = Instant::now() + args.duration;
    loop {
        let t0 = Instant::now();
        round_trip(&mut stream, &request, &mut response).await?;
        let t1 = Instant::now();
        samples.push(u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX));
        if t1 >= end {
            break;
        }
    }
    Ok((warm_count, samples))
}

async fn round_trip(
    stream: &mut TcpStream,
    request: &[u8],
    response: &mut [u8],
) -> anyhow::Result<()> {
    stream.write_all(request).await.context("sending request")?;
    stream
        .read_exact(response)
        .await
        .context("reading echoed response (server closed or reset?)")?;
    ensure!(request == response, "echoed bytes differ from the request");
    Ok(())
}

// -------------------------------------------------------------- bench-conn

pub async fn run_conn(args: ConnArgs) -> anyhow::Result<()> {
    let addrs: Arc<[SocketAddr]> = resolve(&args.addr, IO_TIMEOUT).await?.into();
    let start = Instant::now();
    let deadline = start + args.duration;
    let pace = args.rate.map(|r| {
        Arc::new(Pace {
            start,
            interval: Duration::from_secs(1) / r,
            next: AtomicU64::new(0),
        })
    });
    let mut workers = JoinSet::new();
    for _ in 0..args.concurrency {
        workers.spawn(conn_worker(addrs.clone(), deadline, pace.clone()));
    }
    let mut samples = Vec::new();
    let mut errors: u64 = 0;
    let mut last_error = None;
    while let Some(joined) = workers.join_next().await {
        let worker = joined.context("bench-conn worker panicked")?;
        samples.extend_from_slice(&worker.samples);
        errors += worker.errors;
        if worker.last_error.is_some() {
            last_error = worker.last_error;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if samples.is_empty() {
        bail!(
            "bench-conn: no successful exchange with {} ({errors} errors; last: {})",
            args.addr,
            last_error.as_deref().unwrap_or("none")
        );
    }
    let s = LatencySummary::from_nanos(&mut samples);
    emit_json(&BenchReport::Conn(ConnReport {
        count: s.count,
        per_sec: (s.count as f64 / elapsed * 10.0).round() / 10.0,
        errors,
        p50_us: s.p50_us,
        p99_us: s.p99_us,
    }))
}

/// A shared schedule of connection starts: the `n`th at `start + n × interval`.
struct Pace {
    start: Instant,
    interval: Duration,
    next: AtomicU64,
}

impl Pace {
    /// Waits for the next unclaimed start time; `None` once it is past `deadline`.
    async fn claim(&self, deadline: Instant) -> Option<()> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let at = self.start + self.interval.checked_mul(u32::try_from(n).ok()?)?;
        if at >= deadline {
            return None;
        }
        tokio::time::sleep_until(at.into()).await;
        Some(())
    }
}

struct ConnWorker {
    samples: Vec<u64>,
    errors: u64,
    last_error: Option<String>,
}

async fn conn_worker(
    addrs: Arc<[SocketAddr]>,
    deadline: Instant,
    pace: Option<Arc<Pace>>,
) -> ConnWorker {
    let mut out = ConnWorker {
        samples: Vec::with_capacity(4096),
        errors: 0,
        last_error: None,
    };
    let mut line = Vec::with_capacity(512);
    loop {
        // Paced, every start scheduled before the deadline runs, however late; else a worker
        // stops at the deadline.
        let go = match &pace {
            Some(p) => p.claim(deadline).await.is_some(),
            None => Instant::now() < deadline,
        };
        if !go {
            break;
        }
        let t0 = Instant::now();
        match tokio::time::timeout(IO_TIMEOUT, one_conn(&addrs, &mut line)).await {
            Ok(Ok(())) => out
                .samples
                .push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            Ok(Err(err)) => {
                out.errors += 1;
                out.last_error = Some(format!("{err:#}"));
            }
            Err(_) => {
                out.errors += 1;
                out.last_error = Some(format!("exchange timed out after {IO_TIMEOUT:?}"));
            }
        }
    }
    out
}

/// connect, `WHO x`, read and validate the reply line, close.
async fn one_conn(addrs: &[SocketAddr], line: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut stream = connect_any(addrs, IO_TIMEOUT).await?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    stream.write_all(b"WHO x\n").await.context("sending WHO")?;
    let mut rd = BufReader::with_capacity(1024, &mut stream);
    match read_line_limited(&mut rd, line, 16 * 1024)
        .await
        .context("reading reply")?
    {
        LineRead::Line if line.ends_with(b"\n") => {}
        _ => bail!("server closed without a complete reply"),
    }
    serde_json::from_slice::<WhoReply>(line).context("bad WHO reply")?;
    Ok(())
}

// -------------------------------------------------------------- bench-bulk

pub async fn run_bulk(args: BulkArgs) -> anyhow::Result<()> {
    let addrs: Arc<[SocketAddr]> = resolve(&args.addr, IO_TIMEOUT).await?.into();
    let limit = args.duration + GRACE;
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut streams = JoinSet::new();
    for index in 0..args.streams {
        streams.spawn(bulk_stream(addrs.clone(), deadline, index));
    }
    let total = tokio::time::timeout(limit, async {
        let mut total: u64 = 0;
        while let Some(joined) = streams.join_next().await {
            total += joined.context("bench-bulk stream panicked")??;
        }
        anyhow::Ok(total)
    })
    .await
    .map_err(|_| {
        anyhow!(
            "bench-bulk against {} stalled (no completion within {limit:?})",
            args.addr
        )
    })??;
    let elapsed = start.elapsed().as_secs_f64();
    let gbit = total as f64 * 8.0 / elapsed / 1e9;
    emit_json(&BenchReport::Bulk(BulkReport {
        bytes: total,
        gbit_per_s: (gbit * 1e4).round() / 1e4,
        streams: args.streams,
    }))
}

/// One SINK stream: write until the deadline, half-close, and check the
/// server's byte count. Returns the bytes sent (== received).
async fn bulk_stream(
    addrs: Arc<[SocketAddr]>,
    deadline: Instant,
    index: u32,
) -> anyhow::Result<u64> {
    let mut stream = connect_any(&addrs, IO_TIMEOUT)
        .await
        .with_context(|| format!("stream {index}: connecting"))?;
    stream
        .write_all(b"SINK\n")
        .await
        .with_context(|| format!("stream {index}: sending SINK request"))?;
    let chunk = vec![0xA5u8; BULK_CHUNK];
    let mut sent: u64 = 0;
    loop {
        stream
            .write_all(&chunk)
            .await
            .with_context(|| format!("stream {index}: writing after {sent} bytes"))?;
        sent += BULK_CHUNK as u64;
        if Instant::now() >= deadline {
            break;
        }
    }
    stream
        .shutdown()
        .await
        .with_context(|| format!("stream {index}: shutting down write side"))?;
    let mut rd = BufReader::with_capacity(1024, &mut stream);
    let mut line = Vec::with_capacity(128);
    match read_line_limited(&mut rd, &mut line, 4096)
        .await
        .with_context(|| format!("stream {index}: reading SINK reply"))?
    {
        LineRead::Line => {}
        LineRead::Eof => bail!("stream {index}: server closed without a SINK reply"),
        LineRead::TooLong => bail!("stream {index}: SINK reply too long"),
    }
    let reply: SinkReply = serde_json::from_slice(&line).with_context(|| {
        format!(
            "stream {index}: bad SINK reply {:?}",
            String::from_utf8_lossy(&line).trim_end()
        )
    })?;
    ensure!(
        reply.received == sent,
        "stream {index}: byte count mismatch: sent {sent}, server received {}",
        reply.received
    );
    Ok(sent)
}
