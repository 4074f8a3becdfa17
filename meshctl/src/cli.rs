//! meshctl's command line (clap): commands, flags and the parsers of their values. Owns only
//! the syntax; what a command does is [`crate::waypoint`]'s (and, on clusters, `install`,
//! `check`, `status`, `uninstall`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about = "The mesh's command line",
    max_term_width = 100
)]
pub struct Cli {
    /// The directory of manifests meshd watches (local mode's config directory).
    #[arg(long, global = true, env = "MESH_CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Where meshd reports status: the `status` directory under meshd's `--write-dir`.
    #[arg(long, global = true, env = "MESH_STATUS_DIR", value_name = "DIR")]
    pub status_dir: Option<PathBuf>,
    /// A kubeconfig for the cluster (default: $KUBECONFIG, ~/.kube/config, or the pod's
    /// service account in a cluster). Used when --config-dir is not given.
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage waypoints: the L7 proxies of namespaces and services.
    #[command(subcommand)]
    Waypoint(Waypoint),
    /// Install the mesh on a cluster (server-side apply) and wait until it is ready.
    Install(InstallArgs),
    /// Check a cluster: before installing (node kernel, BTF, cgroup2, bpffs, the CNI and its
    /// conflicts, Istio) and after (every component and every node's agents ready).
    Check(CheckArgs),
    /// Show the mesh on a cluster: components, nodes, enrolled namespaces and pods, waypoints.
    Status,
    /// Remove the mesh from a cluster: every node's agent first removes capture from its pods,
    /// then the mesh's objects are deleted.
    Uninstall(UninstallArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Overlay {
    /// One meshd replica: small and test clusters.
    Dev,
    /// Production: replicated meshd, spread across nodes.
    Ha,
}

#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// Which of the built-in manifests (manifests/overlays/*, compiled into meshctl).
    #[arg(long, value_enum, default_value = "dev")]
    pub overlay: Overlay,
    /// Use these manifests instead: a rendered YAML file, or a kustomize directory (rendered
    /// with `kubectl kustomize`, so kubectl must be installed).
    #[arg(long, value_name = "PATH", conflicts_with = "overlay")]
    pub manifests: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub manifests: ManifestArgs,
    /// Say what would be created, updated or skipped; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for the components to be ready (e.g. 5m, 90s).
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub timeout: Duration,
    /// Apply and return without waiting for readiness.
    #[arg(long, conflicts_with = "timeout")]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Only the pre-flight checks (what must hold before `meshctl install`).
    #[arg(long)]
    pub pre_install: bool,
    /// Where this node's filesystem is mounted, for the node checks (kernel, BTF, cgroup2,
    /// bpffs are read under it: DIR/proc/sys/kernel/osrelease, DIR/sys/kernel/btf/vmlinux,
    /// DIR/proc/mounts). Run meshctl on a node, or in a pod with the host's / mounted.
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub host_root: PathBuf,
    /// Skip the checks of this machine (meshctl is not running on a node).
    #[arg(long, conflicts_with = "host_root")]
    pub no_host: bool,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub manifests: ManifestArgs,
    /// Also delete the CRDs meshctl installed (never ones it did not install, such as Istio's).
    #[arg(long)]
    pub crds: bool,
    /// How long to wait for every node's agent to remove capture (e.g. 2m).
    #[arg(long, default_value = "2m", value_parser = duration)]
    pub timeout: Duration,
    /// Delete the mesh's objects even if some nodes' agents did not confirm (capture may then
    /// stay on those nodes: run `ztunnel cleanup --node` there).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum Waypoint {
    /// Create or update a waypoint (a Gateway of class istio-waypoint) in a namespace.
    Apply(ApplyArgs),
    /// List waypoints with what they serve and whether meshd programmed them.
    List(ListArgs),
    /// Delete waypoints (namespace enrollment labels are left as they are, as istioctl does).
    Delete(DeleteArgs),
    /// Show a waypoint's Accepted and Programmed conditions.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The namespace of the waypoint (declared in the config directory).
    #[arg(short, long, value_parser = dns_label)]
    pub namespace: String,
    /// The waypoint's (Gateway's) name.
    #[arg(long, default_value = "waypoint", value_parser = dns_label)]
    pub name: String,
    /// Which traffic the waypoint takes (label istio.io/waypoint-for; meshd's default: service).
    #[arg(long = "for", value_enum)]
    pub traffic: Option<TrafficFor>,
    /// Also label the namespace istio.io/use-waypoint=NAME, sending its traffic through it.
    #[arg(long)]
    pub enroll_namespace: bool,
    /// With --enroll-namespace: replace the namespace's enrollment in another waypoint.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this namespace (default: all namespaces).
    #[arg(short, long, value_parser = dns_label, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// All namespaces (the default).
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The namespace of the waypoints.
    #[arg(short, long, value_parser = dns_label)]
    pub namespace: String,
    /// Waypoints to delete (default: `waypoint`).
    #[arg(value_parser = dns_label, conflicts_with = "all")]
    pub names: Vec<String>,
    /// Delete every waypoint in the namespace.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The namespace of the waypoint.
    #[arg(short, long, value_parser = dns_label)]
    pub namespace: String,
    /// The waypoint's name.
    #[arg(long, default_value = "waypoint", value_parser = dns_label)]
    pub name: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until meshd reports the waypoint Programmed.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 60s, 2m, 500ms).
    #[arg(long, default_value = "60s", value_parser = duration, requires = "wait")]
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TrafficFor {
    Service,
    Workload,
    All,
    None,
}

impl TrafficFor {
    pub fn label(self) -> &'static str {
        match self {
            TrafficFor::Service => "service",
            TrafficFor::Workload => "workload",
            TrafficFor::All => "all",
            TrafficFor::None => "none",
        }
    }
}

/// A namespace or waypoint name: a DNS-1123 label, as Kubernetes requires of both (and a
/// safe file-name part).
fn dns_label(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    match ok {
        true => Ok(s.to_string()),
        false => Err(format!(
            "{s:?} is not a valid name: lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit"
        )),
    }
}

/// `90s`, `2m`, `500ms`, `1h`, or a bare number of seconds.
fn duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 60s, 2m, 500ms)"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}
