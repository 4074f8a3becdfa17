//! Checking one L7 route resource (VirtualService, DestinationRule, HTTPRoute, GRPCRoute) as it
//! is read: what makes it refused, and what is only worth telling the user.
//!
//! Owns turning the route engine's findings into meshd's errors and notes. The rules themselves
//! are the route engine's; meshd never interprets a route's spec beyond its shape.

use serde_json::Value;

use crate::resources::Route;
use crate::translate::RouteRefs;

/// What checking a route found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Each naming the field; any error refuses the resource.
    pub errors: Vec<String>,
    /// Unsupported fields and warnings, each naming the resource and the field.
    pub notes: Vec<String>,
}

pub fn check(route: &Route) -> Checked {
    let mut out = Checked::default();
    match &route.spec {
        Value::Object(_) => {}
        Value::Null => out.errors.push("spec: required".into()),
        other => out
            .errors
            .push(format!("spec: expected a mapping, got {other}")),
    }
    out
}

/// The Services (`ns/name`) a route resource attaches to and sends to.
pub fn references(_route: &Route, _cluster_domain: &str) -> RouteRefs {
    // Filled in by the route engine's `references` (meshcore::route) once it lands.
    RouteRefs::default()
}
