//! Compiling Gateway API HTTPRoutes and GRPCRoutes: parentRefs → Services (and ports), rules
//! → one match entry each, sorted by Gateway API precedence; filters (header modifiers,
//! RequestRedirect, URLRewrite) and weighted backendRefs. Unknown Services are Warnings (their
//! share of requests gets 500), as Gateway API specifies.
//!
//! Owns the Gateway API half of `compile`; the compiled types are `compile`'s.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use super::compile::{
    Action, Dest, GwEntry, Inner, Item, Match, PathCond, Rule, Services, Target, place_mirrors,
};
use super::hosts::backend_key;
use super::matcher::{PathMatch, StrMatch, full_regex};
use super::resilience::RoutePolicy;
use super::resilience_gateway::{self, RulePolicy};
use super::rewrite::{HeaderOps, PathRewrite, Redirect, RedirectPort};
use super::spec_gateway as gw;
use super::validate::{Parsed, is_service_ref};
use super::{Diags, Severity};

/// Gateway API precedence, smaller first: path kind (exact > prefix > regex), path length,
/// method, header count, query count, route age, route `ns/name`, rule index, match index.
pub(super) type Precedence = (
    Reverse<u8>,
    Reverse<usize>,
    bool,
    Reverse<usize>,
    Reverse<usize>,
    i64,
    String,
    usize,
    usize,
);

/// Compiles HTTPRoutes and GRPCRoutes into `inner.gw` (per Service, in precedence order);
/// returns, per Service, the oldest producer route (consumer routes do not displace a
/// VirtualService for other clients).
pub(super) fn routes(
    items: &mut [Item<'_, '_>],
    svc: &Services<'_>,
    inner: &mut Inner,
) -> HashMap<String, String> {
    let mut gw_owner: HashMap<String, String> = HashMap::new();
    for Item { r, parsed: p, d } in items.iter_mut() {
        let kind = match p {
            Some(Parsed::HttpRoute(_)) => "HTTPRoute",
            Some(Parsed::GrpcRoute(_)) => "GRPCRoute",
            _ => continue,
        };
        let resource: Arc<str> = format!("{kind} {}/{}", r.namespace, r.name).into();
        let (rules, refs) = match p {
            Some(Parsed::HttpRoute(h)) => (
                http_rules(h, &resource, r.namespace, svc, d),
                &h.parent_refs,
            ),
            Some(Parsed::GrpcRoute(g)) => (
                grpc_rules(g, &resource, r.namespace, svc, d),
                &g.parent_refs,
            ),
            _ => continue,
        };
        if d.has_errors() {
            continue;
        }
        for (i, pr) in refs.iter().enumerate() {
            if !is_service_ref(pr.group.as_deref(), pr.kind.as_deref().or(Some("Gateway"))) {
                continue;
            }
            let ns = pr.namespace.as_deref().unwrap_or(r.namespace);
            let key = format!("{ns}/{}", pr.name);
            let field = format!("spec.parentRefs[{i}]");
            let Some(s) = svc.get(key.as_str()) else {
                d.push(
                    Severity::Warning,
                    &field,
                    format!("Service {key} does not exist: the route applies once it does"),
                );
                continue;
            };
            let port = match (pr.port, &pr.section_name) {
                (Some(p), _) if !s.ports.iter().any(|sp| sp.port == p) => {
                    d.push(
                        Severity::Warning,
                        &format!("{field}.port"),
                        format!("Service {key} has no port {p}: the route applies to nothing"),
                    );
                    continue;
                }
                (Some(p), _) => Some(p),
                (None, Some(name)) => match s.ports.iter().find(|sp| &sp.name == name) {
                    Some(sp) => Some(sp.port),
                    None => {
                        d.push(
                            Severity::Warning,
                            &format!("{field}.sectionName"),
                            format!("Service {key} has no port named {name:?}"),
                        );
                        continue;
                    }
                },
                (None, None) => None,
            };
            let consumer_ns = (ns != r.namespace).then(|| r.namespace.to_string());
            if consumer_ns.is_none() {
                gw_owner
                    .entry(key.clone())
                    .or_insert_with(|| resource.to_string());
            }
            let entries = inner.gw.entry(key).or_default();
            for (ri, (rule, matches)) in rules.iter().enumerate() {
                for (mi, (m, rank, len)) in matches.iter().enumerate() {
                    entries.push(GwEntry {
                        consumer_ns: consumer_ns.clone(),
                        port,
                        m: m.clone(),
                        rule: Arc::clone(rule),
                        order: (
                            Reverse(*rank),
                            Reverse(*len),
                            m.method.is_none(),
                            Reverse(m.headers.len()),
                            Reverse(m.query.len()),
                            r.generation_order,
                            format!("{}/{}", r.namespace, r.name),
                            ri,
                            mi,
                        ),
                    });
                }
            }
        }
    }
    for entries in inner.gw.values_mut() {
        entries.sort_by(|a, b| a.order.cmp(&b.order));
    }
    gw_owner
}

