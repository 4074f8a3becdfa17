//! Telemetry: Istio's L4 metrics (so existing dashboards work) plus ztunnel's own counters.
//!
//! Owns the node's Prometheus [`Registry`] and every metric in it. It does not decide *what* a
//! connection's labels are (the proxy paths fill [`TcpLabels`] from their workload facts), it
//! does not move bytes ([`crate::copy`] calls [`ConnMetrics::received`]/[`ConnMetrics::sent`]),
//! and it does not serve HTTP ([`crate::admin`] serves [`Metrics::encode`]).
//!
//! # Names and semantics
//!
//! The L4 names are Istio's, exactly as a scrape shows them:
//!
//! | exposed name                          | counts                                                    |
//! |---------------------------------------|-----------------------------------------------------------|
//! | `istio_tcp_connections_opened_total`  | connections, when [`Metrics::open`] is called             |
//! | `istio_tcp_connections_closed_total`  | connections, when their [`ConnMetrics`] guard is dropped  |
//! | `istio_tcp_received_bytes_total`      | bytes from the client side (request direction)            |
//! | `istio_tcp_sent_bytes_total`          | bytes to the client side (response direction)             |
//!
//! "Client side" is from the reporter's point of view: for `reporter="source"` (outbound) the
//! client is the local pod; for `reporter="destination"` (inbound) it is the HBONE peer.
//!
//! prometheus-client appends `_total` to every counter, so counters are registered *without* it
//! (`istio_tcp_connections_opened` → `istio_tcp_connections_opened_total`). The exposition is
//! OpenMetrics text: serve it with [`CONTENT_TYPE`], which Prometheus negotiates natively.
//!
//! ztunnel's own metrics:
//! `ztunnel_cert_fetch_failures_total{identity}`, `ztunnel_certs_issued_total{identity}` and the
//! info gauge `ztunnel_capture_mode{mode}` (always exactly one series, value 1). Policy denials
//! are not a separate metric: they are connections with `response_flags="DENY"`.
//! `mesh_waypoint_bypass_total{destination_service, waypoint, reason}` counts connections sent
//! direct because the waypoint their destination is bound to cannot be used (Istio's fail-open);
//! `destination_service` is the service's hostname for a VIP, the pod's `ns/name` for a pod IP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::encode`]'s output (OpenMetrics text 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
struct ModeLabels {
    mode: String,
}

