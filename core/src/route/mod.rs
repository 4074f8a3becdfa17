//! The L7 route engine (meshcore::route): Istio `VirtualService` / `DestinationRule` and Gateway
//! API `HTTPRoute` / `GRPCRoute`, read from their `spec` JSON, validated, compiled into a
//! [`RouteTable`] that answers per request "where does this go?", plus load balancing ([`lb`]).
//!
//! Pure: no I/O, no clocks, no global state. meshd uses [`validate`] and [`references`]; the
//! waypoint uses [`compile`] and the table. Every accepted field keeps Istio's (or Gateway API's)
//! meaning; what is not implemented is reported as [`Severity::Unsupported`], never ignored
//! silently.
//!
//! Submodules: `schema` (known fields, type checks, unknown-field reports), `spec_istio` /
//! `spec_gateway` (serde types), `validate` (+ `validate_istio`, `validate_gateway`: per-resource
//! checks), `hosts` (host names → service keys, [`references`]), `matcher` (compiled matches),
//! `compile` (+ `compile_istio`, `compile_gateway`: building the table), `decide` (the
//! per-request decision), `rewrite` (paths, redirects, header edits), [`lb`], [`resilience`]
//! (timeouts, retries, faults, mirrors, pools, outlier detection; read by `resilience_istio`,
//! `resilience_gateway` and `resilience_dr`).

mod compile;
mod compile_gateway;
mod compile_istio;
mod decide;
mod hosts;
pub mod lb;
mod matcher;
pub mod resilience;
mod resilience_dr;
mod resilience_gateway;
mod resilience_istio;
mod rewrite;
mod schema;
pub mod spec_gateway;
pub mod spec_istio;
mod validate;
mod validate_gateway;
mod validate_istio;

use std::fmt;

pub use compile::{PortInfo, RouteResourceRef, RouteTable, ServiceInfo, compile};
pub use decide::{Backend, Forward, HttpDecision, HttpRequestInfo, TcpDecision};
pub use hosts::{Refs, references};
pub use resilience::{DestinationPolicy, RoutePolicy};
pub use rewrite::{HeaderEdits, HeaderOps};
pub use validate::validate;

/// How bad a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Severity {
    /// The resource is invalid and is left out entirely (meshd keeps the last good version).
    Error,
    /// A field we read but do not implement (yet): the rest of the resource applies.
    Unsupported,
    /// Two resources claim the same thing; the message says which one wins.
    Conflict,
    /// Valid, but something it names does not exist (yet); the message says what happens.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Unsupported => "unsupported",
            Severity::Conflict => "conflict",
            Severity::Warning => "warning",
        })
    }
}

/// One finding about one resource, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// `"Kind ns/name"`, e.g. `"VirtualService default/web"`.
    pub resource: String,
    /// The JSON path of the field, e.g. `spec.http[0].match[1].uri.regex`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub message: String,
    pub severity: Severity,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}: {}",
            self.severity, self.resource, self.field, self.message
        )
    }
}

/// The route resource kinds this engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    /// The Kubernetes kind name (`"HTTPRoute"`), or `None` for a kind this engine does not read.
    pub fn parse(kind: &str) -> Option<Kind> {
        match kind {
            "VirtualService" => Some(Kind::VirtualService),
            "DestinationRule" => Some(Kind::DestinationRule),
            "HTTPRoute" => Some(Kind::HttpRoute),
            "GRPCRoute" => Some(Kind::GrpcRoute),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }
}

/// Collects the diagnostics of one resource.
pub(crate) struct Diags {
    resource: String,
    pub list: Vec<Diagnostic>,
}

impl Diags {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Diags {
        Diags {
            resource: format!("{kind} {namespace}/{name}"),
            list: Vec::new(),
        }
    }

    pub fn push(&mut self, severity: Severity, field: &str, message: impl fmt::Display) {
        self.list.push(Diagnostic {
            resource: self.resource.clone(),
            field: field.to_string(),
            message: message.to_string(),
            severity,
        });
    }

    pub fn error(&mut self, field: &str, message: impl fmt::Display) {
        self.push(Severity::Error, field, message);
    }

    pub fn has_errors(&self) -> bool {
        self.list.iter().any(|d| d.severity == Severity::Error)
    }
}
