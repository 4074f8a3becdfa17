//! Istio's telemetry labels for one connection, shared by ztunnel and the waypoint.
//!
//! Owns the label set ([`TcpLabels`], named exactly as Istio names them, with its `unknown`
//! convention and response flags) and the mapping from what the config says about both ends
//! to it ([`End`], [`tcp_labels`]: canonical service/revision, app/version, principal,
//! destination service). The counters are in [`crate::tcp_metrics`]; the one result per
//! connection that logs and counts together is [`crate::conn_result`]. Decides nothing.

use meshcore::proto::config::{Service, Workload};
use meshcore::store::workload_identity;
use prometheus_client::encoding::EncodeLabelSet;

pub use crate::admin::METRICS_CONTENT_TYPE as CONTENT_TYPE;

/// The value of any label whose fact is not known (Istio's convention).
pub const UNKNOWN: &str = "unknown";

/// `response_flags` when nothing went wrong.
pub const NO_FLAGS: &str = "-";

/// `response_flags` for a connection refused (or closed) by authorization policy.
pub const FLAG_DENY: &str = "DENY";

/// `response_flags` for a connection whose upstream could not be connected.
pub const FLAG_CONNECT: &str = "CONNECT";

/// The labels of one L4 series, named exactly as Istio names them.
///
/// Field order is the order labels appear in the exposition. Every value that is not known is
/// the string [`UNKNOWN`]; start from [`TcpLabels::unknown`] and fill in what you know.
/// Values are escaped by the encoder, so peer-supplied strings (e.g. a principal) cannot break
/// the exposition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `"source"` (the outbound side reports) or `"destination"` (the inbound side reports).
    pub reporter: String,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    /// The client's SPIFFE identity, e.g. `spiffe://cluster.local/ns/a/sa/b`.
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    /// The destination service's hostname (e.g. `echo.default.svc.cluster.local`).
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    /// Always `"tcp"` at L4.
    pub request_protocol: String,
    /// [`NO_FLAGS`] when none; [`FLAG_DENY`], [`FLAG_CONNECT`], ...
    pub response_flags: String,
    /// `"mutual_tls"` when the connection was carried over mTLS, else `"unknown"`.
    pub connection_security_policy: String,
}

impl TcpLabels {
    /// Labels with every fact unknown: `reporter` as given, `request_protocol="tcp"`,
    /// `response_flags="-"`, everything else `"unknown"`.
    pub fn unknown(reporter: &str) -> Self {
        let u = || UNKNOWN.to_string();
        TcpLabels {
            reporter: reporter.to_string(),
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
            request_protocol: "tcp".to_string(),
            response_flags: NO_FLAGS.to_string(),
            connection_security_policy: u(),
        }
    }
}

/// Istio's default cluster id, used until multi-cluster exists.
const CLUSTER: &str = "Kubernetes";

/// What is known about one end of a connection.
#[derive(Default, Clone, Copy)]
pub struct End<'a> {
    pub workload: Option<&'a Workload>,
    /// A verified identity (from mTLS) when the workload is unknown or to override it.
    pub principal: Option<&'a str>,
}

fn label<'a>(w: &'a Workload, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| w.labels.get(*k).map(String::as_str))
}

struct Described {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
    cluster: String,
}

