//! A DestinationRule's `connectionPool` and `outlierDetection` → [`DestinationPolicy`], per
//! (subset, port), merged as Istio merges levels (`resolve`; `lb::LbPolicy::resolve` does the
//! same for `loadBalancer`): a field is replaced whole, never merged inside. Values are
//! checked as Istio's validation checks them; one pass validates (`validate_istio` discards the
//! result) and builds (`compile` keeps a [`DrPolicies`] per Service).
//!
//! Owns these fields' meaning and the level order; which Service a rule names is `compile_istio`'s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::resilience::{ConnectionPool, DestinationPolicy, OutlierDetection};
use super::spec_istio as istio;
use super::validate::parse_duration;
use super::{Diags, Severity};

/// Every (subset, port) policy of one DestinationRule, resolved ahead of requests.
#[derive(Default)]
pub(crate) struct DrPolicies {
    /// Subset name (`None`: no subset) → its policies.
    by_subset: HashMap<Option<String>, PerPort>,
}

/// The policy for ports without port-level settings, and those with.
type PerPort = (
    Arc<DestinationPolicy>,
    BTreeMap<u16, Arc<DestinationPolicy>>,
);

impl DrPolicies {
    /// Resolves every level of `dr` (already validated: problems are not reported again).
    pub(crate) fn new(dr: &istio::DestinationRule) -> DrPolicies {
        let top = dr.traffic_policy.as_ref();
        let mut by_subset = HashMap::new();
        let subsets = dr
            .subsets
            .iter()
            .map(|s| (Some(s.name.clone()), s.traffic_policy.as_ref()));
        for (name, sub) in std::iter::once((None, None)).chain(subsets) {
            let ports: BTreeSet<u16> = [top, sub]
                .into_iter()
                .flatten()
                .flat_map(|tp| tp.port_level_settings.iter())
                .filter_map(|pl| pl.port.as_ref().and_then(|p| u16::try_from(p.number).ok()))
                .collect();
            let base = Arc::new(resolve(top, sub, None));
            let per_port = ports
                .into_iter()
                .map(|port| (port, Arc::new(resolve(top, sub, Some(port)))))
                .collect();
            by_subset.insert(name, (base, per_port));
        }
        DrPolicies { by_subset }
    }

    /// The policy for `port` of `subset` (an unknown subset gets the rule's top level).
    pub(crate) fn get(&self, port: u16, subset: Option<&str>) -> Option<Arc<DestinationPolicy>> {
        let (base, per_port) = self
            .by_subset
            .get(&subset.map(str::to_string))
            .or_else(|| self.by_subset.get(&None))?;
        Some(Arc::clone(per_port.get(&port).unwrap_or(base)))
    }
}

/// Istio's merge for `port` (`None`: no port-level settings): the top level, or its port entry
/// in place of it (replacing both fields, set or not); then each field the subset sets; then the
/// subset's port entry, again replacing both.
fn resolve(
    top: Option<&istio::TrafficPolicy>,
    sub: Option<&istio::TrafficPolicy>,
    port: Option<u16>,
) -> DestinationPolicy {
    let mut pool = top.and_then(|t| t.connection_pool.as_ref());
    let mut outlier = top.and_then(|t| t.outlier_detection.as_ref());
    if let Some(pl) = at_port(top, port) {
        (pool, outlier) = (pl.connection_pool.as_ref(), pl.outlier_detection.as_ref());
    }
    if let Some(s) = sub {
        pool = s.connection_pool.as_ref().or(pool);
        outlier = s.outlier_detection.as_ref().or(outlier);
    }
    if let Some(pl) = at_port(sub, port) {
        (pool, outlier) = (pl.connection_pool.as_ref(), pl.outlier_detection.as_ref());
    }
    let mut scratch = Diags::new("", "", "");
    DestinationPolicy {
        pool: pool
            .map(|c| connection_pool(c, "", &mut scratch))
            .unwrap_or_default(),
        outlier: outlier.map(|o| outlier_detection(o, "", &mut scratch)),
    }
}

/// The `portLevelSettings` entry of `tp` for `port`.
fn at_port(
    tp: Option<&istio::TrafficPolicy>,
    port: Option<u16>,
) -> Option<&istio::PortTrafficPolicy> {
    let port = port?;
    tp?.port_level_settings
        .iter()
        .find(|pl| pl.port.as_ref().is_some_and(|p| p.number == port as u32))
}

/// A duration of at least 1 ms, or `None` (and an Error).
fn duration(s: &str, p: &str, d: &mut Diags) -> Option<Duration> {
    match parse_duration(s) {
        Some(t) if t >= Duration::from_millis(1) => Some(t),
        _ => {
            d.error(
                p,
                format!(
                    "{s:?} is not a duration of at least 1ms: write one such as 250ms, 10s, 1h"
                ),
            );
            None
        }
    }
}

