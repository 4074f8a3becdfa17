//! Reading and checking one route resource on its own: the JSON shape (`schema`), then the rules
//! Istio's and Gateway API's admission enforce (one of route/redirect/directResponse, regexes
//! that compile, weights, status codes, filter combinations). Checks that need other resources
//! (unknown hosts, unknown subsets) are `compile`'s.
//!
//! Owns [`validate`] and [`parse`]; knows nothing about services or requests.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use super::schema::{check, spec_shape, without_nulls};
use super::spec_gateway as gw;
use super::spec_istio as istio;
use super::{Diagnostic, Diags, Kind, Severity, matcher};

/// A resource's spec, typed.
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
        Parsed::VirtualService(vs) => virtual_service(vs, d),
        Parsed::DestinationRule(dr) => destination_rule(dr, d),
        Parsed::HttpRoute(r) => http_route(r, d),
        Parsed::GrpcRoute(r) => grpc_route(r, d),
    }
    (!d.has_errors()).then_some(parsed)
}

fn virtual_service(vs: &istio::VirtualService, d: &mut Diags) {
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

fn port_number(port: u32, p: &str, d: &mut Diags) {
    if !(1..=65535).contains(&port) {
        d.error(p, "must be a port number 1-65535");
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

fn header_pair(name: &str, value: &str, p: &str, d: &mut Diags) {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        d.error(p, format!("{name:?} is not a valid header name"));
    } else if http::HeaderValue::from_str(value).is_err() {
        d.error(p, "the value has characters a header cannot carry");
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

fn destination_rule(dr: &istio::DestinationRule, d: &mut Diags) {
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

// ---- Gateway API ----

fn parent_refs(refs: &[gw::ParentRef], d: &mut Diags) {
    if refs.is_empty() {
        d.push(
            Severity::Warning,
            "spec.parentRefs",
            "attaches to nothing: add a parentRef to a Service",
        );
    }
    for (i, r) in refs.iter().enumerate() {
        if !is_service_ref(r.group.as_deref(), r.kind.as_deref().or(Some("Gateway"))) {
            d.push(
                Severity::Unsupported,
                &format!("spec.parentRefs[{i}]"),
                "only Service parents (group \"\", kind Service) are implemented: this parent is ignored",
            );
        }
        if r.name.is_empty() {
            d.error(&format!("spec.parentRefs[{i}].name"), "name the Service");
        }
    }
}

/// Whether a (group, kind) pair names a core Service (`kind` `None` means Service, the
/// backendRef default).
pub(crate) fn is_service_ref(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core")) && matches!(kind, None | Some("Service"))
}

fn http_route(r: &gw::HttpRoute, d: &mut Diags) {
    parent_refs(&r.parent_refs, d);
    for (i, rule) in r.rules.iter().enumerate() {
        let p = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let mp = format!("{p}.matches[{j}]");
            if let Some(path) = &m.path {
                let value = path.value.as_deref().unwrap_or("/");
                match path.kind.as_deref().unwrap_or("PathPrefix") {
                    "Exact" | "PathPrefix" if !value.starts_with('/') => {
                        d.error(&format!("{mp}.path.value"), "must start with /")
                    }
                    "Exact" | "PathPrefix" => {}
                    "RegularExpression" => regex(value, &format!("{mp}.path.value"), d),
                    _ => d.error(
                        &format!("{mp}.path.type"),
                        "must be Exact, PathPrefix or RegularExpression",
                    ),
                }
            }
            typed_matches(&m.headers, &format!("{mp}.headers"), true, d);
            typed_matches(&m.query_params, &format!("{mp}.queryParams"), false, d);
            if let Some(method) = &m.method
                && ![
                    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
                ]
                .contains(&method.as_str())
            {
                d.error(
                    &format!("{mp}.method"),
                    "must be an HTTP method in capitals (GET, POST, ...)",
                );
            }
        }
        filters(&rule.filters, &format!("{p}.filters"), false, d);
        let redirects = rule.filters.iter().any(|f| f.kind == "RequestRedirect");
        if redirects && !rule.backend_refs.is_empty() {
            d.error(
                &p,
                "a RequestRedirect filter cannot be combined with backendRefs",
            );
        }
        let prefix_modifier = rule.filters.iter().any(|f| {
            let path = f.request_redirect.as_ref().and_then(|r| r.path.as_ref());
            let path = path.or(f.url_rewrite.as_ref().and_then(|r| r.path.as_ref()));
            path.is_some_and(|p| p.kind == "ReplacePrefixMatch")
        });
        let one_prefix = rule.matches.len() == 1
            && rule.matches[0]
                .path
                .as_ref()
                .is_some_and(|p| p.kind.as_deref().unwrap_or("PathPrefix") == "PathPrefix");
        if prefix_modifier && !one_prefix {
            d.error(
                &format!("{p}.matches"),
                "ReplacePrefixMatch needs exactly one match, with a PathPrefix path",
            );
        }
        backend_refs(&rule.backend_refs, &format!("{p}.backendRefs"), false, d);
    }
}

fn grpc_route(r: &gw::GrpcRoute, d: &mut Diags) {
    parent_refs(&r.parent_refs, d);
    for (i, rule) in r.rules.iter().enumerate() {
        let p = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let mp = format!("{p}.matches[{j}]");
            if let Some(mm) = &m.method {
                let fp = format!("{mp}.method");
                if mm.service.is_none() && mm.method.is_none() {
                    d.error(&fp, "set service, method or both");
                }
                match mm.kind.as_deref().unwrap_or("Exact") {
                    "Exact" => {
                        for (f, v) in [("service", &mm.service), ("method", &mm.method)] {
                            if v.as_deref()
                                .is_some_and(|v| v.is_empty() || v.contains('/'))
                            {
                                d.error(&format!("{fp}.{f}"), "must be a non-empty name without /");
                            }
                        }
                    }
                    "RegularExpression" => {
                        for (f, v) in [("service", &mm.service), ("method", &mm.method)] {
                            if let Some(v) = v {
                                regex(v, &format!("{fp}.{f}"), d);
                            }
                        }
                    }
                    _ => d.error(&format!("{fp}.type"), "must be Exact or RegularExpression"),
                }
            }
            typed_matches(&m.headers, &format!("{mp}.headers"), true, d);
        }
        filters(&rule.filters, &format!("{p}.filters"), true, d);
        backend_refs(&rule.backend_refs, &format!("{p}.backendRefs"), true, d);
    }
}

fn typed_matches(list: &[gw::TypedMatch], p: &str, header: bool, d: &mut Diags) {
    let mut seen = BTreeSet::new();
    for (k, m) in list.iter().enumerate() {
        let fp = format!("{p}[{k}]");
        if m.name.is_empty() || (header && http::HeaderName::from_bytes(m.name.as_bytes()).is_err())
        {
            d.error(&format!("{fp}.name"), "must be a valid name");
        }
        let key = if header {
            m.name.to_ascii_lowercase()
        } else {
            m.name.clone()
        };
        if !seen.insert(key) {
            d.error(
                &format!("{fp}.name"),
                "is matched twice in one match: keep one",
            );
        }
        match m.kind.as_deref().unwrap_or("Exact") {
            "Exact" => {}
            "RegularExpression" => regex(&m.value, &format!("{fp}.value"), d),
            _ => d.error(&format!("{fp}.type"), "must be Exact or RegularExpression"),
        }
    }
}

fn filters(list: &[gw::Filter], p: &str, grpc: bool, d: &mut Diags) {
    let mut seen = BTreeSet::new();
    for (i, f) in list.iter().enumerate() {
        let fp = format!("{p}[{i}]");
        let repeatable = matches!(f.kind.as_str(), "RequestMirror" | "ExtensionRef");
        if !repeatable && !seen.insert(f.kind.as_str()) {
            d.error(
                &format!("{fp}.type"),
                format!("{} can appear only once", f.kind),
            );
        }
        match f.kind.as_str() {
            "RequestHeaderModifier" => header_modifier(
                f.request_header_modifier.as_ref(),
                &fp,
                "requestHeaderModifier",
                d,
            ),
            "ResponseHeaderModifier" => header_modifier(
                f.response_header_modifier.as_ref(),
                &fp,
                "responseHeaderModifier",
                d,
            ),
            "RequestRedirect" if !grpc => match &f.request_redirect {
                None => d.error(
                    &format!("{fp}.requestRedirect"),
                    "set it for type RequestRedirect",
                ),
                Some(r) => {
                    let rp = format!("{fp}.requestRedirect");
                    if let Some(code) = r.status_code
                        && ![301, 302, 303, 307, 308].contains(&code)
                    {
                        d.error(
                            &format!("{rp}.statusCode"),
                            "must be 301, 302, 303, 307 or 308",
                        );
                    }
                    if let Some(s) = &r.scheme
                        && s != "http"
                        && s != "https"
                    {
                        d.error(&format!("{rp}.scheme"), "must be http or https");
                    }
                    if let Some(path) = &r.path {
                        path_modifier(path, &format!("{rp}.path"), d);
                    }
                }
            },
            "URLRewrite" if !grpc => match &f.url_rewrite {
                None => d.error(&format!("{fp}.urlRewrite"), "set it for type URLRewrite"),
                Some(r) => {
                    if let Some(path) = &r.path {
                        path_modifier(path, &format!("{fp}.urlRewrite.path"), d);
                    }
                }
            },
            // Their members are reported as Unsupported by the schema walk.
            "RequestMirror" | "ExtensionRef" => {}
            "CORS" | "ExternalAuth" if !grpc => {}
            _ => d.error(&format!("{fp}.type"), "is not a filter type of this kind"),
        }
    }
    if seen.contains("RequestRedirect") && seen.contains("URLRewrite") {
        d.error(
            p,
            "RequestRedirect and URLRewrite exclude each other: keep one",
        );
    }
}

fn header_modifier(m: Option<&gw::HeaderModifier>, p: &str, field: &str, d: &mut Diags) {
    let Some(m) = m else {
        d.error(&format!("{p}.{field}"), "set it for this filter type");
        return;
    };
    for (op, list) in [("set", &m.set), ("add", &m.add)] {
        let mut seen = BTreeSet::new();
        for (i, nv) in list.iter().enumerate() {
            let fp = format!("{p}.{field}.{op}[{i}]");
            header_pair(&nv.name, &nv.value, &fp, d);
            if !seen.insert(nv.name.to_ascii_lowercase()) {
                d.error(&fp, "this header is named twice: keep one");
            }
        }
    }
    for (i, name) in m.remove.iter().enumerate() {
        header_pair(name, "", &format!("{p}.{field}.remove[{i}]"), d);
    }
}

fn path_modifier(m: &gw::PathModifier, p: &str, d: &mut Diags) {
    let (value, field) = match m.kind.as_str() {
        "ReplaceFullPath" => (&m.replace_full_path, "replaceFullPath"),
        "ReplacePrefixMatch" => (&m.replace_prefix_match, "replacePrefixMatch"),
        _ => {
            d.error(
                &format!("{p}.type"),
                "must be ReplaceFullPath or ReplacePrefixMatch",
            );
            return;
        }
    };
    match value {
        None => d.error(
            &format!("{p}.{field}"),
            format!("set it for type {}", m.kind),
        ),
        Some(v) if !v.is_empty() && !v.starts_with('/') => {
            d.error(&format!("{p}.{field}"), "must start with /")
        }
        Some(_) => {}
    }
}

fn backend_refs(refs: &[gw::BackendRef], p: &str, grpc: bool, d: &mut Diags) {
    for (i, b) in refs.iter().enumerate() {
        let bp = format!("{p}[{i}]");
        if !is_service_ref(b.group.as_deref(), b.kind.as_deref()) {
            d.push(
                Severity::Warning,
                &bp,
                "only Service backends are implemented: requests sent to this one get 500",
            );
        } else if b.port.is_none() {
            d.error(&format!("{bp}.port"), "a Service backend needs a port");
        }
        if b.name.is_empty() {
            d.error(&format!("{bp}.name"), "name the Service");
        }
        filters(&b.filters, &format!("{bp}.filters"), grpc, d);
        for (j, f) in b.filters.iter().enumerate() {
            if matches!(f.kind.as_str(), "RequestRedirect" | "URLRewrite") {
                d.push(
                    Severity::Unsupported,
                    &format!("{bp}.filters[{j}]"),
                    "only header modifiers are implemented on a backendRef: this filter is ignored",
                );
            }
        }
    }
}