/// Every metric ztunnel exports, and the registry that encodes them.
///
/// Cheap to share (`Arc<Metrics>`); all updates are atomic adds on pre-resolved counters, so the
/// byte path never hashes labels or takes a lock.
pub struct Metrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    received_bytes: Family<TcpLabels, Counter>,
    sent_bytes: Family<TcpLabels, Counter>,
    cert_fetch_failures: Family<IdentityLabels, Counter>,
    certs_issued: Family<IdentityLabels, Counter>,
    capture_mode: Family<ModeLabels, Gauge>,
    waypoint_bypass: Family<BypassLabels, Counter>,
    /// Serializes [`Metrics::set_capture_mode`] so the info gauge never holds two modes.
    capture_mode_lock: Mutex<()>,
    /// Every L4 label set that has series, with how many open connections use it: what
    /// [`Metrics::prune`] may remove (the families cannot be listed).
    tcp_series: Mutex<HashMap<TcpLabels, usize>>,
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
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<TcpLabels, Counter>::default();
        let received_bytes = Family::<TcpLabels, Counter>::default();
        let sent_bytes = Family::<TcpLabels, Counter>::default();
        let cert_fetch_failures = Family::<IdentityLabels, Counter>::default();
        let certs_issued = Family::<IdentityLabels, Counter>::default();
        let capture_mode = Family::<ModeLabels, Gauge>::default();
        let waypoint_bypass = Family::<BypassLabels, Counter>::default();

        // Families are handles (`Arc` inside): the registry and `Metrics` share the same series.
        // Counter names omit `_total`; the encoder appends it.
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened, as seen by the reporter",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed, as seen by the reporter",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client side of TCP connections (request direction)",
            received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client side of TCP connections (response direction)",
            sent_bytes.clone(),
        );
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

        Arc::new(Metrics {
            registry,
            opened,
            closed,
            received_bytes,
            sent_bytes,
            cert_fetch_failures,
            certs_issued,
            capture_mode,
            waypoint_bypass,
            capture_mode_lock: Mutex::new(()),
            tcp_series: Mutex::default(),
        })
    }

    /// Counts a connection as opened now and returns its guard.
    ///
    /// The guard counts bytes as they flow ([`ConnMetrics::received`], [`ConnMetrics::sent`])
    /// and counts the close when dropped, so hold it for exactly the connection's lifetime.
    /// A connection refused before any byte flows (policy `DENY`, upstream `CONNECT` failure)
    /// is still opened and closed: open it with those `response_flags` and drop the guard.
    pub fn open(self: &Arc<Self>, labels: TcpLabels) -> ConnMetrics {
        *self
            .tcp_series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(labels.clone())
            .or_default() += 1;
        self.opened.get_or_create(&labels).inc();
        // Resolve the byte counters once; each chunk is then a single atomic add.
        let received = self.received_bytes.get_or_create_owned(&labels);
        let sent = self.sent_bytes.get_or_create_owned(&labels);
        ConnMetrics {
            metrics: Arc::clone(self),
            labels,
            close_flags: None,
            received,
            sent,
        }
    }

    /// Removes the L4 series of workloads that are gone, so churning pods do not grow the
    /// exposition (and ztunnel's memory) without bound. A series is kept while a connection
    /// using it is open, and when both of its workloads are unknown or still `exists(namespace,
    /// name)`. Returns how many label sets were removed.
    pub fn prune(&self, exists: impl Fn(&str, &str) -> bool) -> usize {
        let known = |ns: &str, name: &str| name == UNKNOWN || exists(ns, name);
        let mut series = self.tcp_series.lock().unwrap_or_else(|p| p.into_inner());
        let before = series.len();
        series.retain(|l, open| {
            let keep = *open > 0
                || (known(&l.source_workload_namespace, &l.source_workload)
                    && known(&l.destination_workload_namespace, &l.destination_workload));
            if !keep {
                for family in [
                    &self.opened,
                    &self.closed,
                    &self.received_bytes,
                    &self.sent_bytes,
                ] {
                    family.remove(l);
                }
            }
            keep
        });
        before - series.len()
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

/// One open connection's metrics: counts bytes as they flow, counts the close on drop.
///
/// Labels are fixed when the connection opens: the opened counter and both byte counters use
/// them for the connection's whole life. Only the *closed* counter can carry a different
/// `response_flags` (see [`ConnMetrics::set_response_flags`]), so that a connection closed by a
/// later policy change shows up as `closed{response_flags="DENY"}` without splitting its byte
/// series.
#[derive(Debug)]
pub struct ConnMetrics {
    metrics: Arc<Metrics>,
    labels: TcpLabels,
    close_flags: Option<String>,
    received: Counter,
    sent: Counter,
}

impl ConnMetrics {
    /// Counts `n` bytes received from the client side (request direction).
    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }

    /// Counts `n` bytes sent to the client side (response direction).
    pub fn sent(&self, n: u64) {
        self.sent.inc_by(n);
    }

    /// Sets the `response_flags` the close will be counted with (e.g. [`FLAG_DENY`] when a
    /// policy change ends the connection). Affects only `istio_tcp_connections_closed_total`;
    /// the opened and byte series keep the labels given to [`Metrics::open`].
    pub fn set_response_flags(&mut self, flags: &str) {
        self.close_flags = Some(flags.to_string());
    }

    /// The labels this connection was opened with.
    pub fn labels(&self) -> &TcpLabels {
        &self.labels
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        let mut series = self
            .metrics
            .tcp_series
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(open) = series.get_mut(&self.labels) {
            *open = open.saturating_sub(1);
        }
        match self.close_flags.take() {
            Some(flags) if flags != self.labels.response_flags => {
                let labels = TcpLabels {
                    response_flags: flags,
                    ..self.labels.clone()
                };
                self.metrics.closed.get_or_create(&labels).inc();
                // Only `closed` has this label set; prune must know of it to remove it.
                series.entry(labels).or_default();
            }
            _ => {
                self.metrics.closed.get_or_create(&self.labels).inc();
            }
        }
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
