//! A VirtualService rule's `timeout`, `retries`, `fault` and `mirror` / `mirrors` → the rule's
//! [`RoutePolicy`], checked as Istio's validation checks them: durations, `retryOn` words,
//! percentages in 0–100, status codes. One pass both validates (`validate_istio` discards the
//! result) and builds (`compile_istio` resolves the mirror hosts to Services).
//!
//! Owns the meaning of these fields only; host resolution is `compile_istio`'s.

use std::time::Duration;

use super::resilience::{
    Abort, AbortStatus, Delay, Fault, GrpcRetryOn, RetryOn, RetryPolicy, RoutePolicy,
};
use super::spec_istio as istio;
use super::validate::parse_duration;
use super::{Diags, Severity};

/// A rule's policy, mirrors still as written (compile resolves them).
pub(super) struct RulePolicy<'a> {
    /// `mirrors` is left empty here.
    pub policy: RoutePolicy,
    pub mirrors: Vec<(&'a istio::Destination, f64, String)>,
}

/// Reads the resilience fields of `rule` (at `p`, e.g. `spec.http[0]`).
pub(super) fn rule_policy<'a>(
    rule: &'a istio::HttpRoute,
    p: &str,
    d: &mut Diags,
) -> RulePolicy<'a> {
    let mut policy = RoutePolicy::default();
    if let Some(t) = &rule.timeout {
        policy.timeout =
            duration(t, &format!("{p}.timeout"), Duration::ZERO, d).filter(|t| !t.is_zero());
    }
    if let Some(r) = &rule.retries {
        policy.retry = retries(r, &format!("{p}.retries"), d);
    }
    if let Some(f) = &rule.fault {
        policy.fault = Some(fault(f, &format!("{p}.fault"), d));
        if rule.timeout.is_some() || rule.retries.is_some() {
            d.push(
                Severity::Warning,
                &format!("{p}.fault"),
                "a rule with a fault has no timeout and no retries (as in Istio): \
                 the timeout and retries set here are not used",
            );
        }
        // Istio: "timeouts or retries will not be enabled when faults are enabled".
        policy.timeout = None;
        policy.retry = RetryPolicy::none();
    }
    let forwards = !rule.route.is_empty();
    let mirrors = mirrors(rule, p, d);
    if !mirrors.is_empty() && !forwards {
        d.push(
            Severity::Unsupported,
            &format!("{p}.mirror"),
            "this rule does not forward (redirect or directResponse): nothing is mirrored",
        );
    }
    RulePolicy { policy, mirrors }
}

/// A duration of at least `min`; `None` (and an Error) when it is not one.
fn duration(s: &str, p: &str, min: Duration, d: &mut Diags) -> Option<Duration> {
    match parse_duration(s) {
        Some(t) if t >= min => Some(t),
        Some(_) => {
            d.error(p, format!("{s:?} is too short: use at least {min:?}"));
            None
        }
        None => {
            d.error(
                p,
                format!("{s:?} is not a duration: write a non-negative one such as 250ms, 5s, 1m"),
            );
            None
        }
    }
}

fn retries(r: &istio::Retries, p: &str, d: &mut Diags) -> RetryPolicy {
    // Istio starts from its default policy and overrides what is set.
    let mut out = RetryPolicy::istio_default();
    if let Some(t) = &r.per_try_timeout {
        out.per_try_timeout = duration(
            t,
            &format!("{p}.perTryTimeout"),
            Duration::from_millis(1),
            d,
        );
    }
    if let Some(words) = &r.retry_on {
        out.retry_on = retry_on(words, &format!("{p}.retryOn"), d);
    }
    if let Some(b) = &r.backoff
        && let Some(b) = duration(b, &format!("{p}.backoff"), Duration::from_millis(1), d)
    {
        out.backoff_base = b;
    }
    if let Some(avoid) = r.retry_ignore_previous_hosts {
        out.avoid_previous_hosts = avoid;
    }
    // Istio: a `retries` block with attempts 0 or unset turns retries off altogether, per-try
    // timeout included.
    match r.attempts {
        Some(n) if n < 0 => {
            d.error(
                &format!("{p}.attempts"),
                "cannot be negative: use 0 to turn retries off",
            );
            RetryPolicy::none()
        }
        Some(0) => RetryPolicy::none(),
        None => {
            d.push(
                Severity::Warning,
                &format!("{p}.attempts"),
                "is unset, which turns retries off (as in Istio): set attempts to retry",
            );
            RetryPolicy::none()
        }
        Some(n) => {
            out.attempts = n as u32;
            out
        }
    }
}

const RETRY_ON_WORDS: &str = "5xx, gateway-error, reset, connect-failure, retriable-4xx, \
     refused-stream, retriable-status-codes, cancelled, deadline-exceeded, internal, \
     resource-exhausted, unavailable, or an HTTP status code";

/// Envoy's `retry_on` list; bare numbers are status codes (Istio adds retriable-status-codes).
pub(super) fn retry_on(words: &str, p: &str, d: &mut Diags) -> RetryOn {
    let mut r = RetryOn {
        grpc: GrpcRetryOn::default(),
        ..RetryOn::default()
    };
    for w in words.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match w {
            "5xx" => r.five_xx = true,
            "gateway-error" => r.gateway_error = true,
            "reset" => r.reset = true,
            "connect-failure" => r.connect_failure = true,
            "retriable-4xx" => r.retriable_4xx = true,
            "refused-stream" => r.refused_stream = true,
            "retriable-status-codes" => {}
            "cancelled" => r.grpc.cancelled = true,
            "deadline-exceeded" => r.grpc.deadline_exceeded = true,
            "internal" => r.grpc.internal = true,
            "resource-exhausted" => r.grpc.resource_exhausted = true,
            "unavailable" => r.grpc.unavailable = true,
            "reset-before-request"
            | "envoy-ratelimited"
            | "retriable-headers"
            | "http3-post-connect-failure" => d.push(
                Severity::Unsupported,
                p,
                format!("{w:?} is not implemented: nothing is retried for it"),
            ),
            _ => match w.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => {
                    if !r.status_codes.contains(&code) {
                        r.status_codes.push(code);
                    }
                }
                _ => d.error(
                    p,
                    format!("{w:?} is not a retry condition: use {RETRY_ON_WORDS}"),
                ),
            },
        }
    }
    r
}

