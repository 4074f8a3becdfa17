//! Checking one L7 route resource (VirtualService, DestinationRule, HTTPRoute, GRPCRoute) as it
//! is read: what makes it refused, and what is only worth telling the user; and which Services
//! it attaches to and sends to.
//!
//! Owns turning the route engine's findings (`meshcore::route`) into meshd's errors and notes.
//! The rules themselves are the engine's; meshd never interprets a route's spec itself.

use meshcore::route::{self, Severity};
use serde_json::Value;

use crate::resources::Route;
use crate::translate::RouteRefs;

/// What checking a route found.
#[derive(Debug, Default)]
pub struct Checked {
    /// `<field>: <what is wrong>`; any error refuses the resource.
    pub errors: Vec<String>,
    /// Unsupported fields and warnings, each naming the resource and the field.
    pub notes: Vec<String>,
}

pub fn check(r: &Route) -> Checked {
    let mut out = Checked::default();
    match &r.spec {
        Value::Object(_) => {}
        Value::Null => {
            out.errors.push("spec: required".into());
            return out;
        }
        other => {
            out.errors
                .push(format!("spec: expected a mapping, got {other}"));
            return out;
        }
    }
    for d in route::validate(&r.kind, r.metadata.ns(), &r.metadata.name, &r.spec) {
        match d.severity {
            Severity::Error => out.errors.push(format!("{}: {}", d.field, d.message)),
            _ => out.notes.push(d.to_string()),
        }
    }
    out
}

/// The Services (`ns/name`) a route resource attaches to and sends to.
pub fn references(r: &Route, cluster_domain: &str) -> RouteRefs {
    references_of(&r.kind, r.metadata.ns(), &r.spec, cluster_domain)
}

/// [`references`] of a spec as written in `namespace`.
pub fn references_of(kind: &str, namespace: &str, spec: &Value, cluster_domain: &str) -> RouteRefs {
    let refs = route::references(kind, namespace, spec, cluster_domain);
    RouteRefs {
        attaches_to: refs.attaches_to,
        sends_to: refs.sends_to,
    }
}
