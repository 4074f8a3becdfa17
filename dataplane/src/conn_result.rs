//! One result per proxied connection: [`ConnResult::finish`] writes the access-log line and
//! closes the connection's metrics together, so the two never disagree and no proxy path logs
//! a connection by hand.
//!
//! Owns the access-log line of an L4 connection (target `access`, Istio's; message
//! `connection complete`, `connection failed` or the denial's own; each fact in [`AccessLog`]
//! written only when known) and the response flags its close is counted with; and, when the
//! connection was sampled ([`ConnResult::traced`]), its span (the same facts as attributes),
//! exported by [`crate::spans`]. The counters are [`crate::tcp_metrics`]'s, the labels
//! [`crate::telemetry`]'s; decides nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::spans::{Attr, Kind, Span, SpanExt, Spans, Status};
use crate::tcp_metrics::ConnMetrics;
use crate::telemetry::FLAG_DENY;

/// The facts of one connection's access-log line; `None` is left out of the line.
///
/// Names are shared strings: a pod's are the same for every connection it has, and an open
/// connection holds its log until it closes, so each held connection would otherwise carry
/// copies of its own.
#[derive(Debug, Default, Clone)]
pub struct AccessLog {
    /// `"inbound"` or `"outbound"`.
    pub direction: &'static str,
    pub src_workload: Option<Arc<str>>,
    pub src_namespace: Option<Arc<str>>,
    pub src_identity: Option<Arc<str>>,
    pub dst_workload: Option<Arc<str>>,
    pub dst_namespace: Option<Arc<str>>,
    pub dst_identity: Option<Arc<str>>,
    /// The client's address as the reporter saw it.
    pub peer: Option<SocketAddr>,
    /// The original destination the client dialled.
    pub dst: Option<SocketAddr>,
    /// The address an HBONE CONNECT asked for (inbound).
    pub target: Option<SocketAddr>,
    /// The endpoint chosen (outbound).
    pub endpoint: Option<SocketAddr>,
    /// The waypoint the connection went through: `ns/name` of its Gateway, its pod, its address.
    pub waypoint: Option<Arc<str>>,
    pub waypoint_workload: Option<Arc<str>>,
    pub waypoint_address: Option<SocketAddr>,
    /// `"HBONE"` or `"TCP"`.
    pub protocol: Option<&'static str>,
}

/// How a connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Bytes flowed until both sides closed.
    Complete { sent: u64, received: u64 },
    /// Refused by policy before any byte flowed; `message` says how the client was told
    /// (e.g. `"connection denied; 401"`).
    Denied {
        reason: String,
        message: &'static str,
    },
    /// Failed: `flags` is what the close is counted with (none for an I/O error mid-copy),
    /// `bytes` what moved before, if anything was being copied.
    Failed {
        flags: Option<&'static str>,
        error: String,
        bytes: Option<(u64, u64)>,
    },
}

impl Outcome {
    /// Failed before any byte was copied.
    pub fn failed(flags: Option<&'static str>, error: String) -> Outcome {
        Outcome::Failed {
            flags,
            error,
            bytes: None,
        }
    }
}

/// A span per sampled connection: the exporter and the share of connections traced.
#[derive(Debug)]
pub struct ConnSpans {
    pub spans: Spans,
    /// Probability in 0..=1.
    pub sampling: f64,
}

/// One open connection: its metrics guard (opened already), its log facts, its span if traced.
#[derive(Debug)]
pub struct ConnResult {
    start: Instant,
    metrics: ConnMetrics,
    pub log: AccessLog,
    /// Boxed: most connections are not traced, and an inline `Span` would cost every one of
    /// them 288 bytes for as long as it stays open.
    span: Option<Box<Span>>,
}

impl ConnResult {
    /// Starts the result of a connection whose metrics were opened as `metrics`, begun at
    /// `start`.
    pub fn new(start: Instant, metrics: ConnMetrics, log: AccessLog) -> ConnResult {
        ConnResult {
            start,
            metrics,
            log,
            span: None,
        }
    }

    /// Starts the connection's span when `spans` is set and the connection is sampled (a new
    /// trace: an L4 connection carries no trace context). Call once the log facts are in.
    pub fn traced(mut self, spans: Option<&ConnSpans>) -> ConnResult {
        let Some(t) = spans.filter(|t| rand::random::<f64>() < t.sampling) else {
            return self;
        };
        let l = &self.log;
        let to = l.target.or(l.endpoint).or(l.dst);
        let name = match to {
            Some(to) => format!("{} {to}", l.direction),
            None => l.direction.to_string(),
        };
        let kind = if l.direction == "inbound" {
            Kind::Server
        } else {
            Kind::Client
        };
        let started = SystemTime::now() - self.start.elapsed();
        self.span = Some(Box::new(t.spans.start_span(
            name,
            kind,
            started,
            None,
            Vec::new(),
        )));
        self
    }

