//! Admission checks for Istio VirtualService and DestinationRule specs, as Istio's validation
//! enforces them: one action per rule, one of exact/prefix/regex, regexes that compile, weights,
//! redirect codes, direct response statuses, header names, load balancer settings.
//!
//! Owns per-resource Istio rules; checks against other resources are `compile_istio`'s.

use std::collections::BTreeSet;

use super::resilience_dr;
use super::resilience_istio;
use super::spec_istio as istio;
use super::validate::{header_pair, parse_duration, port_number, regex};
use super::{Diags, Severity};

pub(super) fn virtual_service(vs: &istio::VirtualService, d: &mut Diags) {
    if vs.hosts.is_empty() {
        d.error(
            "spec.hosts",
            "list at least one host (the Service this applies to)",
        );
    }
    for (i, h) in vs.hosts.iter().enumerate() {
        if h.is_empty() {
            d.error(&format!("spec.hosts[{i}]"), "must not be empty");
        }
    }
    for (i, rule) in vs.http.iter().enumerate() {
        let p = format!("spec.http[{i}]");
        let actions = [
            !rule.route.is_empty(),
            rule.redirect.is_some(),
            rule.direct_response.is_some(),
        ];
        match actions.iter().filter(|a| **a).count() {
            0 if rule.delegate.is_none() => {
                d.error(&p, "needs one of route, redirect or directResponse")
            }
            0 | 1 => {}
            _ => d.error(
                &p,
                "route, redirect and directResponse exclude each other: keep one",
            ),
        }
        if rule.rewrite.is_some() && rule.redirect.is_some() {
            d.error(
                &format!("{p}.rewrite"),
                "rewrite cannot be combined with redirect",
            );
        }
        for (j, m) in rule.matches.iter().enumerate() {
            http_match(m, &format!("{p}.match[{j}]"), d);
        }
        destinations(&rule.route, &format!("{p}.route"), d);
        resilience_istio::rule_policy(rule, &p, d);
        for (k, r) in rule.route.iter().enumerate() {
            if let Some(h) = &r.headers {
                istio_headers(h, &format!("{p}.route[{k}].headers"), d);
            }
        }
        if let Some(h) = &rule.headers {
            istio_headers(h, &format!("{p}.headers"), d);
        }
        if let Some(r) = &rule.redirect {
            redirect(r, &format!("{p}.redirect"), d);
        }
        if let Some(dr) = &rule.direct_response
            && !(200..=599).contains(&dr.status)
        {
            d.error(
                &format!("{p}.directResponse.status"),
                "must be an HTTP status 200-599",
            );
        }
        if let Some(rw) = &rule.rewrite {
            let rp = format!("{p}.rewrite");
            if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
                d.error(&rp, "uri and uriRegexRewrite exclude each other: keep one");
            }
            if let Some(rr) = &rw.uri_regex_rewrite {
                regex(&rr.pattern, &format!("{rp}.uriRegexRewrite.match"), d);
            }
            if let Some(a) = &rw.authority
                && http::HeaderValue::from_str(a).is_err()
            {
                d.error(&format!("{rp}.authority"), "is not a valid host name");
            }
        }
    }
    for (i, rule) in vs.tcp.iter().enumerate() {
        let p = format!("spec.tcp[{i}]");
        if rule.route.is_empty() {
            d.error(&format!("{p}.route"), "list at least one destination");
        }
        for (j, m) in rule.matches.iter().enumerate() {
            if let Some(port) = m.port {
                port_number(port, &format!("{p}.match[{j}].port"), d);
            }
        }
        destinations(&rule.route, &format!("{p}.route"), d);
    }
}

fn http_match(m: &istio::HttpMatch, p: &str, d: &mut Diags) {
    for (field, sm) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(sm) = sm {
            string_match(sm, &format!("{p}.{field}"), d);
        }
    }
    for (field, map) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
        ("queryParams", &m.query_params),
    ] {
        for (key, sm) in map {
            let fp = format!("{p}.{field}.{key}");
            if field != "queryParams" && http::HeaderName::from_bytes(key.as_bytes()).is_err() {
                d.error(&fp, "is not a valid header name");
            }
            string_match(sm, &fp, d);
        }
    }
    if let Some(port) = m.port {
        port_number(port, &format!("{p}.port"), d);
    }
}

fn string_match(sm: &istio::StringMatch, p: &str, d: &mut Diags) {
    let set = [&sm.exact, &sm.prefix, &sm.regex]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set > 1 {
        d.error(p, "set only one of exact, prefix or regex");
    }
    if let Some(re) = &sm.regex {
        regex(re, &format!("{p}.regex"), d);
    }
}

fn destinations(route: &[istio::RouteDestination], p: &str, d: &mut Diags) {
    let mut sum: i64 = 0;
    for (k, r) in route.iter().enumerate() {
        let rp = format!("{p}[{k}]");
        if r.destination.host.is_empty() {
            d.error(
                &format!("{rp}.destination.host"),
                "name the Service to send to",
            );
        }
        if let Some(port) = &r.destination.port {
            port_number(port.number, &format!("{rp}.destination.port.number"), d);
        }
        if let Some(s) = &r.destination.subset
            && s.is_empty()
        {
            d.error(
                &format!("{rp}.destination.subset"),
                "must not be empty (omit it instead)",
            );
        }
        let w = r.weight.unwrap_or(0);
        if w < 0 {
            d.error(&format!("{rp}.weight"), "must not be negative");
        }
        sum += w.max(0);
    }
    if route.len() > 1 && sum == 0 {
        d.error(
            p,
            "the weights sum to 0: give at least one destination a positive weight",
        );
    }
    if sum > u32::MAX as i64 {
        d.error(
            p,
            format!("the weights sum to {sum}, over the limit {}", u32::MAX),
        );
    }
}

