//! Telemetry: Istio's L4 metrics (so existing dashboards work) plus ztunnel's own counters.
//!
//! Owns the node's Prometheus [`Registry`] and every metric in it. It does not decide *what* a
//! connection's labels are (the proxy paths fill [`TcpLabels`] from their workload facts), it
//! does not move bytes ([`crate::copy`] calls [`ConnMetrics::received`]/[`ConnMetrics::sent`]),
//! and it does not serve HTTP ([`crate::admin`] serves [`Metrics::encode`]).
//!
//! # Names and semantics
//!
//! The L4 families (`istio_tcp_connections_opened_total`, `..._closed_total`,
//! `istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total`) and their labels are
//! Istio's, shared with the waypoint: [`dataplane::tcp_metrics`] documents what each counts.
//! The exposition is OpenMetrics text: serve it with [`CONTENT_TYPE`].
//!
//! ztunnel's own metrics:
//! `ztunnel_cert_fetch_failures_total{identity}`, `ztunnel_certs_issued_total{identity}` and the
//! info gauge `ztunnel_capture_mode{mode}` (always exactly one series, value 1). Policy denials
//! are not a separate metric: they are connections with `response_flags="DENY"`.
//! `mesh_waypoint_bypass_total{destination_service, waypoint, reason}` counts connections sent
//! direct because the waypoint their destination is bound to cannot be used (Istio's fail-open);
//! `destination_service` is the service's hostname for a VIP, the pod's `ns/name` for a pod IP.
//! `mesh_outbound_retries_total{reason}` counts outbound connections whose HBONE stream was
//! tried a second time on another endpoint (`crate::outbound_stream`): `endpoint_left` (the
//! first endpoint left the config while its stream was being opened) or `open_failed`.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

// Istio's L4 labels and families are shared with the waypoint (crate `dataplane`).
pub use dataplane::tcp_metrics::{ConnMetrics, TcpMetrics};
pub use dataplane::telemetry::{
    CONTENT_TYPE, FLAG_CONNECT, FLAG_DENY, NO_FLAGS, TcpLabels, UNKNOWN,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BypassLabels {
    destination_service: String,
    waypoint: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

/// Every metric ztunnel exports, and the registry that encodes them.
///
/// Cheap to share (`Arc<Metrics>`); all updates are atomic adds on pre-resolved counters, so the
/// byte path never hashes labels or takes a lock.
pub struct Metrics {
    registry: Registry,
    tcp: Arc<TcpMetrics>,
    cert_fetch_failures: Family<IdentityLabels, Counter>,
    certs_issued: Family<IdentityLabels, Counter>,
    capture_mode: Family<ModeLabels, Gauge>,
    waypoint_bypass: Family<BypassLabels, Counter>,
    outbound_retries: Family<RetryLabels, Counter>,
    /// Serializes [`Metrics::set_capture_mode`] so the info gauge never holds two modes.
    capture_mode_lock: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered (and no series yet).
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let cert_fetch_failures = Family::<IdentityLabels, Counter>::default();
        let certs_issued = Family::<IdentityLabels, Counter>::default();
        let capture_mode = Family::<ModeLabels, Gauge>::default();
        let waypoint_bypass = Family::<BypassLabels, Counter>::default();
        let outbound_retries = Family::<RetryLabels, Counter>::default();

        // Families are handles (`Arc` inside): the registry and `Metrics` share the same series.
        // Counter names omit `_total`; the encoder appends it.
        let tcp = TcpMetrics::register(&mut registry);
        registry.register(
            "ztunnel_cert_fetch_failures",
            "Failed workload certificate fetches, by identity",
            cert_fetch_failures.clone(),
        );
        registry.register(
            "ztunnel_certs_issued",
            "Workload certificates issued by the CA, by identity",
            certs_issued.clone(),
        );
        registry.register(
            "ztunnel_capture_mode",
            "How pod traffic is captured (info gauge: the current mode has value 1)",
            capture_mode.clone(),
        );
        registry.register(
            "mesh_waypoint_bypass",
            "Connections sent direct because their destination's waypoint cannot be used",
            waypoint_bypass.clone(),
        );
        registry.register(
            "mesh_outbound_retries",
            "Outbound connections whose stream was tried again on another endpoint",
            outbound_retries.clone(),
        );

        Arc::new(Metrics {
            registry,
            tcp,
            cert_fetch_failures,
            certs_issued,
            capture_mode,
            waypoint_bypass,
            outbound_retries,
            capture_mode_lock: Mutex::new(()),
        })
    }

    /// Counts a connection as opened now and returns its guard ([`TcpMetrics::open`]).
    pub fn open(&self, labels: TcpLabels) -> ConnMetrics {
        self.tcp.open(labels)
    }

    /// Removes the L4 series of workloads that are gone ([`TcpMetrics::prune`]).
    pub fn prune(&self, exists: impl Fn(&str, &str) -> bool) -> usize {
        self.tcp.prune(exists)
    }

    /// The OpenMetrics text exposition of every metric (serve with [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a `String` cannot fail and the derived label encoders only propagate writer
        // errors, so an error here would be a bug in the encoder; keep what was written.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed; the scrape is partial");
        }
        out
    }
}