    /// The metrics guard, for counting bytes while they flow.
    pub fn metrics(&self) -> &ConnMetrics {
        &self.metrics
    }

    /// Counts the close (with the outcome's flags) and writes the access-log line.
    pub fn finish(self, outcome: Outcome) {
        let ConnResult {
            start,
            mut metrics,
            log,
            span,
        } = self;
        let flags = match &outcome {
            Outcome::Complete { .. } => None,
            Outcome::Denied { .. } => Some(FLAG_DENY),
            Outcome::Failed { flags, .. } => *flags,
        };
        if let Some(f) = flags {
            metrics.set_response_flags(f);
        }
        drop(metrics);
        let dur_ms = start.elapsed().as_millis() as u64;
        let (message, bytes, reason, error) = match outcome {
            Outcome::Complete { sent, received } => {
                ("connection complete", Some((sent, received)), None, None)
            }
            Outcome::Denied { reason, message } => (message, None, Some(reason), None),
            Outcome::Failed { error, bytes, .. } => ("connection failed", bytes, None, Some(error)),
        };
        let (sent, received) = (bytes.map(|b| b.0), bytes.map(|b| b.1));
        if let Some(span) = span {
            end_span(
                *span,
                &log,
                flags,
                sent,
                received,
                error.as_deref(),
                reason.as_deref(),
            );
        }
        let l = &log;
        macro_rules! line {
            ($lvl:ident) => {
                tracing::$lvl!(target: "access", direction = l.direction,
                    src.workload = l.src_workload.as_deref(), src.namespace = l.src_namespace.as_deref(),
                    src.identity = l.src_identity.as_deref(), dst.workload = l.dst_workload.as_deref(),
                    dst.namespace = l.dst_namespace.as_deref(), dst.identity = l.dst_identity.as_deref(),
                    peer = l.peer.map(tracing::field::display), dst = l.dst.map(tracing::field::display), target = l.target.map(tracing::field::display),
                    endpoint = l.endpoint.map(tracing::field::display), waypoint = l.waypoint.as_deref(),
                    waypoint.workload = l.waypoint_workload.as_deref(),
                    waypoint.address = l.waypoint_address.map(tracing::field::display), protocol = l.protocol,
                    sent, received, dur_ms, response_flags = flags, reason = reason.as_deref(),
                    error = error.as_deref(), "{message}")
            };
        }
        if message == "connection complete" {
            line!(info)
        } else {
            line!(warn)
        }
    }
}

/// Ends a connection's span with its access-log facts as attributes.
fn end_span(
    mut span: Span,
    l: &AccessLog,
    flags: Option<&'static str>,
    sent: Option<u64>,
    received: Option<u64>,
    error: Option<&str>,
    reason: Option<&str>,
) {
    let mut attrs = vec![
        Attr::new("direction", l.direction),
        Attr::new(
            "response_flags",
            flags.unwrap_or(crate::telemetry::NO_FLAGS),
        ),
    ];
    let mut text = |k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            attrs.push(Attr::new(k, v));
        }
    };
    for (k, v) in [
        ("src.workload", &l.src_workload),
        ("src.namespace", &l.src_namespace),
        ("src.identity", &l.src_identity),
        ("dst.workload", &l.dst_workload),
        ("dst.namespace", &l.dst_namespace),
        ("dst.identity", &l.dst_identity),
    ] {
        text(k, v.as_deref().map(str::to_string));
    }
    text("peer.address", l.peer.map(|a| a.to_string()));
    text("dst.address", l.dst.map(|a| a.to_string()));
    text("target", l.target.map(|a| a.to_string()));
    text("endpoint", l.endpoint.map(|a| a.to_string()));
    text("waypoint", l.waypoint.as_deref().map(str::to_string));
    text("protocol", l.protocol.map(str::to_string));
    text("reason", reason.map(str::to_string));
    for (k, v) in [("bytes_sent", sent), ("bytes_received", received)] {
        if let Some(v) = v {
            attrs.push(Attr::new(k, v as i64));
        }
    }
    span.set_attributes(attrs);
    if let Some(e) = error.or(flags) {
        span.set_status(Status::error(e.to_string()));
    }
    span.end();
}
