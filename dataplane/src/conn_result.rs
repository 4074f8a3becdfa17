//! One result per proxied connection: [`ConnResult::finish`] writes the access-log line and
//! closes the connection's metrics together, so the two never disagree and no proxy path logs
//! a connection by hand.
//!
//! Owns the access-log line of an L4 connection (target `access`, Istio's; message
//! `connection complete`, `connection failed` or the denial's own; each fact in [`AccessLog`]
//! written only when known) and the response flags its close is counted with. The counters
//! are [`crate::tcp_metrics`]'s, the labels [`crate::telemetry`]'s; decides nothing.

use std::net::SocketAddr;
use std::time::Instant;

use crate::tcp_metrics::ConnMetrics;
use crate::telemetry::FLAG_DENY;

/// The facts of one connection's access-log line; `None` is left out of the line.
#[derive(Debug, Default, Clone)]
pub struct AccessLog {
    /// `"inbound"` or `"outbound"`.
    pub direction: &'static str,
    pub src_workload: Option<String>,
    pub src_namespace: Option<String>,
    pub src_identity: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_namespace: Option<String>,
    pub dst_identity: Option<String>,
    /// The client's address as the reporter saw it.
    pub peer: Option<SocketAddr>,
    /// The original destination the client dialled.
    pub dst: Option<SocketAddr>,
    /// The address an HBONE CONNECT asked for (inbound).
    pub target: Option<SocketAddr>,
    /// The endpoint chosen (outbound).
    pub endpoint: Option<SocketAddr>,
    /// The waypoint the connection went through: `ns/name` of its Gateway, its pod, its address.
    pub waypoint: Option<String>,
    pub waypoint_workload: Option<String>,
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

/// One open connection: its metrics guard (opened already) and its log facts.
#[derive(Debug)]
pub struct ConnResult {
    start: Instant,
    metrics: ConnMetrics,
    pub log: AccessLog,
}

impl ConnResult {
    /// Starts the result of a connection whose metrics were opened as `metrics`, begun at
    /// `start`.
    pub fn new(start: Instant, metrics: ConnMetrics, log: AccessLog) -> ConnResult {
        ConnResult {
            start,
            metrics,
            log,
        }
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