/// Header modifiers of a list of Gateway API filters: (request, response).
fn gw_header_ops(filters: &[gw::Filter]) -> (Arc<HeaderOps>, Arc<HeaderOps>) {
    let conv = |m: Option<&gw::HeaderModifier>| {
        Arc::new(m.map_or_else(HeaderOps::default, |m| {
            HeaderOps::new(
                m.set.iter().map(|nv| (nv.name.as_str(), nv.value.as_str())),
                m.add.iter().map(|nv| (nv.name.as_str(), nv.value.as_str())),
                m.remove.iter().map(String::as_str),
            )
        }))
    };
    let req = filters.iter().find_map(|f| {
        (f.kind == "RequestHeaderModifier")
            .then_some(f.request_header_modifier.as_ref())
            .flatten()
    });
    let resp = filters.iter().find_map(|f| {
        (f.kind == "ResponseHeaderModifier")
            .then_some(f.response_header_modifier.as_ref())
            .flatten()
    });
    (conv(req), conv(resp))
}

fn gw_dests(
    refs: &[gw::BackendRef],
    p: &str,
    ns: &str,
    svc: &Services<'_>,
    d: &mut Diags,
) -> (Vec<Dest>, u64) {
    let mut dests = Vec::new();
    let mut total = 0;
    for (k, b) in refs.iter().enumerate() {
        let backend = backend_key(b, ns).filter(|key| {
            let known = svc.contains_key(key.as_str());
            if !known {
                d.push(
                    Severity::Warning,
                    &format!("{p}[{k}]"),
                    format!(
                        "Service {key} does not exist: requests sent to it get 500 until it does"
                    ),
                );
            }
            known
        });
        let weight = b.weight.unwrap_or(1);
        total += weight as u64;
        let (request, response) = gw_header_ops(&b.filters);
        dests.push(Dest {
            backend: backend.map(|k| Target {
                service: k.into(),
                port: b.port,
                subset: None,
            }),
            weight,
            request,
            response,
        });
    }
    (dests, total)
}

/// The rule's timeouts and mirrors (mirror backends resolved to Services).
fn rule_policy(
    timeouts: Option<&gw::Timeouts>,
    filters: &[gw::Filter],
    p: &str,
    ns: &str,
    svc: &Services<'_>,
    d: &mut Diags,
) -> (Arc<RoutePolicy>, Vec<(Target, f64)>) {
    // validate_gateway already reported this rule's own problems into `d`.
    let mut scratch = Diags::new("", "", "");
    let RulePolicy {
        mut policy,
        mirrors,
    } = resilience_gateway::rule_policy(timeouts, filters, p, &mut scratch);
    let mut targets = Vec::new();
    for (b, percent, fp) in mirrors {
        let Some(key) = backend_key(b, ns) else {
            continue;
        };
        if !svc.contains_key(key.as_str()) {
            d.push(
                Severity::Warning,
                &fp,
                format!("Service {key} does not exist: nothing is mirrored until it does"),
            );
            continue;
        }
        let target = Target {
            service: key.into(),
            port: b.port,
            subset: None,
        };
        targets.push((target, percent));
    }
    let later = place_mirrors(targets, svc, &mut policy);
    (Arc::new(policy), later)
}

