//! One result per request or connection: [`Record`] writes the access-log line and the metrics
//! together, so the two never disagree and no code path logs by hand.
//!
//! Owns the waypoint's Prometheus registry and the log line's fields. The labels are Istio's,
//! from the shared label code (`dataplane::telemetry`, reporter `waypoint`: both ends'
//! workloads from the config, the client's principal, the destination service); the TCP
//! families are the shared ones (`dataplane::tcp_metrics`); the L7 request families
//! (`istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`, Istio's buckets) add `destination_port` and `response_code`, and
//! `response_flags` carries the record's flags. The access log is one JSON object per request
//! (Istio's default JSON format's field names) to the configured sink; the request's span
//! ([`crate::trace`]) ends here too. The pipeline fills a record as it goes. Decides nothing.
//!
//! Label cardinality: every label comes from the config (workloads by their Deployment's name,
//! services, the client's SPIFFE identity) or from a small set (status codes, flags); paths and
//! hosts from the request never become labels.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{LineWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::HeaderValue;
use hyper::body::{Body, Frame, SizeHint};

use dataplane::subscription::ConfigRx;
use dataplane::tcp_metrics::{ConnMetrics, TcpMetrics};
use dataplane::telemetry::{End, NO_FLAGS, ServiceNames, TcpLabels, labels};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::{debug, info, warn};

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

/// Istio's `istio_request_duration_milliseconds` buckets.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's `istio_request_bytes` / `istio_response_bytes` buckets (1 to 10^7, ×10).
const SIZE_BUCKETS: [f64; 8] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7];

/// Where the access log goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AccessLog {
    /// No access log.
    #[default]
    Off,
    /// Standard output (Istio's `/dev/stdout`).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
}

/// The open access-log sink: whole lines, one write each, so concurrent requests never
/// interleave within a line.
type Sink = Mutex<LineWriter<Box<dyn Write + Send>>>;

/// One request label set's four metrics, resolved once: a request hashes its labels once,
/// not once per family.
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Series {
    fn observe(&self, dur_ms: f64, received: u64, sent: u64) {
        self.requests.inc();
        self.duration.observe(dur_ms);
        self.request_bytes.observe(received as f64);
        self.response_bytes.observe(sent as f64);
    }
}

