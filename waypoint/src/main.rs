//! The waypoint binary: flags and the process contract's environment into a [`Config`],
//! logging, then `app::build(config).start()` until SIGTERM/SIGINT, then drain.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dataplane::record_encryption::KernelTlsSetting;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use waypoint::app;
use waypoint::config::{AccessLog, Config, MeshdSource, PlainHttp, Source, TraceSettings};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The mesh's L7 proxy (waypoint): HBONE in, HTTP/gRPC routing, HBONE out"
)]
struct Args {
    /// The Gateway this waypoint runs for, `namespace/name`.
    #[arg(long)]
    gateway: String,
    #[arg(long, env = "POD_NAME", default_value = "")]
    pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pod_namespace: String,
    /// The pod's IP: HBONE, readiness and metrics listen on it.
    #[arg(long, env = "POD_IP")]
    pod_ip: IpAddr,
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node: String,
    /// meshd: unix:/path/to/meshd.sock or host:port. Without it (and --token-file) the
    /// waypoint runs standalone: only the plain-HTTP listener serves (the bench).
    #[arg(long, env = "MESHD_ADDRESS", requires = "token_file")]
    meshd: Option<String>,
    /// The service-account token file (`meshd workload-token`).
    #[arg(long, env = "MESH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The mesh root, PEM, that meshd's TLS certificate chains to (meshd over TCP).
    #[arg(long, env = "MESHD_CA")]
    meshd_ca: Option<PathBuf>,
    #[arg(long, env = "MESHD_NAME", default_value = "meshd.cluster.local")]
    meshd_name: String,
    /// The service account to get a certificate for (default: the token's, else the Gateway's name).
    #[arg(long)]
    service_account: Option<String>,
    #[arg(long, default_value_t = 15008)]
    hbone_port: u16,
    #[arg(long, default_value_t = 15021)]
    ready_port: u16,
    #[arg(long, default_value_t = 15020)]
    metrics_port: u16,
    /// Milliseconds an unknown-protocol client may stay silent before it is treated as TCP.
    #[arg(long, default_value_t = 100)]
    sniff_timeout_ms: u64,
    /// Seconds a stopping waypoint keeps serving what it has.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Also serve plain HTTP here (bench), every request routed to --http-backend.
    #[arg(long, requires = "http_backend")]
    http_listen: Option<SocketAddr>,
    /// The plain-HTTP listener's backend, host:port over plain TCP.
    #[arg(long)]
    http_backend: Option<SocketAddr>,
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// The JSON access log, one line per request: `-` standard output (Istio's
    /// /dev/stdout), `off`, or a file to append to.
    #[arg(long, env = "ACCESS_LOG", default_value = "-")]
    access_log: String,
    /// Export a span per request to this OTLP/gRPC collector (`host:port` or
    /// `http://host:port`). Without it no spans are made; `x-request-id` is still added.
    #[arg(long, env = "TRACE_COLLECTOR")]
    trace_collector: Option<String>,
    /// Percent of requests traced when the request carries no sampling decision (0-100;
    /// Istio's default is 1). A sampled flag that arrives in `traceparent` or B3 is honoured.
    #[arg(long, env = "TRACE_SAMPLING", default_value_t = 1.0, value_parser = sampling)]
    trace_sampling: f64,
    /// Milliseconds finished spans wait to be sent in a batch.
    #[arg(long, default_value_t = 1000)]
    trace_flush_ms: u64,
    /// Whether HBONE's TLS records are handed to the kernel (kTLS) after each handshake, as
    /// ztunnel's flag: `auto` where the kernel has the `tls` ULP with both HBONE suites and key
    /// updates (asked once at start; /config_dump's hboneRecordEncryption says what it found
    /// and what is in use); `off` keeps rustls in user space.
    #[arg(long, value_enum, default_value_t = KernelTlsSetting::Auto)]
    kernel_tls: KernelTlsSetting,
}

fn sampling(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: local mode writes logs to files that tests and people grep.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        fmt.json().init();
    } else {
        fmt.init();
    }
    meshcore::tls::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let source = match (args.meshd.clone(), args.token_file.clone()) {
        (Some(address), Some(token_file)) => Source::Meshd(MeshdSource {
            address,
            token_file,
            ca_file: args.meshd_ca.clone(),
            server_name: args.meshd_name.clone(),
            service_account: args.service_account.clone(),
        }),
        _ if args.http_listen.is_some() => Source::Standalone,
        _ => anyhow::bail!(
            "--meshd (MESHD_ADDRESS) and --token-file (MESH_TOKEN_FILE) are required, unless only --http-listen is served"
        ),
    };
    let mut config = Config::new(&args.gateway, args.pod_ip, source);
    config.pod_name = args.pod_name;
    if !args.pod_namespace.is_empty() {
        config.pod_namespace = args.pod_namespace;
    }
    config.node = args.node;
    config.hbone_addr = SocketAddr::new(args.pod_ip, args.hbone_port);
    config.ready_addr = SocketAddr::new(args.pod_ip, args.ready_port);
    config.metrics_addr = SocketAddr::new(args.pod_ip, args.metrics_port);
    config.sniff_timeout = Duration::from_millis(args.sniff_timeout_ms);
    config.drain_timeout = Duration::from_secs(args.drain_timeout);
    config.kernel_tls = args.kernel_tls;
    if let (Some(listen), Some(backend)) = (args.http_listen, args.http_backend) {
        config.plain_http = Some(PlainHttp { listen, backend });
    }
    config.access_log = match args.access_log.as_str() {
        "-" => AccessLog::Stdout,
        "off" => AccessLog::Off,
        path => AccessLog::File(path.into()),
    };
    config.tracing = args.trace_collector.map(|collector| TraceSettings {
        collector,
        sampling_percent: args.trace_sampling,
        flush_every: Duration::from_millis(args.trace_flush_ms),
    });
    let mut running = app::build(config)
        .context("building the waypoint")?
        .start()
        .await
        .context("starting the waypoint")?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
        exit = running.first_exit() => {
            error!(%exit, "a background task ended; exiting so the waypoint is restarted");
            std::process::exit(70);
        }
    }
    info!("stopping: draining");
    let left = running.stop().await;
    if left > 0 {
        warn!(
            connections = left,
            "drain timeout: closing the connections still open"
        );
    }
    info!("waypoint stopped");
    Ok(())
}