/// A compiled Gateway API match with its precedence rank (3 exact, 2 prefix, 1 regex) and
/// path length.
type RankedMatch = (Match, u8, usize);

/// A rule without matches matches everything, as a `PathPrefix /` match ranks (Gateway API).
fn or_match_all(mut matches: Vec<RankedMatch>) -> Vec<RankedMatch> {
    if matches.is_empty() {
        matches.push((
            Match {
                path: Some(PathCond::Gateway(PathMatch::prefix("/"))),
                ..Match::default()
            },
            2,
            1,
        ));
    }
    matches
}

fn http_rules(
    r: &gw::HttpRoute,
    resource: &Arc<str>,
    ns: &str,
    svc: &Services<'_>,
    d: &mut Diags,
) -> Vec<(Arc<Rule>, Vec<RankedMatch>)> {
    let mut out = Vec::new();
    for (i, rule) in r.rules.iter().enumerate() {
        let matches = or_match_all(rule.matches.iter().map(http_match).collect());
        let p = format!("spec.rules[{i}]");
        let (policy, mirror_at_request_port) =
            rule_policy(rule.timeouts.as_ref(), &rule.filters, &p, ns, svc, d);
        let (request, response) = gw_header_ops(&rule.filters);
        let redirect = rule.filters.iter().find_map(|f| {
            f.request_redirect
                .as_ref()
                .filter(|_| f.kind == "RequestRedirect")
        });
        let rewrite = rule
            .filters
            .iter()
            .find_map(|f| f.url_rewrite.as_ref().filter(|_| f.kind == "URLRewrite"));
        let action = match redirect {
            Some(rr) => Action::Redirect(Redirect {
                scheme: rr.scheme.clone(),
                host: rr.hostname.clone(),
                port: match (rr.port, &rr.scheme) {
                    (Some(p), _) => RedirectPort::Explicit(p),
                    (None, Some(_)) => RedirectPort::SchemeDefault,
                    (None, None) => RedirectPort::Listener,
                },
                path: rr.path.as_ref().and_then(gw_path),
                status: rr.status_code.unwrap_or(302),
            }),
            None => {
                let (dests, total) = gw_dests(
                    &rule.backend_refs,
                    &format!("spec.rules[{i}].backendRefs"),
                    ns,
                    svc,
                    d,
                );
                Action::Forward {
                    dests,
                    total,
                    path: rewrite.and_then(|rw| rw.path.as_ref()).and_then(gw_path),
                    authority: rewrite.and_then(|rw| rw.hostname.clone()),
                }
            }
        };
        let name = match &rule.name {
            Some(n) => format!("{resource}#{n}"),
            None => format!("{resource}#{i}"),
        };
        let rule = Rule {
            resource: Arc::clone(resource),
            name: name.into(),
            matches: Vec::new(),
            action,
            request,
            response,
            policy,
            mirror_at_request_port,
        };
        out.push((Arc::new(rule), matches));
    }
    out
}

fn gw_path(m: &gw::PathModifier) -> Option<PathRewrite> {
    match m.kind.as_str() {
        "ReplaceFullPath" => m.replace_full_path.clone().map(PathRewrite::Full),
        "ReplacePrefixMatch" => m.replace_prefix_match.clone().map(PathRewrite::Prefix),
        _ => None,
    }
}

fn typed(list: &[gw::TypedMatch], lower: bool) -> Vec<(String, StrMatch)> {
    list.iter()
        .map(|t| {
            let name = if lower {
                t.name.to_ascii_lowercase()
            } else {
                t.name.clone()
            };
            let m = match t.kind.as_deref() {
                Some("RegularExpression") => regex_or_never(&t.value),
                _ => StrMatch::Exact(t.value.clone()),
            };
            (name, m)
        })
        .collect()
}

