//! The waypoint's typed configuration: what `main` parses from flags and the process contract's
//! environment, and what tests build directly. Owns no behaviour; `app` reads it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dataplane::record_encryption::KernelTlsSetting;
use meshcore::store::ConfigStore;
use meshcore::tls::WorkloadCert;

pub use crate::telemetry::AccessLog;
pub use crate::trace::TraceSettings;

/// Everything the waypoint needs to start.
#[derive(Clone)]
pub struct Config {
    /// `ns/name` of the Gateway this waypoint runs for.
    pub gateway: String,
    /// This pod's namespace and name (logs, subscription).
    pub pod_namespace: String,
    pub pod_name: String,
    /// The node the pod runs on (the subscription names it).
    pub node: String,
    /// Where HBONE is served: `POD_IP:15008`.
    pub hbone_addr: SocketAddr,
    /// Readiness (`/healthz/ready`), `:15021`.
    pub ready_addr: SocketAddr,
    /// Metrics and `/config_dump`, `:15020`.
    pub metrics_addr: SocketAddr,
    /// Where config and certificates come from.
    pub source: Source,
    /// How long an unknown-protocol connection may stay silent before it is treated as TCP
    /// (a server-first protocol: the client waits for the server to speak).
    pub sniff_timeout: Duration,
    /// How long a stopping waypoint finishes what it serves.
    pub drain_timeout: Duration,
    /// The plain-HTTP listener (bench, later ingress): no HBONE in, a static upstream.
    pub plain_http: Option<PlainHttp>,
    /// Span export and sampling; `None`: no spans (only `x-request-id` is added).
    pub tracing: Option<TraceSettings>,
    /// Where the JSON access log goes (one line per request).
    pub access_log: AccessLog,
    /// Whether HBONE's records (inbound and to upstreams) go to the kernel where it has kTLS.
    pub kernel_tls: KernelTlsSetting,
}

/// A plain-HTTP listener with one static route to `backend`.
#[derive(Clone, Debug)]
pub struct PlainHttp {
    pub listen: SocketAddr,
    pub backend: SocketAddr,
}

/// Where config and the waypoint's certificate come from.
#[derive(Clone)]
pub enum Source {
    /// meshd, over the process contract.
    Meshd(MeshdSource),
    /// No control plane (the bench's plain-HTTP proxy): an empty config, no certificate, so
    /// HBONE connections are refused.
    Standalone,
    /// Fixed in advance (tests): a config store and the certificate to serve and dial with.
    Static {
        store: Arc<ConfigStore>,
        cert: Arc<WorkloadCert>,
    },
    /// Config from a channel the caller updates (tests of live changes), a fixed certificate.
    Channel {
        config: dataplane::subscription::ConfigRx,
        cert: Arc<WorkloadCert>,
    },
}

/// How to reach meshd and who we are to it.
#[derive(Clone, Debug)]
pub struct MeshdSource {
    /// `unix:/path` or `host:port`.
    pub address: String,
    /// The service-account token file (`sa:<ns>:<sa>:<expiry>:<mac>`).
    pub token_file: PathBuf,
    /// The mesh root, PEM, when meshd is over TLS.
    pub ca_file: Option<PathBuf>,
    /// meshd's TLS name.
    pub server_name: String,
    /// The service account to ask a certificate for; `None`: from the token, else the
    /// Gateway's name (the rendered ServiceAccount is named after it).
    pub service_account: Option<String>,
}

impl Config {
    /// Istio's ports on `pod_ip`, everything else at its default.
    pub fn new(gateway: &str, pod_ip: IpAddr, source: Source) -> Config {
        let (ns, _) = gateway.split_once('/').unwrap_or(("default", gateway));
        Config {
            gateway: gateway.to_string(),
            pod_namespace: ns.to_string(),
            pod_name: String::new(),
            node: String::new(),
            hbone_addr: SocketAddr::new(pod_ip, 15008),
            ready_addr: SocketAddr::new(pod_ip, 15021),
            metrics_addr: SocketAddr::new(pod_ip, 15020),
            source,
            sniff_timeout: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(30),
            plain_http: None,
            tracing: None,
            access_log: AccessLog::Off,
            kernel_tls: KernelTlsSetting::Auto,
        }
    }

    /// The Gateway's namespace and name.
    pub fn gateway_parts(&self) -> (&str, &str) {
        self.gateway
            .split_once('/')
            .unwrap_or((self.pod_namespace.as_str(), self.gateway.as_str()))
    }
}
