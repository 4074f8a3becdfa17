//! The ztunnel binary: parses flags, wires the modules together and serves admin endpoints.
//! A stop (SIGTERM/SIGINT) is a restart by default: listeners close but capture and the pinned
//! eBPF state stay, so enrolled pods fail closed — exactly as after a crash (SIGKILL) — until a
//! ztunnel returns and adopts them. `--unenroll-on-exit` makes a stop leave nothing behind
//! instead; `ztunnel cleanup --node NAME` does that after the fact (`--orphans`: every instance
//! whose network namespace is gone).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use meshcore::hbone::{Pool, PoolSettings};
use meshcore::policy::{DecisionCache, PolicySet};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};
use ztunnel::admin::{self, AdminState};
use ztunnel::capture::{Capture, CaptureMode};
use ztunnel::certs::CertManager;
use ztunnel::meshd::Meshd;
use ztunnel::metrics::Metrics;
use ztunnel::pods::OnExit;
use ztunnel::policy::LiveConns;
use ztunnel::proxy::Ctx;
use ztunnel::supervise::Supervisor;
use ztunnel::{config, dump, netns, pods, policy};

#[derive(Parser, Debug)]
#[command(
    about = "Per-node agent of the ambient mesh: captures enrolled pods' TCP and carries it over HBONE"
)]
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
    /// The mesh root certificate(s), PEM, that meshd's TLS certificate must chain to (needed
    /// when --meshd is host:port: meshd over TCP is always TLS).
    #[arg(long, env = "MESHD_CA")]
    meshd_ca: Option<std::path::PathBuf>,
    /// The DNS name meshd's certificate must carry: `meshd.<trust domain>`.
    #[arg(long, env = "MESHD_NAME", default_value = "meshd.cluster.local")]
    meshd_name: String,
    /// How pod traffic is captured: `auto` prefers eBPF and falls back to nftables (saying why).
    #[arg(long, value_enum, default_value_t = CaptureMode::Auto)]
    capture: CaptureMode,
    /// Same-node fast path: an authorized connection between two enrolled pods of this node is
    /// spliced in the kernel (sockmap) instead of going over HBONE. Needs eBPF capture.
    #[arg(long)]
    fast_path: bool,
    /// Log each eBPF capture decision in enrolled pods (redirect, pass, drop, with its reason)
    /// at this level and above; `off` leaves the logging out of the loaded programs.
    #[arg(long, value_enum, default_value_t = ztunnel::capture::EbpfLog::Off)]
    ebpf_log: ztunnel::capture::EbpfLog,
    /// On SIGTERM/SIGINT, remove capture from every pod and delete the pinned eBPF state:
    /// ztunnel is leaving the node for good and its pods go back to direct traffic. Without it a
    /// stop is a restart: capture stays, pods fail closed until a ztunnel returns and adopts them.
    #[arg(long)]
    unenroll_on_exit: bool,
    /// Seconds a stopping ztunnel keeps serving the connections it has (HBONE clients are told
    /// to go elsewhere for new ones) before it exits anyway.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Istio's root namespace: policies there without a selector apply mesh-wide.
    #[arg(long, default_value = meshcore::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Admin endpoint (/config_dump, /logging): localhost only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics).
    #[arg(long, default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    /// Readiness (/healthz/ready).
    #[arg(long, default_value = "[::]:15021")]
    ready_addr: SocketAddr,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Seconds a config from meshd that removes every pod of this node at once is held back
    /// before it is applied (unless the pods' network namespaces are gone): an emptied config
    /// source or a control-plane bug looks exactly like that, and applying it would unenroll
    /// every pod and drop their STRICT and DENY.
    #[arg(long, default_value_t = 10)]
    mass_removal_hold: u64,
    /// What to do with a connection to a Service (VIP) or pod (IP) bound to a waypoint
    /// (label istio.io/use-waypoint) that cannot be used — no such Gateway, not for this kind of
    /// traffic, no waypoint pods. `bypass` sends it direct, as Istio does (fail open: the
    /// waypoint's L7 routing and policy are skipped); each such connection is counted in
    /// mesh_waypoint_bypass_total{destination_service,waypoint,reason}, logged (throttled per
    /// destination) and the binding's state is in /config_dump. `refuse` closes it instead
    /// (fail closed), counted as a connection with response_flags="DENY".
    #[arg(long, value_enum, default_value_t = ztunnel::outbound::MissingWaypoint::Bypass)]
    missing_waypoint: ztunnel::outbound::MissingWaypoint,
}

type LogHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

fn init_logging(format: &str) -> LogHandle {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    if format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init();
    }
    handle
}

/// `ztunnel cleanup`: removes eBPF state a stopped ztunnel left behind — this node's (run it in
/// the network namespace that ztunnel ran in, after stopping it), or every orphan's.
#[derive(Parser, Debug)]
#[command(
    name = "ztunnel cleanup",
    about = "Remove the eBPF programs, links, pins and maps a stopped ztunnel left behind"
)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["node", "orphans"])))]
struct CleanupArgs {
    /// This node's ztunnel, stopped for good: its eBPF-captured pods stop failing closed and go
    /// direct (nftables rules live in the pods and go when a ztunnel unenrolls them).
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// Every instance, of any node, whose network namespace no longer exists (always safe:
    /// live ztunnels and killed ones that may still return are left alone).
    #[arg(long)]
    orphans: bool,
    /// Only list what would be removed, one path per line.
    #[arg(long)]
    dry_run: bool,
}

fn cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    init_logging("text");
    if args.orphans {
        let dirs = if args.dry_run {
            ztunnel::cleanup::orphaned_instance_dirs().context("finding orphaned eBPF state")?
        } else {
            ztunnel::cleanup::remove_orphans()?
        };
        for d in &dirs {
            println!("{}", d.display());
        }
        return Ok(());
    }
    let node = args.node.context("--node or --orphans is required")?;
    let dir = ztunnel::ebpf::instance_dir(&node)?;
    if args.dry_run {
        if dir.exists() {
            println!("{}", dir.display());
        }
        return Ok(());
    }
    ztunnel::ebpf::remove_dir(&dir).with_context(|| format!("cleaning up {}", dir.display()))?;
    println!("removed {}", dir.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("cleanup") {
        let matches = CleanupArgs::command()
            .bin_name("ztunnel cleanup")
            .get_matches_from(std::env::args().skip(1));
        return cleanup(CleanupArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()));
    }
    let args = Args::parse();
    let log = init_logging(&args.log_format);
    raise_fd_limit();
    // Record the host netns on the main thread, before any runtime thread moves around.
    netns::init_host_netns().context("reading this process's network namespace")?;
    meshcore::tls::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args, log))
}

/// Every proxied connection costs ztunnel two or three fds, and the usual soft limit (1024)
/// would cap a node at a few hundred connections: raise the soft limit to the hard one, as
/// Istio's ztunnel does. Failure is logged, not fatal.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-files limit"),
    }
}

