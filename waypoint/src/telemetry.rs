//! One result per request or connection: [`Record`] writes the access-log line and the metrics
//! together, so the two never disagree and no code path logs by hand.
//!
//! Owns the waypoint's Prometheus registry and the log line's fields. The labels are Istio's,
//! from the shared label code (`dataplane::telemetry`, reporter `waypoint`: both ends'
//! workloads from the config, the client's principal, the destination service); the TCP
//! families are the shared ones (`dataplane::tcp_metrics`); the L7 request families
//! (`istio_requests_total`, `istio_request_duration_milliseconds`) add `destination_port` and
//! `response_code`. The pipeline fills a record as it goes; retries, timeouts, faults and policy
//! (next issue) add their response flags here. Does not decide anything.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use dataplane::subscription::ConfigRx;
use dataplane::tcp_metrics::{ConnMetrics, TcpMetrics};
use dataplane::telemetry::{End, NO_FLAGS, ServiceNames, TcpLabels, labels};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

/// Istio's labels of one request, plus the port and the response code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    #[prometheus(flatten)]
    istio: TcpLabels,
    destination_port: String,
    response_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

/// The waypoint's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    tcp: Arc<TcpMetrics>,
    certs_issued: Counter,
    cert_failures: Counter,
    connect_refused: Family<StatusLabels, Counter>,
    /// Where the labels' workload facts come from (set once the subscription exists).
    config: OnceLock<ConfigRx>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.5, 2.0, 20))
        });
        let certs_issued = Counter::default();
        let cert_failures = Counter::default();
        let connect_refused = Family::<StatusLabels, Counter>::default();
        registry.register("istio_requests", "Requests handled", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration (to the end of the response)",
            duration.clone(),
        );
        let tcp = TcpMetrics::register(&mut registry);
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
            tcp,
            certs_issued,
            cert_failures,
            connect_refused,
            config: OnceLock::new(),
        })
    }

    /// Gives the labels their workload facts: the config the waypoint serves from. Until
    /// then (and for addresses not in it), workloads are `unknown`.
    pub fn use_config(&self, config: ConfigRx) {
        let _ = self.config.set(config);
    }

    /// Counts a refused CONNECT by the status it got.
    pub fn connect_refused(&self, status: u16) {
        self.connect_refused
            .get_or_create(&StatusLabels {
                status: status.to_string(),
            })
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

    /// Istio's labels of `r` (reporter `waypoint`); the destination workload is the chosen
    /// endpoint's when `with_upstream` and one was chosen.
    fn labels(&self, r: &Record, with_upstream: bool) -> TcpLabels {
        let store = self.config.get().and_then(|rx| rx.borrow().clone());
        let workload = |addr: &str| {
            let ip = addr.parse::<SocketAddr>().ok()?.ip();
            store.as_deref()?.workload_by_ip(ip).map(|w| w.as_ref())
        };
        let principal = (!r.src_principal.is_empty()).then_some(r.src_principal.as_str());
        let src = End {
            workload: workload(&r.src_addr),
            principal,
        };
        let dst = End {
            workload: if with_upstream {
                workload(&r.upstream)
            } else {
                None
            },
            principal: None,
        };
        let service = ServiceNames::from_hostname(&r.dst_service);
        let mut l = labels("waypoint", src, dst, service, principal.is_some());
        // A pod or address destination keeps its name here, as the waypoint always showed it.
        l.destination_service = r.dst_service.clone();
        l.response_flags = r.flag.map_or(NO_FLAGS, Flag::as_str).to_string();
        l
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
    /// `UO`: a connection-pool limit overflowed (circuit breaker).
    UpstreamOverflow,
    /// `URX`: the retry limit was reached (attempts, or `maxRetries` in flight).
    RetryLimitExceeded,
    /// `UT`: the route timeout expired.
    UpstreamTimeout,
    /// `DI`: a delay was injected.
    DelayInjected,
    /// `FI`: an abort was injected.
    FaultInjected,
    /// `UAEX`-like for us: an AuthorizationPolicy denied the request (Envoy logs `RBAC`).
    RbacDenied,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::NoRoute => "NR",
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamConnect => "UF",
            Flag::UpstreamReset => "UC",
            Flag::DownstreamReset => "DC",
            Flag::UpstreamOverflow => "UO",
            Flag::RetryLimitExceeded => "URX",
            Flag::UpstreamTimeout => "UT",
            Flag::DelayInjected => "DI",
            Flag::FaultInjected => "FI",
            Flag::RbacDenied => "RBAC",
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
    /// The TCP connection's metrics guard, from [`Record::tcp_opened`].
    conn: Option<ConnMetrics>,
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
            conn: None,
        }
    }

    /// Counts a TCP connection as opened (at its start, as Istio does); its bytes and close
    /// are counted by [`Record::finish`] with the same labels.
    pub fn tcp_opened(&mut self, metrics: &Metrics) {
        if self.conn.is_none() {
            self.conn = Some(metrics.tcp.open(metrics.labels(self, false)));
        }
    }

    /// Writes the access-log line and the metrics.
    pub fn finish(mut self, metrics: &Metrics) {
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
                let mut istio = metrics.labels(&self, true);
                istio.request_protocol = "http".to_string();
                let labels = RequestLabels {
                    istio,
                    destination_port: self.dst_port.to_string(),
                    response_code: status.to_string(),
                };
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
                let mut conn = match self.conn.take() {
                    Some(conn) => conn,
                    None => metrics.tcp.open(metrics.labels(&self, false)),
                };
                conn.sent(*sent);
                conn.received(*received);
                if let Some(f) = self.flag {
                    conn.set_response_flags(f.as_str());
                }
                drop(conn);
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