/// A limit: 0 or unset keeps Istio's default (`None`); negative is an Error.
fn limit(v: Option<i64>, p: &str, d: &mut Diags) -> Option<u32> {
    match v {
        Some(n) if n < 0 => {
            d.error(p, "cannot be negative: leave it unset (or 0) for no limit");
            None
        }
        Some(0) | None => None,
        Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
    }
}

/// `connectionPool` at `p`.
pub(super) fn connection_pool(
    c: &istio::ConnectionPoolSettings,
    p: &str,
    d: &mut Diags,
) -> ConnectionPool {
    let mut out = ConnectionPool::default();
    if c.tcp.is_none() && c.http.is_none() {
        // Istio refuses this; here it only resets the pool to the defaults.
        d.push(
            Severity::Warning,
            p,
            "sets neither tcp nor http: Istio's default (unlimited) pool applies",
        );
    }
    if let Some(t) = &c.tcp {
        let tp = format!("{p}.tcp");
        if let Some(n) = limit(t.max_connections, &format!("{tp}.maxConnections"), d) {
            out.max_connections = n;
        }
        if let Some(s) = &t.connect_timeout
            && let Some(t) = duration(s, &format!("{tp}.connectTimeout"), d)
        {
            out.connect_timeout = t;
        }
        if let Some(s) = &t.idle_timeout
            && let Some(t) = duration(s, &format!("{tp}.idleTimeout"), d)
        {
            out.tcp_idle_timeout = t;
        }
    }
    if let Some(h) = &c.http {
        let hp = format!("{p}.http");
        if let Some(n) = limit(
            h.http1_max_pending_requests,
            &format!("{hp}.http1MaxPendingRequests"),
            d,
        ) {
            out.max_pending_requests = n;
        }
        if let Some(n) = limit(h.http2_max_requests, &format!("{hp}.http2MaxRequests"), d) {
            out.max_requests = n;
        }
        if let Some(n) = limit(
            h.max_requests_per_connection,
            &format!("{hp}.maxRequestsPerConnection"),
            d,
        ) {
            out.max_requests_per_connection = n;
        }
        if let Some(n) = limit(h.max_retries, &format!("{hp}.maxRetries"), d) {
            out.max_retries = n;
        }
        if let Some(s) = &h.idle_timeout {
            out.http_idle_timeout = duration(s, &format!("{hp}.idleTimeout"), d);
        }
    }
    out
}

/// `outlierDetection` at `p`.
pub(super) fn outlier_detection(
    o: &istio::OutlierDetection,
    p: &str,
    d: &mut Diags,
) -> OutlierDetection {
    let mut out = OutlierDetection::default();
    let count = |v: Option<i64>, field: &str, d: &mut Diags| match v {
        Some(n) if n < 0 => {
            d.error(
                &format!("{p}.{field}"),
                "cannot be negative (0 turns it off)",
            );
            None
        }
        Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        None => None,
    };
    // Istio: the deprecated consecutiveErrors counts gateway errors only.
    if let Some(n) = count(o.consecutive_errors, "consecutiveErrors", d).filter(|n| *n > 0) {
        out.consecutive_gateway = n;
        out.consecutive_5xx = 0;
    }
    if let Some(n) = count(o.consecutive_5xx_errors, "consecutive5xxErrors", d) {
        out.consecutive_5xx = n;
    }
    if let Some(n) = count(o.consecutive_gateway_errors, "consecutiveGatewayErrors", d) {
        out.consecutive_gateway = n;
    }
    if let Some(s) = &o.interval
        && let Some(t) = duration(s, &format!("{p}.interval"), d)
    {
        out.interval = t;
    }
    if let Some(s) = &o.base_ejection_time
        && let Some(t) = duration(s, &format!("{p}.baseEjectionTime"), d)
    {
        out.base_ejection_time = t;
    }
    for (v, field) in [
        (o.max_ejection_percent, "maxEjectionPercent"),
        (o.min_health_percent, "minHealthPercent"),
    ] {
        if v.is_some_and(|v| !(0..=100).contains(&v)) {
            d.error(
                &format!("{p}.{field}"),
                "must be a percentage from 0 to 100",
            );
        }
    }
    // Istio passes maxEjectionPercent on only when it is above 0 (else Envoy's 10% holds).
    if let Some(n) = o.max_ejection_percent.filter(|n| (1..=100).contains(n)) {
        out.max_ejection_percent = n as u32;
    }
    if let Some(n) = o.min_health_percent.filter(|n| (0..=100).contains(n)) {
        out.min_health_percent = n as u32;
    }
    out
}
