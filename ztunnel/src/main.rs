//! The ztunnel binary: parses flags, wires the modules together, and unenrolls on shutdown.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use meshcore::hbone::{Pool, PoolSettings};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::info;
use ztunnel::capture::{Capture, CaptureMode};
use ztunnel::certs::CertManager;
use ztunnel::meshd::Meshd;
use ztunnel::proxy::Ctx;
use meshcore::policy::{DecisionCache, PolicySet};
use ztunnel::policy::LiveConns;
use ztunnel::{config, netns, pods, policy};

#[derive(Parser, Debug)]
#[command(about = "Per-node agent of the ambient mesh: captures enrolled pods' TCP and carries it over HBONE")]
struct Args {
    /// The Kubernetes node this agent serves.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Where meshd listens: unix:/path/to/meshd.sock or host:port.
    #[arg(long, env = "MESHD_ADDR")]
    meshd: String,
    /// File holding this node's token (from `meshd node-token --node <node>`).
    #[arg(long, env = "NODE_TOKEN_FILE")]
    token_file: String,
    /// How pod traffic is captured.
    #[arg(long, value_enum, default_value_t = CaptureMode::Nftables)]
    capture: CaptureMode,
    /// Istio's root namespace: policies there without a selector apply mesh-wide.
    #[arg(long, default_value = meshcore::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    // Record the host netns on the main thread, before any runtime thread moves around.
    netns::init_host_netns().context("reading this process's network namespace")?;
    meshcore::tls::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let token = Meshd::read_token(&args.token_file)?;
    let meshd = Meshd::new(&args.meshd, &token)?;
    let (config_tx, config_rx) = watch::channel(None);
    tokio::spawn(config::run(meshd.clone(), args.node.clone(), config_tx));
    let (policies_tx, policies_rx) = watch::channel(Arc::new(PolicySet::compile([], &args.root_namespace)));
    let live = Arc::new(LiveConns::default());
    let decisions = Arc::new(DecisionCache::new(65536));
    tokio::spawn(policy::run(config_rx.clone(), args.root_namespace.clone(), policies_tx, live.clone(), decisions.clone()));
    let ctx = Arc::new(Ctx {
        node: args.node.clone(),
        config: config_rx,
        certs: CertManager::new(meshd),
        // A connection is full when the peer would refuse more streams: Istio's HBONE servers
        // (and ours) advertise 200 concurrent streams.
        pool: Pool::new(PoolSettings { max_streams_per_conn: 200, ..PoolSettings::default() }),
        capture: Capture::new(args.capture),
        policies: policies_rx,
        decisions,
        live,
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let pods = tokio::spawn(pods::run(ctx, shutdown_rx));
    info!(node = %args.node, meshd = %args.meshd, capture = %args.capture, "ztunnel started");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    info!("shutting down: unenrolling pods");
    let _ = shutdown_tx.send(true);
    pods.await.context("pod manager")?;
    info!("ztunnel stopped");
    Ok(())
}