/// A `Percent.value`, checked to be in 0–100.
pub(super) fn percent(v: f64, p: &str, d: &mut Diags) -> f64 {
    if !(0.0..=100.0).contains(&v) {
        d.error(
            p,
            format!("{v} is not a percentage: use a number from 0 to 100"),
        );
        return 0.0;
    }
    v
}

fn fault(f: &istio::Fault, p: &str, d: &mut Diags) -> Fault {
    if f.delay.is_none() && f.abort.is_none() {
        d.error(p, "set delay, abort or both");
    }
    let delay = f.delay.as_ref().and_then(|dl| {
        let dp = format!("{p}.delay");
        let pct = match (&dl.percentage, dl.percent) {
            (Some(x), _) => percent(x.value, &format!("{dp}.percentage.value"), d),
            (None, Some(n)) => percent(n as f64, &format!("{dp}.percent"), d),
            // Unset percentage: no request is delayed.
            (None, None) => 0.0,
        };
        let fixed = match &dl.fixed_delay {
            Some(s) => duration(s, &format!("{dp}.fixedDelay"), Duration::from_millis(1), d)?,
            None => {
                d.error(
                    &format!("{dp}.fixedDelay"),
                    "set the delay, e.g. fixedDelay: 5s",
                );
                return None;
            }
        };
        (pct > 0.0).then_some(Delay {
            fixed,
            percent: pct,
        })
    });
    let abort = f.abort.as_ref().and_then(|ab| {
        let ap = format!("{p}.abort");
        let pct = match &ab.percentage {
            Some(x) => percent(x.value, &format!("{ap}.percentage.value"), d),
            None => 0.0,
        };
        let status = match (ab.http_status, &ab.grpc_status) {
            (Some(_), Some(_)) => {
                d.error(&ap, "httpStatus and grpcStatus exclude each other: keep one");
                return None;
            }
            (Some(s), None) if (200..=599).contains(&s) => AbortStatus::Http(s as u16),
            (Some(_), None) => {
                d.error(&format!("{ap}.httpStatus"), "must be an HTTP status 200-599");
                return None;
            }
            (None, Some(g)) => match grpc_code(g) {
                Some(c) => AbortStatus::Grpc(c),
                None => {
                    d.error(
                        &format!("{ap}.grpcStatus"),
                        format!("{g:?} is not a gRPC status: use a name such as UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED"),
                    );
                    return None;
                }
            },
            (None, None) => {
                d.error(&ap, "set httpStatus or grpcStatus");
                return None;
            }
        };
        (pct > 0.0).then_some(Abort {
            status,
            percent: pct,
        })
    });
    Fault { delay, abort }
}

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status by name (`UNAVAILABLE`) or number (`14`).
fn grpc_code(s: &str) -> Option<u32> {
    if let Ok(n) = s.parse::<u32>() {
        return (n < GRPC_CODES.len() as u32).then_some(n);
    }
    GRPC_CODES.iter().position(|c| *c == s).map(|i| i as u32)
}

/// `mirror` (+ `mirrorPercentage` / `mirrorPercent`) and `mirrors`; a mirror at 0% is dropped.
/// Each entry: destination, percent, field path of the destination.
fn mirrors<'a>(
    rule: &'a istio::HttpRoute,
    p: &str,
    d: &mut Diags,
) -> Vec<(&'a istio::Destination, f64, String)> {
    let mut out = Vec::new();
    let legacy = rule.mirror_percent.or(rule.mirror_percent_snake);
    if let Some(m) = &rule.mirror {
        if !rule.mirrors.is_empty() {
            d.error(
                &format!("{p}.mirror"),
                "mirror and mirrors exclude each other: list every mirror under mirrors",
            );
        }
        let pct = match (&rule.mirror_percentage, legacy) {
            (Some(x), _) => percent(x.value, &format!("{p}.mirrorPercentage.value"), d),
            (None, Some(n)) => percent(n as f64, &format!("{p}.mirrorPercent"), d),
            (None, None) => 100.0,
        };
        out.push((m, pct, format!("{p}.mirror")));
    } else if rule.mirror_percentage.is_some() || legacy.is_some() {
        d.error(
            &format!("{p}.mirrorPercentage"),
            "applies to mirror, which is not set: set mirror, or use mirrors[].percentage",
        );
    }
    for (i, m) in rule.mirrors.iter().enumerate() {
        let mp = format!("{p}.mirrors[{i}]");
        let pct = match &m.percentage {
            Some(x) => percent(x.value, &format!("{mp}.percentage.value"), d),
            None => 100.0,
        };
        out.push((&m.destination, pct, format!("{mp}.destination")));
    }
    for (dest, _, fp) in &out {
        if dest.host.is_empty() {
            d.error(&format!("{fp}.host"), "name the Service to mirror to");
        }
    }
    out.retain(|(_, pct, _)| *pct > 0.0);
    out
}