fn describe(end: End<'_>) -> Described {
    let unknown = || UNKNOWN.to_string();
    let principal = end.principal.map(str::to_string);
    match end.workload {
        Some(w) => Described {
            // Istio names the workload (a Deployment, not its pod); meshd sends that name.
            workload: if w.workload_name.is_empty() {
                w.name.clone()
            } else {
                w.workload_name.clone()
            },
            canonical_service: label(
                w,
                &[
                    "service.istio.io/canonical-name",
                    "app.kubernetes.io/name",
                    "app",
                ],
            )
            .unwrap_or(&w.name)
            .to_string(),
            canonical_revision: label(
                w,
                &[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ],
            )
            .unwrap_or("latest")
            .to_string(),
            namespace: w.namespace.clone(),
            principal: principal.unwrap_or_else(|| {
                if w.captured {
                    workload_identity(w).to_string()
                } else {
                    unknown()
                }
            }),
            app: label(w, &["app"]).map_or_else(unknown, str::to_string),
            version: label(w, &["version"]).map_or_else(unknown, str::to_string),
            cluster: CLUSTER.to_string(),
        },
        None => Described {
            workload: unknown(),
            canonical_service: unknown(),
            canonical_revision: unknown(),
            namespace: unknown(),
            principal: principal.unwrap_or_else(unknown),
            app: unknown(),
            version: unknown(),
            cluster: unknown(),
        },
    }
}

/// The destination service's names, as the labels show them.
#[derive(Clone, Copy, Debug)]
pub struct ServiceNames<'a> {
    pub hostname: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
}

impl<'a> ServiceNames<'a> {
    pub fn of(svc: &'a Service) -> Self {
        ServiceNames {
            hostname: &svc.hostname,
            name: &svc.name,
            namespace: &svc.namespace,
        }
    }

    /// From a Kubernetes Service hostname (`name.namespace.svc.<domain>`), as a proxy that
    /// only has the hostname at hand sees it; `None` for anything else.
    pub fn from_hostname(hostname: &'a str) -> Option<Self> {
        let mut parts = hostname.splitn(4, '.');
        let (name, namespace, svc) = (parts.next()?, parts.next()?, parts.next()?);
        (svc == "svc" && !name.is_empty() && !namespace.is_empty()).then_some(ServiceNames {
            hostname,
            name,
            namespace,
        })
    }
}

/// Labels for a connection as `reporter` ("source" or "destination") sees it.
pub fn tcp_labels(
    reporter: &str,
    src: End<'_>,
    dst: End<'_>,
    service: Option<&Service>,
    mtls: bool,
) -> TcpLabels {
    labels(reporter, src, dst, service.map(ServiceNames::of), mtls)
}

/// Labels for a connection or request as `reporter` ("source", "destination", "waypoint")
/// sees it; `request_protocol` is `tcp`, response flags none.
pub fn labels(
    reporter: &str,
    src: End<'_>,
    dst: End<'_>,
    service: Option<ServiceNames<'_>>,
    mtls: bool,
) -> TcpLabels {
    let (s, d) = (describe(src), describe(dst));
    let mut l = TcpLabels::unknown(reporter);
    l.source_workload = s.workload;
    l.source_canonical_service = s.canonical_service;
    l.source_canonical_revision = s.canonical_revision;
    l.source_workload_namespace = s.namespace;
    l.source_principal = s.principal;
    l.source_app = s.app;
    l.source_version = s.version;
    l.source_cluster = s.cluster;
    l.destination_workload = d.workload;
    l.destination_canonical_service = d.canonical_service;
    l.destination_canonical_revision = d.canonical_revision;
    l.destination_workload_namespace = d.namespace;
    l.destination_principal = d.principal;
    l.destination_app = d.app;
    l.destination_version = d.version;
    l.destination_cluster = d.cluster;
    if let Some(svc) = service {
        l.destination_service = svc.hostname.to_string();
        l.destination_service_name = svc.name.to_string();
        l.destination_service_namespace = svc.namespace.to_string();
    }
    l.response_flags = NO_FLAGS.to_string();
    l.connection_security_policy = if mtls { "mutual_tls" } else { UNKNOWN }.to_string();
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_come_from_kubernetes_hostnames_only() {
        let n = ServiceNames::from_hostname("web.shop.svc.cluster.local").unwrap();
        assert_eq!((n.name, n.namespace), ("web", "shop"));
        assert!(ServiceNames::from_hostname("shop/web-0").is_none());
        assert!(ServiceNames::from_hostname("10.0.0.1:80").is_none());
        assert!(ServiceNames::from_hostname("example.com").is_none());
    }
}