fn regex_or_never(pattern: &str) -> StrMatch {
    StrMatch::Regex(
        full_regex(pattern).unwrap_or_else(|_| regex::Regex::new("$.^").expect("constant regex")),
    )
}

fn http_match(m: &gw::HttpMatch) -> RankedMatch {
    let path = m.path.clone().unwrap_or_default();
    let value = path.value.as_deref().unwrap_or("/");
    let (pm, rank) = match path.kind.as_deref().unwrap_or("PathPrefix") {
        "Exact" => (PathMatch::Exact(value.to_string()), 3),
        "RegularExpression" => (
            match regex_or_never(value) {
                StrMatch::Regex(re) => PathMatch::Regex(re),
                _ => PathMatch::Exact(String::new()),
            },
            1,
        ),
        _ => (PathMatch::prefix(value), 2),
    };
    let m = Match {
        path: Some(PathCond::Gateway(pm)),
        method: m.method.clone().map(StrMatch::Exact),
        headers: typed(&m.headers, true),
        query: typed(&m.query_params, false),
        ..Match::default()
    };
    (m, rank, value.len())
}

fn grpc_rules(
    r: &gw::GrpcRoute,
    resource: &Arc<str>,
    ns: &str,
    svc: &Services<'_>,
    d: &mut Diags,
) -> Vec<(Arc<Rule>, Vec<RankedMatch>)> {
    let mut out = Vec::new();
    for (i, rule) in r.rules.iter().enumerate() {
        let matches = or_match_all(rule.matches.iter().map(grpc_match).collect());
        let p = format!("spec.rules[{i}]");
        let (policy, mirror_at_request_port) = rule_policy(None, &rule.filters, &p, ns, svc, d);
        let (request, response) = gw_header_ops(&rule.filters);
        let (dests, total) = gw_dests(
            &rule.backend_refs,
            &format!("spec.rules[{i}].backendRefs"),
            ns,
            svc,
            d,
        );
        let name = match &rule.name {
            Some(n) => format!("{resource}#{n}"),
            None => format!("{resource}#{i}"),
        };
        let action = Action::Forward {
            dests,
            total,
            path: None,
            authority: None,
        };
        let rule = Rule {
            resource: Arc::clone(resource),
            name: name.into(),
            matches: Vec::new(),
            action,
            request,
            response,
            policy,
            mirror_at_request_port,
        };
        out.push((Arc::new(rule), matches));
    }
    out
}

/// gRPC calls are `POST /<service>/<method>`.
fn grpc_match(m: &gw::GrpcMatch) -> RankedMatch {
    let (path, rank, len) = match &m.method {
        None => (PathMatch::prefix("/"), 2, 1),
        Some(mm) if mm.kind.as_deref() == Some("RegularExpression") => {
            let s = mm.service.as_deref().unwrap_or("[^/]+");
            let me = mm.method.as_deref().unwrap_or("[^/]+");
            match regex_or_never(&format!("/(?:{s})/(?:{me})")) {
                StrMatch::Regex(re) => (PathMatch::Regex(re), 1, 0),
                _ => (PathMatch::Exact(String::new()), 1, 0),
            }
        }
        Some(mm) => match (&mm.service, &mm.method) {
            (Some(s), Some(me)) => {
                let p = format!("/{s}/{me}");
                let n = p.len();
                (PathMatch::Exact(p), 3, n)
            }
            (Some(s), None) => (PathMatch::prefix(&format!("/{s}")), 2, s.len() + 1),
            (None, Some(me)) => match regex_or_never(&format!("/[^/]+/{}", regex::escape(me))) {
                StrMatch::Regex(re) => (PathMatch::Regex(re), 1, 0),
                _ => (PathMatch::Exact(String::new()), 1, 0),
            },
            (None, None) => (PathMatch::prefix("/"), 2, 1),
        },
    };
    let m = Match {
        path: Some(PathCond::Gateway(path)),
        headers: typed(&m.headers, true),
        ..Match::default()
    };
    (m, rank, len)
}
