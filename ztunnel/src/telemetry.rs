//! Istio's metric labels for one connection, from what the config says about both ends.
//!
//! Owns the mapping from workloads and services to [`TcpLabels`] (Istio's names and its
//! `unknown` convention); the counters themselves are in [`crate::metrics`].

use meshcore::proto::config::{Service, Workload};
use meshcore::store::workload_identity;

use crate::metrics::{NO_FLAGS, TcpLabels, UNKNOWN};

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
            workload: w.name.clone(),
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

/// Labels for a connection as `reporter` ("source" or "destination") sees it.
pub fn tcp_labels(
    reporter: &str,
    src: End<'_>,
    dst: End<'_>,
    service: Option<&Service>,
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
        l.destination_service = svc.hostname.clone();
        l.destination_service_name = svc.name.clone();
        l.destination_service_namespace = svc.namespace.clone();
    }
    l.response_flags = NO_FLAGS.to_string();
    l.connection_security_policy = if mtls { "mutual_tls" } else { UNKNOWN }.to_string();
    l
}
