//! A Gateway API rule's `timeouts` (HTTPRoute) and `RequestMirror` filters (HTTPRoute,
//! GRPCRoute) → the rule's [`RoutePolicy`], checked as the CRDs' schema and CEL rules check them.
//! Retries stay Istio's default policy (Istio applies it to HTTPRoute too); as Istio does for a
//! rule without `retry`, `timeouts.backendRequest` (else `request`) bounds the whole exchange.
//! One pass both validates
//! (`validate_gateway` discards the result) and builds (`compile_gateway` resolves backends).
//!
//! Owns the meaning of these fields only; Service lookups are `compile_gateway`'s.

use std::time::Duration;

use super::resilience::RoutePolicy;
use super::spec_gateway as gw;
use super::validate::{is_service_ref, parse_duration};
use super::{Diags, Severity};

/// A rule's policy, mirrors still as written: (backendRef, percent, field path).
pub(super) struct RulePolicy<'a> {
    pub policy: RoutePolicy,
    pub mirrors: Vec<(&'a gw::BackendRef, f64, String)>,
}

/// Reads `timeouts` (`None` for GRPCRoute, which has none) and the rule's RequestMirror filters.
pub(super) fn rule_policy<'a>(
    timeouts: Option<&gw::Timeouts>,
    filters: &'a [gw::Filter],
    p: &str,
    d: &mut Diags,
) -> RulePolicy<'a> {
    let mut policy = RoutePolicy::default();
    if let Some(t) = timeouts {
        let tp = format!("{p}.timeouts");
        let request = t
            .request
            .as_deref()
            .and_then(|s| duration(s, &format!("{tp}.request"), d));
        let backend = t
            .backend_request
            .as_deref()
            .and_then(|s| duration(s, &format!("{tp}.backendRequest"), d));
        if let (Some(r), Some(b)) = (request, backend)
            && b > r
        {
            d.error(
                &format!("{tp}.backendRequest"),
                "is longer than timeouts.request, which covers every attempt: make it shorter or equal",
            );
        }
        // Istio without a `retry` stanza (not implemented here): backendRequest becomes the
        // route's timeout in place of request; the default retries apply.
        policy.timeout = backend.or(request);
    }
    let mut mirrors = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        if f.kind != "RequestMirror" {
            continue;
        }
        let fp = format!("{p}.filters[{i}].requestMirror");
        let Some(m) = &f.request_mirror else {
            d.error(&fp, "set it for type RequestMirror");
            continue;
        };
        let b = &m.backend_ref;
        let bp = format!("{fp}.backendRef");
        if b.name.is_empty() {
            d.error(&format!("{bp}.name"), "name the Service to mirror to");
        }
        if !is_service_ref(b.group.as_deref(), b.kind.as_deref()) {
            d.push(
                Severity::Unsupported,
                &bp,
                "only Service backends are implemented: nothing is mirrored to this one",
            );
            continue;
        }
        if b.port.is_none() {
            d.error(&format!("{bp}.port"), "a Service backend needs a port");
        }
        let percent = match (m.percent, &m.fraction) {
            (Some(_), Some(_)) => {
                d.error(&fp, "percent and fraction exclude each other: keep one");
                continue;
            }
            (Some(n), None) => n as f64,
            (None, Some(fr)) => {
                let den = fr.denominator.unwrap_or(100);
                if den < 1 || fr.numerator < 0 || fr.numerator > den {
                    d.error(
                        &format!("{fp}.fraction"),
                        "needs 0 <= numerator <= denominator and denominator >= 1",
                    );
                    continue;
                }
                fr.numerator as f64 * 100.0 / den as f64
            }
            (None, None) => 100.0,
        };
        if percent > 0.0 {
            mirrors.push((b, percent, bp));
        }
    }
    RulePolicy { policy, mirrors }
}

/// A Gateway API duration; `0s` (and an invalid one, reported) mean no limit.
fn duration(s: &str, p: &str, d: &mut Diags) -> Option<Duration> {
    match parse_duration(s) {
        Some(t) => (!t.is_zero()).then_some(t),
        None => {
            d.error(
                p,
                format!("{s:?} is not a duration: write one such as 500ms, 10s, 1m (0s: no limit)"),
            );
            None
        }
    }
}
