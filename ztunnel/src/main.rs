//! The ztunnel binary: parses flags into a [`Config`], sets up logging, and runs [`app`] until a signal.
//! A stop (SIGTERM/SIGINT) is a restart by default: listeners close but capture and the pinned
//! eBPF state stay, so enrolled pods fail closed — exactly as after a crash (SIGKILL) — until a
//! ztunnel returns and adopts them. `--unenroll-on-exit` makes a stop leave nothing behind
//! instead; `ztunnel cleanup --node NAME` (`--ebpf-instance NAME` for a named instance) does
//! that after the fact, pods included (`--orphans`: every netns-keyed instance whose network
//! namespace is gone, and records of pods that are gone).

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};
use ztunnel::admin::SetLogLevelFn;
use ztunnel::app::{self, Exit};
use ztunnel::ebpf::Instance;
use ztunnel::settings::Config;

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
#[command(group(
    clap::ArgGroup::new("what")
        .required(true)
        .multiple(true)
        .args(["node", "orphans", "ebpf_instance"])
))]
struct CleanupArgs {
    /// This node's ztunnel, stopped for good: every pod it enrolled goes back to how it was
    /// before (no nftables table, policy rule/route or changed sysctl), then its eBPF state
    /// goes; its pods stop failing closed and go direct. The instance started in this network
    /// namespace, or, if there is none, the one named after the node (`--ebpf-instance NAME`,
    /// as the DaemonSet runs ztunnel).
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// The named instance of a ztunnel started with `--ebpf-instance NAME` (Kubernetes: the
    /// node name), stopped for good: as --node, from any network namespace.
    #[arg(long, value_parser = ebpf_instance, conflicts_with = "orphans")]
    ebpf_instance: Option<String>,
    /// Every instance, of any node, whose network namespace no longer exists (always safe:
    /// live ztunnels and killed ones that may still return are left alone). Never a named
    /// instance: nothing tells whether a new ztunnel is about to adopt it. Ignores --node
    /// (NODE_NAME is set in ztunnel's pod).
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
            ztunnel::cleanup::remove_orphan_records()
                .context("dropping records of pods that are gone")?;
            ztunnel::cleanup::remove_orphans()?
        };
        for d in &dirs {
            println!("{}", d.display());
        }
        return Ok(());
    }
    let node = args.node.unwrap_or_default();
    let which = instance_to_clean(&node, args.ebpf_instance.as_deref())?;
    let dir = which.dir()?;
    let instance = ztunnel::pod_record::instance_name(&which);
    if args.dry_run {
        for (cookie, r) in ztunnel::pod_record::all() {
            if r.instance == instance {
                println!("pod netns cookie {cookie:x}");
            }
        }
        if dir.exists() {
            println!("{}", dir.display());
        }
        return Ok(());
    }
    // Pods first: while the eBPF state is still pinned they keep failing closed, so none goes
    // direct with half of its enrollment still in place.
    ztunnel::netns::init_host_netns().context("reading this process's network namespace")?;
    for pod in ztunnel::cleanup::restore_pods(&instance)? {
        match pod.netns {
            Some(p) => println!("restored pod netns {}", p.display()),
            None => println!(
                "dropped the record of gone pod netns {:x}",
                pod.netns_cookie
            ),
        }
    }
    ztunnel::ebpf::remove_dir(&dir).with_context(|| format!("cleaning up {}", dir.display()))?;
    println!("removed {}", dir.display());
    Ok(())
}

fn ebpf_instance(s: &str) -> Result<String, String> {
    ztunnel::ebpf::valid_name(s).map_err(|e| e.to_string())
}

/// The instance `ztunnel cleanup` acts on: the named one with `--ebpf-instance`; with `--node`
/// only, the one keyed by this network namespace, unless nothing of it exists and the instance
/// named after the node does (a ztunnel pod ran it; its netns is not this one).
fn instance_to_clean(node: &str, named: Option<&str>) -> anyhow::Result<Instance> {
    let here = Instance::new(node, named)?;
    if named.is_some() {
        return Ok(here);
    }
    let Ok(by_node) = Instance::new(node, Some(node)) else {
        return Ok(here);
    };
    if !instance_exists(&here)? && instance_exists(&by_node)? {
        eprintln!(
            "no eBPF state or pod record of node {node}'s ztunnel in this network namespace: acting on {} (ztunnel --ebpf-instance {node}, as the DaemonSet runs it)",
            by_node.dir()?.display()
        );
        return Ok(by_node);
    }
    Ok(here)
}

/// Whether `instance` left anything: its bpffs directory or a pod's record.
fn instance_exists(instance: &Instance) -> anyhow::Result<bool> {
    let name = instance.dir_name()?;
    Ok(instance.dir()?.exists()
        || ztunnel::pod_record::all()
            .iter()
            .any(|(_, r)| r.instance == name))
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("cleanup") {
        let matches = CleanupArgs::command()
            .bin_name("ztunnel cleanup")
            .get_matches_from(std::env::args().skip(1));
        return cleanup(CleanupArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()));
    }
    let config = Config::parse();
    let log = init_logging(&config.log_format);
    app::prepare()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads(config.worker_threads))
        .enable_all()
        .build()?;
    match runtime.block_on(run(config, log))? {
        Exit::Stopped => Ok(()),
        // At once, without dropping the runtime (its tasks must not see a stop).
        Exit::Fatal(code) => std::process::exit(code),
    }
}

/// `--worker-threads`, else one thread on a node with at most 2 CPUs and two on a larger one.
///
/// Two threads on a 2-CPU node measured worse on every figure than one: a connection's copy
/// task and its HTTP/2 connection task wake each other across threads (2.4× the context
/// switches per connection and per MB), both threads compete with the node's pods for the same
/// two cores, and bulk throughput and 1 KiB latency were no better (README, "The HBONE data
/// path"). From 3 CPUs up, two threads as Istio's ztunnel.
fn worker_threads(flag: Option<u16>) -> usize {
    flag.map(usize::from).unwrap_or_else(|| {
        default_worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
    })
}

fn default_worker_threads(cpus: usize) -> usize {
    if cpus <= 2 { 1 } else { 2 }
}

async fn run(config: Config, log: LogHandle) -> anyhow::Result<Exit> {
    let set_log_level: SetLogLevelFn = Box::new(move |level| {
        let filter =
            EnvFilter::try_new(level).map_err(|e| format!("bad log filter {level:?}: {e}"))?;
        log.reload(filter).map_err(|e| e.to_string())?;
        info!(level, "log level changed");
        Ok(())
    });
    let app = app::build(config, set_log_level).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(app
        .run(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        })
        .await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_thread_up_to_two_cpus_then_two() {
        let by_cpus: Vec<usize> = (1..=5).map(default_worker_threads).collect();
        assert_eq!(by_cpus, [1, 1, 2, 2, 2]);
        assert_eq!(worker_threads(Some(3)), 3, "the flag wins");
    }
}
