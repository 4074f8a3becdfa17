//! Admission checks for Gateway API HTTPRoute and GRPCRoute specs, as the CRDs' schema and CEL
//! rules enforce them: match types, filter types and their members, RequestRedirect vs
//! backendRefs and URLRewrite, ReplacePrefixMatch needing one PathPrefix match, status codes,
//! backend ports; non-Service parents and backends are reported.
//!
//! Owns per-resource Gateway API rules; checks against other resources are `compile_gateway`'s.

use std::collections::BTreeSet;

use super::resilience_gateway;
use super::spec_gateway as gw;
use super::validate::{header_pair, is_service_ref, regex};
use super::{Diags, Severity};

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

pub(super) fn http_route(r: &gw::HttpRoute, d: &mut Diags) {
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
        resilience_gateway::rule_policy(rule.timeouts.as_ref(), &rule.filters, &p, d);
    }
}

pub(super) fn grpc_route(r: &gw::GrpcRoute, d: &mut Diags) {
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
        resilience_gateway::rule_policy(None, &rule.filters, &p, d);
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
            // A rule's mirrors are `resilience_gateway`'s; a backendRef's and extension
            // filters are reported as Unsupported by the schema walk.
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
