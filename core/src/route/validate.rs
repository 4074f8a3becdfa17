//! Reading and checking one route resource on its own: the JSON shape (`schema`), then the rules
//! Istio's and Gateway API's admission enforce (one of route/redirect/directResponse, regexes
//! that compile, weights, status codes, filter combinations). Checks that need other resources
//! (unknown hosts, unknown subsets) are `compile`'s.
//!
//! Owns [`validate`] and [`parse`]; knows nothing about services or requests.

use std::time::Duration;

use serde_json::Value;

use super::schema::{check, spec_shape, without_nulls};
use super::spec_gateway as gw;
use super::spec_istio as istio;
use super::{Diagnostic, Diags, Kind, matcher, validate_gateway, validate_istio};

/// A resource's spec, typed.
// Made once per resource and kept only while compiling: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum Parsed {
    VirtualService(istio::VirtualService),
    DestinationRule(istio::DestinationRule),
    HttpRoute(gw::HttpRoute),
    GrpcRoute(gw::GrpcRoute),
}

/// Checks one resource as meshd receives it. An `Error` means the resource must be refused;
/// `Unsupported` and `Warning` entries are to be shown to the user (log, status) but do not stop
/// it. `kind` is the Kubernetes kind (`"VirtualService"`, `"HTTPRoute"`, ...).
pub fn validate(kind: &str, namespace: &str, name: &str, spec: &Value) -> Vec<Diagnostic> {
    let mut d = Diags::new(kind, namespace, name);
    match Kind::parse(kind) {
        Some(k) => {
            parse(k, spec, &mut d);
        }
        None => d.error(
            "kind",
            "not a route kind (VirtualService, DestinationRule, HTTPRoute, GRPCRoute)",
        ),
    }
    d.list
}

/// Checks and types a spec; `None` when it has an Error (all errors are in `d`).
pub(crate) fn parse(kind: Kind, spec: &Value, d: &mut Diags) -> Option<Parsed> {
    check(spec_shape(kind), spec, "spec", d);
    if d.has_errors() {
        return None;
    }
    let spec = without_nulls(spec);
    let parsed = match kind {
        Kind::VirtualService => serde_json::from_value(spec).map(Parsed::VirtualService),
        Kind::DestinationRule => serde_json::from_value(spec).map(Parsed::DestinationRule),
        Kind::HttpRoute => serde_json::from_value(spec).map(Parsed::HttpRoute),
        Kind::GrpcRoute => serde_json::from_value(spec).map(Parsed::GrpcRoute),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            d.error("spec", format!("cannot be read: {e}"));
            return None;
        }
    };
    match &parsed {
        Parsed::VirtualService(vs) => validate_istio::virtual_service(vs, d),
        Parsed::DestinationRule(dr) => validate_istio::destination_rule(dr, d),
        Parsed::HttpRoute(r) => validate_gateway::http_route(r, d),
        Parsed::GrpcRoute(r) => validate_gateway::grpc_route(r, d),
    }
    (!d.has_errors()).then_some(parsed)
}

pub(crate) fn regex(pattern: &str, p: &str, d: &mut Diags) {
    if let Err(e) = matcher::full_regex(pattern) {
        d.error(
            p,
            format!(
                "invalid regular expression (RE2 syntax, matched against the whole value): {e}"
            ),
        );
    }
}

pub(super) fn port_number(port: u32, p: &str, d: &mut Diags) {
    if !(1..=65535).contains(&port) {
        d.error(p, "must be a port number 1-65535");
    }
}

pub(super) fn header_pair(name: &str, value: &str, p: &str, d: &mut Diags) {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        d.error(p, format!("{name:?} is not a valid header name"));
    } else if http::HeaderValue::from_str(value).is_err() {
        d.error(p, "the value has characters a header cannot carry");
    }
}

/// A Go / protobuf duration: `1h`, `30m`, `1.5s`, `250ms`, `0s`, also combined (`1h30m`).
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Whether a (group, kind) pair names a core Service (`kind` `None` means Service, the
/// backendRef default).
pub(crate) fn is_service_ref(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core")) && matches!(kind, None | Some("Service"))
}