fn istio_headers(h: &istio::Headers, p: &str, d: &mut Diags) {
    for (dir, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        for (op, map) in [("set", &ops.set), ("add", &ops.add)] {
            for (k, v) in map {
                header_pair(k, v, &format!("{p}.{dir}.{op}.{k}"), d);
            }
        }
        for (i, k) in ops.remove.iter().enumerate() {
            header_pair(k, "", &format!("{p}.{dir}.remove[{i}]"), d);
        }
    }
}

fn redirect(r: &istio::Redirect, p: &str, d: &mut Diags) {
    if let Some(code) = r.redirect_code
        && ![301, 302, 303, 307, 308].contains(&code)
    {
        d.error(
            &format!("{p}.redirectCode"),
            "must be one of 301, 302, 303, 307, 308",
        );
    }
    if let Some(port) = r.port {
        port_number(port, &format!("{p}.port"), d);
    }
    if r.port.is_some() && r.derive_port.is_some() {
        d.error(p, "port and derivePort exclude each other: keep one");
    }
    if let Some(dp) = &r.derive_port
        && dp != "FROM_PROTOCOL_DEFAULT"
        && dp != "FROM_REQUEST_PORT"
    {
        d.error(
            &format!("{p}.derivePort"),
            "must be FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT",
        );
    }
    if let Some(u) = &r.uri
        && !u.starts_with('/')
    {
        d.error(&format!("{p}.uri"), "must start with /");
    }
}

pub(super) fn destination_rule(dr: &istio::DestinationRule, d: &mut Diags) {
    if dr.host.is_empty() {
        d.error("spec.host", "name the Service this applies to");
    }
    let mut names = BTreeSet::new();
    for (i, s) in dr.subsets.iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            d.error(&format!("{p}.name"), "every subset needs a name");
        } else if !names.insert(s.name.as_str()) {
            d.error(
                &format!("{p}.name"),
                format!("subset {:?} is defined twice", s.name),
            );
        }
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(tp, &format!("{p}.trafficPolicy"), d);
        }
    }
    if let Some(tp) = &dr.traffic_policy {
        traffic_policy(tp, "spec.trafficPolicy", d);
    }
}

fn traffic_policy(tp: &istio::TrafficPolicy, p: &str, d: &mut Diags) {
    if let Some(lb) = &tp.load_balancer {
        load_balancer(lb, &format!("{p}.loadBalancer"), d);
    }
    resilience(
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        p,
        d,
    );
    let mut ports = BTreeSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = format!("{p}.portLevelSettings[{i}]");
        match &pl.port {
            None => d.error(&format!("{pp}.port"), "name the port (port.number)"),
            Some(port) => {
                port_number(port.number, &format!("{pp}.port.number"), d);
                if !ports.insert(port.number) {
                    d.error(&format!("{pp}.port.number"), "this port has settings twice");
                }
            }
        }
        if let Some(lb) = &pl.load_balancer {
            load_balancer(lb, &format!("{pp}.loadBalancer"), d);
        }
        resilience(
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            &pp,
            d,
        );
    }
}

fn resilience(
    pool: Option<&istio::ConnectionPoolSettings>,
    outlier: Option<&istio::OutlierDetection>,
    p: &str,
    d: &mut Diags,
) {
    if let Some(c) = pool {
        resilience_dr::connection_pool(c, &format!("{p}.connectionPool"), d);
    }
    if let Some(o) = outlier {
        resilience_dr::outlier_detection(o, &format!("{p}.outlierDetection"), d);
    }
}

fn load_balancer(lb: &istio::LoadBalancer, p: &str, d: &mut Diags) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        d.error(p, "simple and consistentHash exclude each other: keep one");
    }
    match lb.simple.as_deref() {
        None | Some("UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN" | "ROUND_ROBIN" | "RANDOM") => {}
        Some("PASSTHROUGH") => d.push(
            Severity::Unsupported,
            &format!("{p}.simple"),
            "PASSTHROUGH is not implemented: LEAST_REQUEST is used",
        ),
        Some(_) => d.error(
            &format!("{p}.simple"),
            "must be LEAST_REQUEST, ROUND_ROBIN, RANDOM or PASSTHROUGH",
        ),
    }
    if let Some(ch) = &lb.consistent_hash {
        let hp = format!("{p}.consistentHash");
        let keys = [
            ch.http_header_name.is_some(),
            ch.http_cookie.is_some(),
            ch.use_source_ip.unwrap_or(false),
            ch.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() != 1 {
            d.error(
                &hp,
                "set exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName",
            );
        }
        if let Some(c) = &ch.http_cookie {
            if c.name.is_empty() {
                d.error(&format!("{hp}.httpCookie.name"), "name the cookie");
            }
            if let Some(ttl) = &c.ttl
                && parse_duration(ttl).is_none()
            {
                d.error(
                    &format!("{hp}.httpCookie.ttl"),
                    "must be a duration such as 0s, 30s, 1h",
                );
            }
        }
    }
}
