//! meshctl's command line (clap): commands, flags and the parsers of their values. Owns only
//! the syntax; what a command does is [`crate::waypoint`]'s.

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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage waypoints: the L7 proxies of namespaces and services.
    #[command(subcommand)]
    Waypoint(Waypoint),
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