/// The waypoint's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
    access_log: OnceLock<Sink>,
    /// Every request label set with series: what [`Metrics::prune`] may remove (the families
    /// cannot be listed).
    series: RwLock<HashMap<RequestLabels, Series>>,
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
            Histogram::new(DURATION_BUCKETS_MS)
        });
        let request_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(SIZE_BUCKETS)
        });
        let response_bytes = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(SIZE_BUCKETS)
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
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            response_bytes.clone(),
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
            request_bytes,
            response_bytes,
            access_log: OnceLock::new(),
            series: RwLock::default(),
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

    /// Opens the access log (once; later calls change nothing).
    pub fn log_access_to(&self, to: &AccessLog) -> std::io::Result<()> {
        let out: Box<dyn Write + Send> = match to {
            AccessLog::Off => return Ok(()),
            AccessLog::Stdout => Box::new(std::io::stdout()),
            AccessLog::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let _ = self.access_log.set(Mutex::new(LineWriter::new(out)));
        Ok(())
    }

    /// Whether requests are written to an access log.
    pub fn logs_access(&self) -> bool {
        self.access_log.get().is_some()
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
        l.response_flags = r.flags().into_owned();
        l
    }

    fn observe(&self, labels: RequestLabels, dur_ms: f64, received: u64, sent: u64) {
        if let Some(s) = self
            .series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&labels)
        {
            return s.observe(dur_ms, received, sent);
        }
        let mut all = self.series.write().unwrap_or_else(|p| p.into_inner());
        let s = all.entry(labels).or_insert_with_key(|l| Series {
            requests: self.requests.get_or_create(l).clone(),
            duration: self.duration.get_or_create(l).clone(),
            request_bytes: self.request_bytes.get_or_create(l).clone(),
            response_bytes: self.response_bytes.get_or_create(l).clone(),
        });
        s.observe(dur_ms, received, sent);
    }

    /// Removes the request and TCP series of workloads and services that left the config, so
    /// churn does not grow the exposition without bound (Istio's proxies expire idle series
    /// the same way). Returns how many request label sets were removed.
    pub fn prune(&self, store: &meshcore::store::ConfigStore) -> usize {
        let workloads: std::collections::HashSet<(&str, &str)> = store
            .workloads()
            .map(|w| {
                let name = if w.workload_name.is_empty() {
                    &w.name
                } else {
                    &w.workload_name
                };
                (w.namespace.as_str(), name.as_str())
            })
            .collect();
        let exists = |ns: &str, name: &str| workloads.contains(&(ns, name));
        let known =
            |ns: &str, name: &str| name == dataplane::telemetry::UNKNOWN || exists(ns, name);
        let services: std::collections::HashSet<&str> =
            store.services().map(|s| s.hostname.as_str()).collect();
        let mut all = self.series.write().unwrap_or_else(|p| p.into_inner());
        let before = all.len();
        all.retain(|l, _| {
            let i = &l.istio;
            // A pod-addressed destination is named `ns/name`; its workload decides.
            let service = i.destination_service.contains('/')
                || services.contains(i.destination_service.as_str());
            let keep = service
                && known(&i.source_workload_namespace, &i.source_workload)
                && known(&i.destination_workload_namespace, &i.destination_workload);
            if !keep {
                self.requests.remove(l);
                self.duration.remove(l);
                self.request_bytes.remove(l);
                self.response_bytes.remove(l);
            }
            keep
        });
        let removed = before - all.len();
        drop(all);
        self.tcp.prune(exists);
        removed
    }

    fn write_access_log(&self, line: &AccessLine<'_>) {
        if let Some(sink) = self.access_log.get() {
            let mut out = sink.lock().unwrap_or_else(|p| p.into_inner());
            // A full disk or closed stdout must not fail requests; the metrics still count.
            let _ = serde_json::to_writer(&mut *out, line);
            let _ = out.write_all(b"\n");
        }
    }
}

