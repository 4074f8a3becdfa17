//! The `meshd` command line: `run` the control plane, or print a `node-token` or a
//! `workload-token`.
//!
//! Owns argument parsing, logging setup and signal handling; everything else is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use meshd::daemon::{self, RunConfig, RunOptions};
use meshd::settings::{Listen, parse_duration};
use meshd::state;
use meshd::translate::Settings;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "meshd",
    version,
    about = "The mesh control plane: config stream and certificate authority"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Watch a config directory (or the Kubernetes API) and serve the config stream and the CA.
    Run(Box<RunArgs>),
    /// Print a token a node's ztunnel authenticates with (`node:<name>:<expiry>:<mac>`).
    NodeToken {
        /// meshd's state directory (the token derives from its node secret, created if missing).
        #[arg(long)]
        state_dir: PathBuf,
        /// The node name.
        #[arg(long)]
        node: String,
        /// How long the token is valid, e.g. 12h, 30d. Mint a new one before it expires.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Print a token a waypoint authenticates with as its service account
    /// (`sa:<namespace>:<service account>:<expiry>:<mac>`).
    WorkloadToken {
        /// meshd's state directory (the token derives from its secret, created if missing).
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// How long the token is valid, e.g. 12h, 30d. Mint a new one before it expires.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Rotate the CA root without dropping connections (a running meshd picks changes up live).
    Ca {
        #[command(subcommand)]
        step: CaStep,
    },
}

#[derive(Subcommand)]
enum CaStep {
    /// Step 1: create a new root; the mesh trusts old and new, the old one still signs.
    PrepareRotation(CaArgs),
    /// Step 2: the new root signs from now on; the old one stays trusted.
    Activate(CaArgs),
    /// Step 3: stop trusting retired roots (after certificates they signed have been renewed).
    Retire(CaArgs),
}

#[derive(clap::Args)]
struct CaArgs {
    /// meshd's state directory (local mode).
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    state_dir: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Apply the step to the CA Secret in the Kubernetes API (every replica follows it).
    #[arg(long)]
    kubernetes: bool,
    /// kubeconfig for --kubernetes (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// meshd's namespace, where its CA Secret is.
    #[arg(long, env = "POD_NAMESPACE", default_value = "mesh-system")]
    namespace: String,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory of Kubernetes-style YAML/JSON manifests, watched for changes (local mode).
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config_dir: Option<PathBuf>,
    /// Read resources from the Kubernetes API instead of a directory (Kubernetes mode).
    #[arg(long)]
    kubernetes: bool,
    /// kubeconfig for --kubernetes (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// meshd's own namespace (its Lease, CA Secret and root ConfigMap).
    #[arg(long, env = "POD_NAMESPACE", default_value = "mesh-system")]
    namespace: String,
    /// This replica's name in leader election (the pod's name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Leader election: how long a lease lasts without renewal (client-go's default 15s).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// Leader election: a leader that could not renew within this steps down (10s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    renew_deadline: Duration,
    /// Leader election: how often to renew or retry (2s).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    retry_period: Duration,
    /// The audience service-account tokens presented to meshd must carry.
    #[arg(long, default_value = meshd::kube::DEFAULT_TOKEN_AUDIENCE)]
    token_audience: String,
    /// ztunnel's service account as NAMESPACE/NAME (default: <namespace>/ztunnel): its tokens
    /// prove the node their pod runs on.
    #[arg(long)]
    ztunnel_service_account: Option<String>,
    /// Where the CA root and the node secret live (created if missing).
    #[arg(long)]
    state_dir: PathBuf,
    /// unix:/path/to/meshd.sock (root only), or IP:PORT for gRPC over TLS; the server certificate
    /// is issued by the mesh CA for `meshd.<trust domain>` (clients: ztunnel --meshd-ca).
    #[arg(long, value_parser = |s: &str| s.parse::<Listen>())]
    listen: Listen,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Istio's root namespace; must match ztunnels' --root-namespace (its policies go to every
    /// node, other namespaces' only to nodes running pods of theirs).
    #[arg(long, default_value = meshcore::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Default and maximum workload certificate lifetime, e.g. 10s, 5m, 24h.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Write what meshd renders (waypoint objects, `DIR/objects/<ns>.<gw>.yaml`) and status
    /// (`DIR/status/<Kind>.<ns>.<name>.json`) here, for local mode's controller.
    #[arg(long)]
    write_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::NodeToken {
            state_dir,
            node,
            ttl,
        } => node_token(&state_dir, &node, ttl),
        Cmd::WorkloadToken {
            state_dir,
            namespace,
            service_account,
            ttl,
        } => workload_token(&state_dir, &namespace, &service_account, ttl),
        Cmd::Run(args) => run(*args),
        Cmd::Ca { step } => ca_step(step),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("meshd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn node_token(state_dir: &std::path::Path, node: &str, ttl: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(
        !node.is_empty() && !node.contains(':'),
        "node name must be non-empty and contain no ':'"
    );
    let auth = state::node_authority(state_dir)?;
    println!("{}", auth.token(node, ttl));
    Ok(())
}

fn workload_token(
    state_dir: &std::path::Path,
    namespace: &str,
    service_account: &str,
    ttl: Duration,
) -> anyhow::Result<()> {
    for (what, v) in [
        ("namespace", namespace),
        ("service account", service_account),
    ] {
        anyhow::ensure!(
            !v.is_empty() && !v.contains(':'),
            "{what} must be non-empty and contain no ':'"
        );
    }
    let auth = state::node_authority(state_dir)?;
    println!("{}", auth.sa_token(namespace, service_account, ttl));
    Ok(())
}

fn ca_step(step: CaStep) -> anyhow::Result<()> {
    let (CaStep::PrepareRotation(args) | CaStep::Activate(args) | CaStep::Retire(args)) = &step;
    if args.kubernetes {
        return ca_step_kubernetes(&step, args);
    }
    let state_dir = args.state_dir.clone().unwrap_or_default();
    let ca_dir = state::ca_dir(&state_dir);
    anyhow::ensure!(
        ca_dir.join("root-cert.pem").exists(),
        "{} has no CA yet: start meshd once first",
        ca_dir.display()
    );
    match step {
        CaStep::PrepareRotation(_) => {
            meshd::roots::prepare(&ca_dir, &args.trust_domain)?;
            println!(
                "new root created under {}/next: trusted now, not yet signing",
                ca_dir.display()
            );
        }
        CaStep::Activate(_) => {
            meshd::roots::activate(&ca_dir)?;
            println!("new root is signing; the old root stays trusted until `meshd ca retire`");
        }
        CaStep::Retire(_) => {
            let n = meshd::roots::retire(&ca_dir)?;
            println!("retired {n} old root(s)");
        }
    }
    Ok(())
}

/// A rotation step on the CA Secret: the same steps as on a state directory, made on the
/// Secret with its resourceVersion as precondition, so replicas and operators never interleave.
fn ca_step_kubernetes(step: &CaStep, args: &CaArgs) -> anyhow::Result<()> {
    use meshd::kube::ca_secret::{self, RotationStep};
    let which = match step {
        CaStep::PrepareRotation(_) => RotationStep::Prepare,
        CaStep::Activate(_) => RotationStep::Activate,
        CaStep::Retire(_) => RotationStep::Retire,
    };
    let mut k = meshd::kube::KubeSettings::new(&args.namespace, "meshd-ca");
    k.kubeconfig = args.kubeconfig.clone();
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let said = rt.block_on(async {
        let client = meshd::kube::client(&k).await?;
        ca_secret::rotate(client, &args.namespace, &args.trust_domain, which).await
    })?;
    println!("{said}");
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let kube = if args.kubernetes {
        let identity = match args.pod_name {
            Some(n) => n,
            None => hostname()?,
        };
        let mut k = meshd::kube::KubeSettings::new(&args.namespace, &identity);
        k.kubeconfig = args.kubeconfig;
        k.lease = meshd::kube::LeaseTimings {
            duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
        };
        anyhow::ensure!(
            k.lease.renew_deadline < k.lease.duration
                && k.lease.retry_period < k.lease.renew_deadline,
            "leader election needs --retry-period < --renew-deadline < --lease-duration"
        );
        k.token_audience = args.token_audience;
        if let Some(sa) = args.ztunnel_service_account {
            let (ns, name) = sa
                .split_once('/')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                .context("--ztunnel-service-account must be NAMESPACE/NAME")?;
            k.ztunnel_service_account = (ns.to_string(), name.to_string());
        }
        Some(k)
    } else {
        None
    };
    let cfg = RunConfig {
        config_dir: args.config_dir.unwrap_or_default(),
        state_dir: args.state_dir,
        listen: args.listen,
        settings: Settings {
            trust_domain: args.trust_domain,
            cluster_domain: args.cluster_domain,
        },
        root_namespace: args.root_namespace,
        cert_lifetime: args.cert_lifetime,
        poll_interval: Duration::from_millis(250),
    };
    let opts = RunOptions {
        write_dir: args.write_dir,
        kube,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async {
        let shutdown = shutdown_signal()?;
        daemon::run_with(cfg, opts, shutdown)
            .await
            .map_err(anyhow::Error::from)
    })
}

/// This machine's name (a replica's default identity in leader election).
fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the hostname (pass --pod-name)")?;
    Ok(name.trim().to_string())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a terminal: logs redirected to files are grepped.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("received SIGTERM"),
            _ = int.recv() => tracing::info!("received SIGINT"),
        }
    })
}