async fn run(args: Args, log: LogHandle) -> anyhow::Result<()> {
    let token = Meshd::read_token(&args.token_file)?;
    let meshd_tls = args
        .meshd_ca
        .clone()
        .map(|ca_file| ztunnel::meshd::MeshdTls {
            ca_file,
            server_name: args.meshd_name.clone(),
        });
    let meshd = Meshd::new(&args.meshd, &token, meshd_tls)?;
    // Capture first: an explicit mode that cannot run stops us before anything else starts.
    let capture = Capture::new(args.capture, &args.node, args.fast_path, args.ebpf_log)
        .context("setting up capture")?;
    if args.fast_path && capture.ebpf().is_none_or(|e| !e.fast_path()) {
        warn!(capture = %capture.mode(), "--fast-path needs eBPF capture; same-node traffic uses HBONE");
    }
    if let Some(reason) = capture.fallback_reason() {
        warn!(requested = %args.capture, effective = %capture.mode(), %reason, "capture fell back");
    }
    let metrics = Metrics::new();
    metrics.set_capture_mode(&capture.mode().to_string());
    let (config_tx, config_rx) = watch::channel(None);
    let mut tasks = Supervisor::default();
    tasks.spawn(
        "config",
        config::run(
            meshd.clone(),
            meshcore::proto::config::SubscribeRequest {
                node: args.node.clone(),
                waypoint: String::new(),
            },
            Duration::from_secs(args.mass_removal_hold),
            config_tx,
        ),
    );
    let (policies_tx, policies_rx) =
        watch::channel(Arc::new(PolicySet::compile([], &args.root_namespace)));
    let live = Arc::new(LiveConns::default());
    let decisions = Arc::new(DecisionCache::new(65536));
    tasks.spawn(
        "policy",
        policy::run(
            config_rx.clone(),
            args.root_namespace.clone(),
            policies_tx,
            live.clone(),
            decisions.clone(),
        ),
    );
    let certs = CertManager::new(meshd, metrics.clone());
    tasks.spawn(
        "trust-bundle",
        trust_bundle_watch(config_rx.clone(), certs.clone()),
    );
    let ctx = Arc::new(Ctx {
        node: args.node.clone(),
        config: config_rx,
        certs,
        // A connection is full when the peer would refuse more streams: Istio's HBONE servers
        // (and ours) advertise 200 concurrent streams.
        pool: Pool::new(PoolSettings {
            max_streams_per_conn: 200,
            ..PoolSettings::default()
        }),
        capture,
        policies: policies_rx,
        decisions,
        live,
        metrics: metrics.clone(),
        enrolled: Default::default(),
        local_pods: Default::default(),
        drain: Default::default(),
        admission: Default::default(),
        waypoints: ztunnel::outbound::Waypoints::new(args.missing_waypoint),
    });
    let admin_state = Arc::new(AdminState {
        metrics,
        ready: Box::new({
            let ctx = ctx.clone();
            move || dump::ready(&ctx)
        }),
        config_dump: Box::new({
            let ctx = ctx.clone();
            move || dump::config_dump(&ctx)
        }),
        set_log_level: Box::new(move |level| {
            let filter =
                EnvFilter::try_new(level).map_err(|e| format!("bad log filter {level:?}: {e}"))?;
            log.reload(filter).map_err(|e| e.to_string())?;
            info!(level, "log level changed");
            Ok(())
        }),
    });
    let bound = admin::bind(
        admin_state,
        args.admin_addr,
        args.metrics_addr,
        args.ready_addr,
    )
    .await?;
    tasks.spawn("admin", bound.run());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let on_exit = if args.unenroll_on_exit {
        OnExit::Unenroll
    } else {
        OnExit::KeepCapture
    };
    let mut pods = tokio::spawn(pods::run(ctx.clone(), shutdown_rx, on_exit));
    info!(node = %args.node, meshd = %args.meshd, capture = %ctx.capture.mode(), admin = %args.admin_addr, metrics = %args.metrics_addr, "ztunnel started");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
        // Fail closed: a dead task would leave stale policy or config in force forever. Exit
        // at once, as a crash does; capture stays and pods fail closed until a restart.
        exit = tasks.first_exit() => {
            error!(%exit, "a background task ended; exiting so ztunnel is restarted (capture stays)");
            std::process::exit(70);
        }
        r = &mut pods => {
            error!(result = ?r.map_err(|e| e.to_string()), "the pod manager ended; exiting so ztunnel is restarted (capture stays)");
            std::process::exit(70);
        }
    }
    info!(?on_exit, "shutting down");
    let _ = shutdown_tx.send(true);
    if let Err(e) = pods.await {
        error!(error = %e, "pod manager ended abnormally");
    }
    // Listeners are closed (a next ztunnel takes new connections); finish what we serve.
    let open = ctx.drain.active();
    if open > 0 {
        info!(
            connections = open,
            timeout_s = args.drain_timeout,
            "draining"
        );
    }
    let left = ctx
        .drain
        .stop(Duration::from_secs(args.drain_timeout))
        .await;
    if left > 0 {
        warn!(
            connections = left,
            "drain timeout: closing the connections still open"
        );
    }
    if on_exit == OnExit::Unenroll {
        ctx.capture.shutdown();
    }
    info!("ztunnel stopped");
    Ok(())
}

/// When meshd's trust bundle changes (a root added or retired), fetch fresh certificates so
/// they carry the new bundle; connections in flight are untouched.
async fn trust_bundle_watch(mut config: ztunnel::config::ConfigRx, certs: Arc<CertManager>) {
    let mut last: Option<Vec<String>> = None;
    loop {
        let roots = config
            .borrow_and_update()
            .as_ref()
            .and_then(|s| s.trust_bundle().map(|t| t.roots_pem.clone()));
        if roots.is_some() && last.is_some() && roots != last {
            info!(
                roots = roots.as_ref().map_or(0, Vec::len),
                "trust bundle changed; renewing certificates"
            );
            certs.refresh_all();
        }
        if roots.is_some() {
            last = roots;
        }
        if config.changed().await.is_err() {
            return;
        }
    }
}
