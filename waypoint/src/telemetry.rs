//! One result per request or connection: [`Record`] writes the access-log line and the metrics
//! together, so the two never disagree and no code path logs by hand.
//!
//! Owns the Prometheus registry (Istio's metric names, reporter `waypoint`) and the log line's
//! fields. The pipeline fills a record as it goes; retries, timeouts, faults and policy (next
//! issue) add their response flags here. Does not decide anything.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

type Labels = Vec<(String, String)>;

/// The waypoint's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
    tcp_opened: Family<Labels, Counter>,
    tcp_closed: Family<Labels, Counter>,
    tcp_sent: Family<Labels, Counter>,
    tcp_received: Family<Labels, Counter>,
    certs_issued: Counter,
    cert_failures: Counter,
    connect_refused: Family<Labels, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.5, 2.0, 20))
        });
        let tcp_opened = Family::<Labels, Counter>::default();
        let tcp_closed = Family::<Labels, Counter>::default();
        let tcp_sent = Family::<Labels, Counter>::default();
        let tcp_received = Family::<Labels, Counter>::default();
        let certs_issued = Counter::default();
        let cert_failures = Counter::default();
        let connect_refused = Family::<Labels, Counter>::default();
        registry.register("istio_requests", "Requests handled", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration (to the end of the response)",
            duration.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (TCP)",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (TCP)",
            tcp_received.clone(),
        );
        registry.register(
            "mesh_certificates_issued",
            "Workload certificates issued",
            certs_issued.clone(),
        );
        registry.register(
            "mesh_certificate_fetch_failures",
            "Failed certificate fetches",
            cert_failures.clone(),
        );
        registry.register(
            "mesh_waypoint_connect_refused",
            "HBONE CONNECTs refused: destination unknown or not bound here (404), malformed (400)",
            connect_refused.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            duration,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            certs_issued,
            cert_failures,
            connect_refused,
        })
    }

    /// Counts a refused CONNECT by the status it got.
    pub fn connect_refused(&self, status: u16) {
        self.connect_refused
            .get_or_create(&vec![("status".to_string(), status.to_string())])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl dataplane::certs::CertEvents for Metrics {
    fn cert_issued(&self, _identity: &str) {
        self.certs_issued.inc();
    }
    fn cert_fetch_failed(&self, _identity: &str) {
        self.cert_failures.inc();
    }
}

/// Envoy's response flags we set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// `NR`: no route.
    NoRoute,
    /// `UH`: no healthy upstream.
    NoHealthyUpstream,
    /// `UF`: upstream connection failure.
    UpstreamConnect,
    /// `UC`: upstream connection ended mid-request.
    UpstreamReset,
    /// `DC`: downstream went away.
    DownstreamReset,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::NoRoute => "NR",
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamConnect => "UF",
            Flag::UpstreamReset => "UC",
            Flag::DownstreamReset => "DC",
        }
    }
}

/// HTTP request or TCP connection.
#[derive(Clone, Debug)]
pub enum Kind {
    Http {
        method: String,
        authority: String,
        path: String,
        protocol: &'static str,
        status: u16,
    },
    Tcp {
        sent: u64,
        received: u64,
    },
}

/// The result of one request or connection, filled in as it is handled; [`Record::finish`]
/// logs and counts it once.
#[derive(Debug)]
pub struct Record {
    start: Instant,
    pub src_principal: String,
    pub src_addr: String,
    pub dst_service: String,
    pub dst_port: u16,
    pub route: String,
    /// The endpoint chosen (`ip:port`), empty if none.
    pub upstream: String,
    pub flag: Option<Flag>,
    pub error: Option<String>,
    pub kind: Kind,
}

impl Record {
    pub fn new(
        src_principal: String,
        src_addr: String,
        dst_service: String,
        dst_port: u16,
        kind: Kind,
    ) -> Record {
        Record {
            start: Instant::now(),
            src_principal,
            src_addr,
            dst_service,
            dst_port,
            route: String::new(),
            upstream: String::new(),
            flag: None,
            error: None,
            kind,
        }
    }

    fn labels(&self, code: Option<u16>) -> Labels {
        let mut l = vec![
            ("reporter".to_string(), "waypoint".to_string()),
            ("source_principal".to_string(), self.src_principal.clone()),
            ("destination_service".to_string(), self.dst_service.clone()),
            ("destination_port".to_string(), self.dst_port.to_string()),
            (
                "response_flags".to_string(),
                self.flag.map_or("-", Flag::as_str).to_string(),
            ),
        ];
        if let Some(c) = code {
            l.push(("response_code".to_string(), c.to_string()));
        }
        l
    }

    /// Counts a TCP connection as opened (at its start, as Istio does).
    pub fn tcp_opened(&self, metrics: &Metrics) {
        metrics.tcp_opened.get_or_create(&self.labels(None)).inc();
    }

    /// Writes the access-log line and the metrics.
    pub fn finish(self, metrics: &Metrics) {
        let dur_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let flags = self.flag.map_or("-", Flag::as_str);
        let error = self.error.as_deref().unwrap_or("");
        match &self.kind {
            Kind::Http {
                method,
                authority,
                path,
                protocol,
                status,
            } => {
                let labels = self.labels(Some(*status));
                metrics.requests.get_or_create(&labels).inc();
                metrics.duration.get_or_create(&labels).observe(dur_ms);
                let ok = self.flag.is_none() && *status < 500;
                macro_rules! line {
                    ($lvl:ident) => {
                        $lvl!(src.identity = %self.src_principal, src.addr = %self.src_addr,
                            dst.service = %self.dst_service, dst.port = self.dst_port, route = %self.route,
                            upstream = %self.upstream, %method, %authority, %path, %protocol, status, response_flags = flags,
                            dur_ms = format!("{dur_ms:.2}"), error, "request")
                    };
                }
                if ok { line!(info) } else { line!(warn) }
            }
            Kind::Tcp { sent, received } => {
                let labels = self.labels(None);
                metrics.tcp_closed.get_or_create(&labels).inc();
                metrics.tcp_sent.get_or_create(&labels).inc_by(*sent);
                metrics
                    .tcp_received
                    .get_or_create(&labels)
                    .inc_by(*received);
                macro_rules! line {
                    ($lvl:ident) => {
                        $lvl!(src.identity = %self.src_principal, src.addr = %self.src_addr,
                            dst.service = %self.dst_service, dst.port = self.dst_port, upstream = %self.upstream,
                            protocol = "TCP", sent, received, response_flags = flags,
                            dur_ms = format!("{dur_ms:.2}"), error, "connection")
                    };
                }
                if self.flag.is_none() && self.error.is_none() {
                    line!(info)
                } else {
                    line!(warn)
                }
            }
        }
    }
}
