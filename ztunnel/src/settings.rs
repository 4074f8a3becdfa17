//! ztunnel's typed configuration: every flag of `ztunnel` (names, defaults, environment
//! variables and help text are the command line's contract), parsed by `main` and built
//! directly by tests. Owns no behaviour; [`crate::app`] reads it.

use std::net::SocketAddr;

use clap::Parser;

use crate::capture::CaptureMode;

// Everything ztunnel needs to start. (A `///` comment here would change `--help`.)
#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "Per-node agent of the ambient mesh: captures enrolled pods' TCP and carries it over HBONE"
)]
pub struct Config {
    /// The Kubernetes node this agent serves.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Where meshd listens: unix:/path/to/meshd.sock or host:port.
    #[arg(long, env = "MESHD_ADDR")]
    pub meshd: String,
    /// File holding this node's token (from `meshd node-token --node <node>`).
    #[arg(long, env = "NODE_TOKEN_FILE")]
    pub token_file: String,
    /// The mesh root certificate(s), PEM, that meshd's TLS certificate must chain to (needed
    /// when --meshd is host:port: meshd over TCP is always TLS).
    #[arg(long, env = "MESHD_CA")]
    pub meshd_ca: Option<std::path::PathBuf>,
    /// The DNS name meshd's certificate must carry: `meshd.<trust domain>`.
    #[arg(long, env = "MESHD_NAME", default_value = "meshd.cluster.local")]
    pub meshd_name: String,
    /// How pod traffic is captured: `auto` prefers eBPF and falls back to nftables (saying why).
    #[arg(long, value_enum, default_value_t = CaptureMode::Auto)]
    pub capture: CaptureMode,
    /// Same-node fast path: an authorized connection between two enrolled pods of this node is
    /// spliced in the kernel (sockmap) instead of going over HBONE. Needs eBPF capture.
    #[arg(long)]
    pub fast_path: bool,
    /// Log each eBPF capture decision in enrolled pods (redirect, pass, drop, with its reason)
    /// at this level and above; `off` leaves the logging out of the loaded programs.
    #[arg(long, value_enum, default_value_t = crate::capture::EbpfLog::Off)]
    pub ebpf_log: crate::capture::EbpfLog,
    /// Name the eBPF state (bpffs directory /sys/fs/bpf/ztunnel@NAME) instead of keying it by
    /// this process's network namespace: a ztunnel that is not in the host's network namespace
    /// (a Kubernetes pod) passes its node name, so the next ztunnel of a rolling update adopts
    /// it. `ztunnel cleanup --orphans` never removes a named instance (`--ebpf-instance` does).
    #[arg(long, env = "EBPF_INSTANCE", value_parser = ebpf_instance)]
    pub ebpf_instance: Option<String>,
    /// On SIGTERM/SIGINT, remove capture from every pod and delete the pinned eBPF state:
    /// ztunnel is leaving the node for good and its pods go back to direct traffic. Without it a
    /// stop is a restart: capture stays, pods fail closed until a ztunnel returns and adopts them.
    #[arg(long)]
    pub unenroll_on_exit: bool,
    /// Seconds a stopping ztunnel keeps serving the connections it has (HBONE clients are told
    /// to go elsewhere for new ones) before it exits anyway.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// Istio's root namespace: policies there without a selector apply mesh-wide.
    #[arg(long, default_value = meshcore::policy::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// Admin endpoint (/config_dump, /logging): localhost only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics).
    #[arg(long, default_value = "[::]:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness (/healthz/ready).
    #[arg(long, default_value = "[::]:15021")]
    pub ready_addr: SocketAddr,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Seconds a config from meshd that removes every pod of this node at once is held back
    /// before it is applied (unless the pods' network namespaces are gone): an emptied config
    /// source or a control-plane bug looks exactly like that, and applying it would unenroll
    /// every pod and drop their STRICT and DENY.
    #[arg(long, default_value_t = 10)]
    pub mass_removal_hold: u64,
    /// What to do with a connection to a Service (VIP) or pod (IP) bound to a waypoint
    /// (label istio.io/use-waypoint) that cannot be used — no such Gateway, not for this kind of
    /// traffic, no waypoint pods. `bypass` sends it direct, as Istio does (fail open: the
    /// waypoint's L7 routing and policy are skipped); each such connection is counted in
    /// mesh_waypoint_bypass_total{destination_service,waypoint,reason}, logged (throttled per
    /// destination) and the binding's state is in /config_dump. `refuse` closes it instead
    /// (fail closed), counted as a connection with response_flags="DENY".
    #[arg(long, value_enum, default_value_t = crate::outbound::MissingWaypoint::Bypass)]
    pub missing_waypoint: crate::outbound::MissingWaypoint,
    /// Whether HBONE's TLS records are handed to the kernel (kTLS) after each handshake.
    /// `auto` does so where the kernel has the `tls` ULP with both HBONE suites and key updates
    /// (asked once at start; the config dump's hboneRecordEncryption says what it found and
    /// what is in use); `off` keeps rustls in user space for every connection.
    #[arg(long, value_enum, default_value_t = dataplane::record_encryption::KernelTlsSetting::Auto)]
    pub kernel_tls: dataplane::record_encryption::KernelTlsSetting,
    /// Export a span per connection to this OTLP/gRPC collector (`host:port` or
    /// `http://host:port`); none without it. Istio's ztunnel makes no spans; ours does.
    #[arg(long, env = "TRACE_COLLECTOR")]
    pub trace_collector: Option<String>,
    /// Percent of connections traced (0-100) when --trace-collector is set.
    #[arg(long, env = "TRACE_SAMPLING", default_value_t = 100.0, value_parser = percent)]
    pub trace_sampling: f64,
    /// Where ztunnel learns which pods to serve: `config` (meshd's config: captured pods that
    /// name their network namespace, local mode's annotation) or `zds` (the CNI node agent
    /// hands each pod's network namespace over its socket, --zds-socket, as Istio's CNI does).
    #[arg(long, value_enum, default_value_t = crate::pods::EnrollmentSource::Config)]
    pub enrollment: crate::pods::EnrollmentSource,
    /// The CNI node agent's ZDS socket (--enrollment zds).
    #[arg(long, env = "INPOD_UDS", default_value = dataplane::zds::DEFAULT_SOCKET)]
    pub zds_socket: std::path::PathBuf,
    /// The trust domain of pod identities until meshd's config names one (--enrollment zds:
    /// a pod may be enrolled before meshd knows it).
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Accepted connections in flight on all of the node's listeners, past which new ones are
    /// closed at once [default: 40% of the open-files limit, which ztunnel raises at start].
    /// For a node whose open-files limit cannot be raised far enough (no CAP_SYS_RESOURCE).
    #[arg(long, env = "MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
    /// Of those, from one source IP [default: a quarter of the node's cap].
    #[arg(long, env = "MAX_CONNECTIONS_PER_SOURCE",
        value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_source: Option<u64>,
    /// Threads running the proxy [default: 1 where this process may use at most 2 CPUs, else
    /// 2 as Istio's ztunnel]. One connection's work stays on one thread at a time either way.
    #[arg(long, env = "WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: Option<u16>,
}

fn ebpf_instance(s: &str) -> Result<String, String> {
    crate::ebpf::valid_name(s).map_err(|e| e.to_string())
}

fn percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}