impl dataplane::certs::CertEvents for Metrics {
    /// Counts one failed certificate fetch for `identity`.
    fn cert_fetch_failed(&self, identity: &str) {
        self.cert_fetch_failures
            .get_or_create(&IdentityLabels {
                identity: identity.to_string(),
            })
            .inc();
    }

    /// Counts one certificate issued for `identity` (initial fetch or refresh).
    fn cert_issued(&self, identity: &str) {
        self.certs_issued
            .get_or_create(&IdentityLabels {
                identity: identity.to_string(),
            })
            .inc();
    }
}

impl Metrics {
    /// Sets the capture-mode info gauge: `ztunnel_capture_mode{mode="<mode>"} 1`, replacing any
    /// previous mode's series.
    pub fn set_capture_mode(&self, mode: &str) {
        let _serial = self
            .capture_mode_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.capture_mode.clear();
        self.capture_mode
            .get_or_create(&ModeLabels {
                mode: mode.to_string(),
            })
            .set(1);
    }
}

impl Metrics {
    /// Counts one connection to `destination_service` that went around `waypoint` (a Gateway,
    /// "ns/name") because of `reason`.
    pub fn waypoint_bypassed(&self, destination_service: &str, waypoint: &str, reason: &str) {
        self.waypoint_bypass
            .get_or_create(&BypassLabels {
                destination_service: destination_service.to_string(),
                waypoint: waypoint.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }
}

impl Metrics {
    /// Counts one outbound stream tried again elsewhere: `reason` is `endpoint_left` or
    /// `open_failed`.
    pub fn outbound_retried(&self, reason: &'static str) {
        self.outbound_retries
            .get_or_create(&RetryLabels { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(src: &str, dst: &str) -> TcpLabels {
        TcpLabels {
            source_workload: src.into(),
            source_workload_namespace: "a".into(),
            destination_workload: dst.into(),
            destination_workload_namespace: "b".into(),
            ..TcpLabels::unknown("source")
        }
    }

    fn series_of(m: &Metrics, pod: &str) -> usize {
        m.encode()
            .lines()
            .filter(|l| l.contains(&format!("workload=\"{pod}\"")))
            .count()
    }

    #[test]
    fn waypoint_bypasses_are_counted_by_destination_waypoint_and_reason() {
        let m = Metrics::new();
        for _ in 0..2 {
            m.waypoint_bypassed("web.shop.svc.cluster.local", "shop/wp", "no \"wp\"");
        }
        m.waypoint_bypassed("shop/pod", "shop/wp", "no pods");
        let text = m.encode();
        assert!(
            text.contains(r#"mesh_waypoint_bypass_total{destination_service="web.shop.svc.cluster.local",waypoint="shop/wp",reason="no \"wp\""} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mesh_waypoint_bypass_total{destination_service="shop/pod",waypoint="shop/wp",reason="no pods"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn series_of_gone_pods_are_pruned_once_their_connections_close() {
        let m = Metrics::new();
        for i in 0..100 {
            let mut c = m.open(labels(&format!("client-{i}"), "server"));
            c.sent(10);
            c.set_response_flags(FLAG_DENY);
        }
        let live = m.open(labels("client-live", "server"));
        assert!(series_of(&m, "client-7") > 0);
        // Only the server and the live client still exist.
        let exists = |ns: &str, name: &str| {
            (ns, name) == ("b", "server") || (ns, name) == ("a", "client-live")
        };
        assert_eq!(
            m.prune(exists),
            200,
            "100 label sets, each also closed with DENY"
        );
        assert_eq!(series_of(&m, "client-7"), 0);
        assert!(series_of(&m, "client-live") > 0);
        // A gone pod's series stays while its connection is open, and goes after.
        let gone = |ns: &str, name: &str| (ns, name) == ("b", "server");
        assert_eq!(m.prune(gone), 0);
        assert!(series_of(&m, "client-live") > 0);
        drop(live);
        assert_eq!(m.prune(gone), 1);
        assert_eq!(series_of(&m, "client-live"), 0);
        // Unknown ends are not a workload that could go away.
        drop(m.open(TcpLabels::unknown("destination")));
        assert_eq!(m.prune(|_, _| false), 0);
    }
}