/// Prunes `metrics` ([`Metrics::prune`]) whenever the config changes.
pub async fn prune_on_change(metrics: Arc<Metrics>, mut config: ConfigRx) {
    loop {
        if config.changed().await.is_err() {
            // A fixed config (or the subscription gone: the supervisor reports that).
            return std::future::pending().await;
        }
        let store = config.borrow_and_update().clone();
        if let Some(store) = store {
            let removed = metrics.prune(&store);
            if removed > 0 {
                debug!(
                    removed,
                    "request series of departed workloads and services removed"
                );
            }
        }
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
    /// Every flag, in the order a combination is written (alphabetical by code, as Envoy's
    /// table lists them).
    const ALL: [Flag; 11] = [
        Flag::DownstreamReset,
        Flag::DelayInjected,
        Flag::FaultInjected,
        Flag::NoRoute,
        Flag::RbacDenied,
        Flag::UpstreamReset,
        Flag::UpstreamConnect,
        Flag::NoHealthyUpstream,
        Flag::UpstreamOverflow,
        Flag::RetryLimitExceeded,
        Flag::UpstreamTimeout,
    ];

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

    fn bit(self) -> u16 {
        1 << (self as u16)
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
    start_time: SystemTime,
    pub src_principal: String,
    pub src_addr: String,
    pub dst_service: String,
    pub dst_port: u16,
    pub route: String,
    /// The endpoint chosen (`ip:port`), empty if none.
    pub upstream: String,
    /// Envoy's upstream cluster name, `outbound|port|subset|host`, once a route chose one.
    pub upstream_cluster: String,
    /// The response flag; more can be added with [`Record::add_flag`] (e.g. `DI` and `FI`).
    pub flag: Option<Flag>,
    more_flags: u16,
    pub error: Option<String>,
    pub kind: Kind,
    /// The request's `x-request-id` (set by [`crate::trace::on_request`]).
    pub request_id: Option<HeaderValue>,
    /// The request's trace context and span (set by [`crate::trace::on_request`]).
    pub trace: Option<crate::trace::Trace>,
    /// Request body bytes, counted by [`Record::count_request`]'s body as they pass.
    request_bytes: Option<Arc<AtomicU64>>,
    /// Response body bytes, counted by [`Record::count_response`].
    response_bytes: u64,
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
            start_time: SystemTime::now(),
            src_principal,
            src_addr,
            dst_service,
            dst_port,
            route: String::new(),
            upstream: String::new(),
            upstream_cluster: String::new(),
            flag: None,
            more_flags: 0,
            error: None,
            kind,
            request_id: None,
            trace: None,
            request_bytes: None,
            response_bytes: 0,
            conn: None,
        }
    }

    /// When the request or connection started.
    pub fn start_time(&self) -> SystemTime {
        self.start_time
    }

    /// Adds a response flag next to [`Record::flag`] (set there if it is empty).
    pub fn add_flag(&mut self, flag: Flag) {
        match self.flag {
            None => self.flag = Some(flag),
            Some(f) if f == flag => {}
            Some(_) => self.more_flags |= flag.bit(),
        }
    }

    /// `response_flags`: `-` for none, else the codes joined with `,` (Envoy's form).
    pub fn flags(&self) -> Cow<'static, str> {
        let set = self.more_flags | self.flag.map_or(0, Flag::bit);
        match (self.flag, self.more_flags) {
            (None, _) => Cow::Borrowed(NO_FLAGS),
            (Some(f), 0) => Cow::Borrowed(f.as_str()),
            _ => Cow::Owned(
                Flag::ALL
                    .iter()
                    .filter(|f| set & f.bit() != 0)
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        }
    }

    /// Names the upstream cluster the route chose (Envoy's `outbound|port|subset|host`).
    pub fn set_backend(&mut self, backend: &crate::routing::Backend) {
        use crate::routing::Backend;
        self.upstream_cluster = match backend {
            Backend::Service {
                service,
                port,
                subset,
            } => {
                let (ns, name) = service.split_once('/').unwrap_or(("", service));
                let subset = subset.as_deref().unwrap_or("");
                format!("outbound|{port}|{subset}|{name}.{ns}.svc.cluster.local")
            }
            Backend::Workload { uid, port } => format!("outbound|{port}||{uid}"),
            Backend::Address(a) => format!("outbound|{}||{}", a.port(), a.ip()),
        };
    }

    /// Wraps the request body so its bytes are counted as they pass (no copy).
    pub fn count_request<B>(&mut self, body: B) -> Counted<B> {
        // One counter per request, shared with the body (which outlives borrows of the record).
        let count = self.request_bytes.get_or_insert_with(Arc::default).clone();
        Counted { inner: body, count }
    }

    /// Counts a response body frame as it passes.
    pub fn count_response(&mut self, frame: &Frame<Bytes>) {
        if let Some(d) = frame.data_ref() {
            self.response_bytes += d.len() as u64;
        }
    }

    /// Request body bytes counted so far.
    pub fn bytes_received(&self) -> u64 {
        self.request_bytes
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Response body bytes counted so far.
    pub fn bytes_sent(&self) -> u64 {
        self.response_bytes
    }

    /// Counts a TCP connection as opened (at its start, as Istio does); its bytes and close
    /// are counted by [`Record::finish`] with the same labels.
    pub fn tcp_opened(&mut self, metrics: &Metrics) {
        if self.conn.is_none() {
            self.conn = Some(metrics.tcp.open(metrics.labels(self, false)));
        }
    }

    /// Writes the access-log line, the metrics, and ends the span.
    pub fn finish(mut self, metrics: &Metrics) {
        let dur_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let flags = self.flags();
        let trace = self.trace.take();
        let error = self.error.as_deref().unwrap_or("");
        match &self.kind {
            Kind::Http {
                method,
                authority,
                path,
                protocol,
                status,
            } => {
                let (received, sent) = (self.bytes_received(), self.bytes_sent());
                let mut istio = metrics.labels(&self, true);
                istio.request_protocol = "http".to_string();
                let labels = RequestLabels {
                    istio,
                    destination_port: self.dst_port.to_string(),
                    response_code: status.to_string(),
                };
                metrics.observe(labels, dur_ms, received, sent);
                if metrics.logs_access()
                    && let Some(line) = self.access_log_line(&flags, dur_ms, trace.as_ref())
                {
                    metrics.write_access_log(&line);
                }
                if let Some(trace) = trace {
                    trace.end(&self, *status, &flags);
                }
                let ok = self.flag.is_none() && *status < 500;
                macro_rules! line {
                    ($lvl:ident) => {
                        $lvl!(src.identity = %self.src_principal, src.addr = %self.src_addr,
                            dst.service = %self.dst_service, dst.port = self.dst_port, route = %self.route,
                            upstream = %self.upstream, %method, %authority, %path, %protocol, status, response_flags = %flags,
                            dur_ms = format!("{dur_ms:.2}"), error, "request")
                    };
                }
                if ok { line!(debug) } else { line!(warn) }
            }
            Kind::Tcp { sent, received } => {
                let mut conn = match self.conn.take() {
                    Some(conn) => conn,
                    None => metrics.tcp.open(metrics.labels(&self, false)),
                };
                conn.sent(*sent);
                conn.received(*received);
                if self.flag.is_some() {
                    conn.set_response_flags(&flags);
                }
                drop(conn);
                macro_rules! line {
                    ($lvl:ident) => {
                        $lvl!(src.identity = %self.src_principal, src.addr = %self.src_addr,
                            dst.service = %self.dst_service, dst.port = self.dst_port, upstream = %self.upstream,
                            protocol = "TCP", sent, received, response_flags = %flags,
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

    /// The access-log line: Istio's default JSON format's fields (Envoy's names), plus the
    /// trace id and the client's identity.
    fn access_log_line<'a>(
        &'a self,
        flags: &'a str,
        dur_ms: f64,
        trace: Option<&crate::trace::Trace>,
    ) -> Option<AccessLine<'a>> {
        let Kind::Http {
            method,
            authority,
            path,
            protocol,
            status,
        } = &self.kind
        else {
            return None;
        };
        let some = |s: &'a str| (!s.is_empty()).then_some(s);
        Some(AccessLine {
            start_time: time::OffsetDateTime::from(self.start_time)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            method,
            path,
            protocol,
            response_code: *status,
            response_flags: flags,
            bytes_received: self.bytes_received(),
            bytes_sent: self.bytes_sent(),
            duration: dur_ms as u64,
            upstream_host: some(&self.upstream),
            upstream_cluster: some(&self.upstream_cluster),
            route_name: some(&self.route),
            x_request_id: self.request_id.as_ref().and_then(|v| v.to_str().ok()),
            authority,
            downstream_remote_address: &self.src_addr,
            downstream_peer_principal: some(&self.src_principal),
            destination_service: &self.dst_service,
            traceparent: trace.map(|t| t.traceparent()),
            trace_id: trace.map(|t| t.trace_id_hex()),
            error: self.error.as_deref(),
        })
    }
}

/// One access-log line, serialized straight to the sink (no intermediate JSON tree).
#[derive(serde::Serialize)]
struct AccessLine<'a> {
    start_time: String,
    method: &'a str,
    path: &'a str,
    protocol: &'a str,
    response_code: u16,
    response_flags: &'a str,
    bytes_received: u64,
    bytes_sent: u64,
    duration: u64,
    upstream_host: Option<&'a str>,
    upstream_cluster: Option<&'a str>,
    route_name: Option<&'a str>,
    x_request_id: Option<&'a str>,
    authority: &'a str,
    downstream_remote_address: &'a str,
    downstream_peer_principal: Option<&'a str>,
    destination_service: &'a str,
    traceparent: Option<String>,
    trace_id: Option<String>,
    error: Option<&'a str>,
}

/// The client's request body as the pipeline forwards it: counted.
pub type RequestBody = Counted<hyper::body::Incoming>;

/// A request body whose bytes are added to its record's count as they pass.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
