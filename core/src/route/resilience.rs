//! What a route and a destination ask of the proxy beyond "where": timeouts, retries, faults
//! and mirrors per route ([`RoutePolicy`]), connection-pool limits and outlier detection per
//! destination ([`DestinationPolicy`]), with Istio's defaults (istio-semantics.md).
//!
//! Owns only the compiled form and its defaults; `compile_istio` / `compile_gateway` fill it
//! from VirtualService, HTTPRoute and DestinationRule, the waypoint acts on it. No I/O.

use std::time::Duration;

use super::decide::Backend;

/// Per-route behaviour: carried by every [`super::Forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy {
    /// The whole exchange, all attempts included (VirtualService `timeout`, HTTPRoute
    /// `timeouts.request`). `None`: no limit (Istio's default).
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// Injected faults; Istio turns retries and timeouts off on a route with a fault.
    pub fault: Option<Fault>,
    /// Fire-and-forget copies of the request.
    pub mirrors: Vec<Mirror>,
}

impl Default for RoutePolicy {
    /// A route that says nothing: no timeout, Istio's default retries, no fault, no mirror.
    fn default() -> Self {
        RoutePolicy {
            timeout: None,
            retry: RetryPolicy::istio_default(),
            fault: None,
            mirrors: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (VirtualService `retries.attempts`; 0: never retry).
    pub attempts: u32,
    /// Each attempt's limit (`perTryTimeout`, HTTPRoute `timeouts.backendRequest`).
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    /// Backoff base: retry N waits U[0, (2^N − 1)·base), capped at 10 × base.
    pub backoff_base: Duration,
    /// Retries prefer endpoints not tried yet (`retryIgnorePreviousHosts`, default true).
    pub avoid_previous_hosts: bool,
}

impl RetryPolicy {
    /// Istio's policy when `retries` is unset: 2 retries on connect-failure, refused-stream,
    /// gRPC unavailable and cancelled (503 is not retried since 1.24).
    pub fn istio_default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                grpc: GrpcRetryOn {
                    unavailable: true,
                    cancelled: true,
                    ..GrpcRetryOn::default()
                },
                ..RetryOn::default()
            },
            backoff_base: Duration::from_millis(25),
            avoid_previous_hosts: true,
        }
    }

    /// No retries at all (`attempts: 0`, or a route with a fault).
    pub fn none() -> Self {
        RetryPolicy {
            attempts: 0,
            ..Self::istio_default()
        }
    }
}

/// Envoy's `retry_on` conditions, as Istio passes them through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx, or no response (reset, connect failure, refused stream).
    pub five_xx: bool,
    /// 502, 503, 504, or connect failure / reset.
    pub gateway_error: bool,
    /// No response at all (reset, disconnect, timeout of an attempt).
    pub reset: bool,
    pub connect_failure: bool,
    /// 409.
    pub retriable_4xx: bool,
    /// HTTP/2 REFUSED_STREAM.
    pub refused_stream: bool,
    /// Bare status codes in `retryOn` (`retriable-status-codes`).
    pub status_codes: Vec<u16>,
    pub grpc: GrpcRetryOn,
}

/// gRPC status conditions, read from `grpc-status` in the response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrpcRetryOn {
    pub cancelled: bool,
    pub deadline_exceeded: bool,
    pub internal: bool,
    pub resource_exhausted: bool,
    pub unavailable: bool,
}

/// VirtualService `fault`: delay and abort are decided independently per request.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delay {
    pub fixed: Duration,
    /// 0–100.
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Abort {
    pub status: AbortStatus,
    /// 0–100.
    pub percent: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortStatus {
    Http(u16),
    /// A gRPC status code, answered as HTTP 200 with `grpc-status` (trailers-only).
    Grpc(u32),
}

/// One mirror destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub backend: Backend,
    /// 0–100; 100 when unset.
    pub percent: f64,
}

/// Per-destination behaviour from a DestinationRule (port-level and subset settings resolved).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestinationPolicy {
    pub pool: ConnectionPool,
    /// `None`: no outlier detection (no DestinationRule asked for it).
    pub outlier: Option<OutlierDetection>,
}

/// `connectionPool`; limits count per destination per waypoint instance, not per endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: open upstream connections.
    pub max_connections: u32,
    /// `tcp.connectTimeout` (10 s).
    pub connect_timeout: Duration,
    /// `tcp.idleTimeout` (1 h).
    pub tcp_idle_timeout: Duration,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    pub max_pending_requests: u32,
    /// `http.http2MaxRequests`: requests in flight, any HTTP version.
    pub max_requests: u32,
    /// `http.maxRequestsPerConnection` (0: unlimited; 1: no keep-alive).
    pub max_requests_per_connection: u32,
    /// `http.maxRetries`: retries in flight.
    pub max_retries: u32,
    /// `http.idleTimeout`: close an upstream connection idle this long. `None`: 1 h.
    pub http_idle_timeout: Option<Duration>,
}

impl Default for ConnectionPool {
    /// Istio's thresholds: effectively unlimited.
    fn default() -> Self {
        ConnectionPool {
            max_connections: u32::MAX,
            connect_timeout: Duration::from_secs(10),
            tcp_idle_timeout: Duration::from_secs(3600),
            max_pending_requests: u32::MAX,
            max_requests: u32::MAX,
            max_requests_per_connection: 0,
            max_retries: u32::MAX,
            http_idle_timeout: None,
        }
    }
}

/// `outlierDetection`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// 0: off. Default 5.
    pub consecutive_5xx: u32,
    /// 502/503/504 and local-origin failures; 0 (default): off.
    pub consecutive_gateway: u32,
    /// How often ejections are reviewed (10 s).
    pub interval: Duration,
    /// Ejection time = base × consecutive ejections (30 s), capped at `max_ejection_time`.
    pub base_ejection_time: Duration,
    /// 300 s (Envoy's default).
    pub max_ejection_time: Duration,
    /// At most this share ejected (10%), but at least one endpoint may always be.
    pub max_ejection_percent: u32,
    /// Panic (balance over all endpoints, ejected or not) at or below this share of healthy
    /// endpoints; 0 (Istio's default): never panic.
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}
