//! Compiling Istio resources: DestinationRules (indexed by Service, for subsets and load
//! balancing) and VirtualServices (hosts → Services; rules with matches, weighted destinations,
//! rewrites, redirects, direct responses, header edits). Unknown hosts and subsets are Errors.
//!
//! Owns the Istio half of `compile`; the compiled types are `compile`'s.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::compile::{
    Action, Dest, Inner, Item, Match, PathCond, Rule, Services, Target, TcpRule, VsRoutes,
    place_mirrors,
};
use super::hosts::host_to_key;
use super::matcher::{StrMatch, search_regex};
use super::resilience::RoutePolicy;
use super::resilience_dr::DrPolicies;
use super::resilience_istio::{self, RulePolicy};
use super::rewrite::{HeaderOps, PathRewrite, Redirect, RedirectPort, re2_replacement};
use super::spec_istio as istio;
use super::validate::Parsed;
use super::{Diags, Severity};

const WILDCARD: &str =
    "wildcard hosts are not implemented (name one Service per host): this host is ignored";

/// Indexes DestinationRules by the Service they name (the oldest wins).
pub(super) fn destination_rules(
    items: &mut [Item<'_, '_>],
    svc: &Services<'_>,
    cluster_domain: &str,
    inner: &mut Inner,
) {
    for Item { r, parsed: p, d } in items.iter_mut() {
        let Some(Parsed::DestinationRule(dr)) = p else {
            continue;
        };
        if dr.host.contains('*') {
            d.push(Severity::Unsupported, "spec.host", WILDCARD);
            continue;
        }
        match host_to_key(&dr.host, r.namespace, cluster_domain).filter(|k| svc.contains_key(k.as_str())) {
            None => d.error("spec.host", format!("{:?} names no known Service: use name, name.namespace or the FQDN of a Service", dr.host)),
            Some(k) if inner.dr.contains_key(&k) => d.push(
                Severity::Conflict,
                "spec.host",
                format!("an older DestinationRule already applies to {k}: this one is ignored"),
            ),
            Some(k) => {
                inner.dest_policy.insert(k.clone(), DrPolicies::new(dr));
                inner.dr.insert(k, Arc::new(dr.clone()));
            }
        }
    }
}

/// Compiles VirtualServices into `inner.vs` (the oldest wins a host); returns which resource
/// owns each Service.
pub(super) fn virtual_services(
    items: &mut [Item<'_, '_>],
    svc: &Services<'_>,
    cluster_domain: &str,
    inner: &mut Inner,
) -> HashMap<String, String> {
    let mut vs_owner: HashMap<String, String> = HashMap::new();
    for Item { r, parsed: p, d } in items.iter_mut() {
        let Some(Parsed::VirtualService(vs)) = p else {
            continue;
        };
        let resource: Arc<str> = format!("VirtualService {}/{}", r.namespace, r.name).into();
        let ctx = Ctx {
            ns: r.namespace,
            domain: cluster_domain,
            svc,
            dr: &inner.dr,
        };
        let mut hosts = Vec::new();
        let mut wildcards = 0;
        for (i, h) in vs.hosts.iter().enumerate() {
            if h.contains('*') {
                wildcards += 1;
                d.push(Severity::Unsupported, &format!("spec.hosts[{i}]"), WILDCARD);
                continue;
            }
            match host_to_key(h, r.namespace, cluster_domain)
                .filter(|k| svc.contains_key(k.as_str()))
            {
                Some(k) => hosts.push(k),
                None => d.push(
                    Severity::Warning,
                    &format!("spec.hosts[{i}]"),
                    format!("{h:?} names no known Service: ignored"),
                ),
            }
        }
        if hosts.is_empty() && wildcards < vs.hosts.len() {
            d.error(
                "spec.hosts",
                "names no known Service: use name, name.namespace or the FQDN of a Service",
            );
        }
        let routes = vs_routes(vs, &resource, &ctx, d);
        if d.has_errors() {
            continue;
        }
        let routes = Arc::new(routes);
        for k in hosts {
            if let Some(owner) = vs_owner.get(&k) {
                d.push(
                    Severity::Conflict,
                    "spec.hosts",
                    format!("{owner} (older) already routes {k}: this one is ignored for it"),
                );
                continue;
            }
            vs_owner.insert(k.clone(), resource.to_string());
            inner.vs.insert(k, Arc::clone(&routes));
        }
    }
    vs_owner
}

struct Ctx<'a> {
    ns: &'a str,
    domain: &'a str,
    svc: &'a Services<'a>,
    dr: &'a HashMap<String, Arc<istio::DestinationRule>>,
}

fn ops(h: Option<&istio::HeaderOperations>) -> Arc<HeaderOps> {
    Arc::new(match h {
        None => HeaderOps::default(),
        Some(h) => HeaderOps::new(
            h.set.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            h.add.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            h.remove.iter().map(String::as_str),
        ),
    })
}

fn vs_routes(
    vs: &istio::VirtualService,
    resource: &Arc<str>,
    ctx: &Ctx<'_>,
    d: &mut Diags,
) -> VsRoutes {
    let mut http = Vec::new();
    for (i, rule) in vs.http.iter().enumerate() {
        let p = format!("spec.http[{i}]");
        let matches = rule.matches.iter().map(istio_match).collect();
        let headers = rule.headers.as_ref();
        let action = if rule.delegate.is_some() {
            Action::Never
        } else if let Some(dr) = &rule.direct_response {
            let body = dr
                .body
                .as_ref()
                .and_then(|b| b.string.clone())
                .unwrap_or_default();
            Action::Direct {
                status: dr.status as u16,
                body,
            }
        } else if let Some(r) = &rule.redirect {
            Action::Redirect(Redirect {
                scheme: r.scheme.clone(),
                host: r.authority.clone(),
                port: match (r.port, r.derive_port.as_deref()) {
                    (Some(p), _) => RedirectPort::Explicit(p as u16),
                    (None, Some("FROM_REQUEST_PORT")) => RedirectPort::FromRequest,
                    (None, Some(_)) => RedirectPort::SchemeDefault,
                    (None, None) => RedirectPort::AsIs,
                },
                path: r.uri.clone().map(PathRewrite::IstioRedirect),
                status: r.redirect_code.unwrap_or(301) as u16,
            })
        } else {
            let (dests, total) = istio_dests(&rule.route, &format!("{p}.route"), ctx, d);
            let rw = rule.rewrite.as_ref();
            let path = rw.and_then(|rw| match (&rw.uri, &rw.uri_regex_rewrite) {
                (Some(u), _) => Some(PathRewrite::IstioUri(u.clone())),
                (None, Some(rr)) => search_regex(&rr.pattern)
                    .ok()
                    .map(|re| PathRewrite::IstioRegex(re, re2_replacement(&rr.rewrite))),
                (None, None) => None,
            });
            Action::Forward {
                dests,
                total,
                path,
                authority: rw.and_then(|rw| rw.authority.clone()),
            }
        };
        let (policy, mirror_at_request_port) = rule_policy(rule, &p, ctx, d);
        http.push(Rule {
            policy,
            mirror_at_request_port,
            resource: Arc::clone(resource),
            name: rule
                .name
                .clone()
                .unwrap_or_else(|| format!("{resource}#{i}"))
                .into(),
            matches,
            action,
            request: ops(headers.and_then(|h| h.request.as_ref())),
            response: ops(headers.and_then(|h| h.response.as_ref())),
        });
    }
    let mut tcp = Vec::new();
    for (i, rule) in vs.tcp.iter().enumerate() {
        let (dests, total) = istio_dests(&rule.route, &format!("spec.tcp[{i}].route"), ctx, d);
        let ports = rule
            .matches
            .iter()
            .filter_map(|m| m.port.map(|p| p as u16))
            .collect();
        tcp.push(TcpRule {
            ports,
            dests,
            total,
        });
    }
    VsRoutes { http, tcp }
}

fn istio_match(m: &istio::HttpMatch) -> Match {
    let sm = |s: &Option<istio::StringMatch>| s.as_ref().map(|s| StrMatch::istio(s, false));
    let map = |m: &BTreeMap<String, istio::StringMatch>, lower: bool| {
        m.iter()
            .map(|(k, v)| {
                (
                    if lower {
                        k.to_ascii_lowercase()
                    } else {
                        k.clone()
                    },
                    StrMatch::istio(v, false),
                )
            })
            .collect()
    };
    Match {
        path: m
            .uri
            .as_ref()
            .map(|u| PathCond::Istio(StrMatch::istio(u, m.ignore_uri_case))),
        scheme: sm(&m.scheme),
        method: sm(&m.method),
        authority: sm(&m.authority),
        headers: map(&m.headers, true),
        without_headers: map(&m.without_headers, true),
        query: map(&m.query_params, false),
        port: m.port.map(|p| p as u16),
    }
}

fn istio_dests(
    route: &[istio::RouteDestination],
    p: &str,
    ctx: &Ctx<'_>,
    d: &mut Diags,
) -> (Vec<Dest>, u64) {
    let single = route.len() == 1;
    let mut dests = Vec::new();
    let mut total = 0u64;
    for (k, r) in route.iter().enumerate() {
        let Some(target) = istio_target(&r.destination, &format!("{p}[{k}].destination"), ctx, d)
        else {
            continue;
        };
        // One destination gets everything, whatever its weight (Istio).
        let weight = if single {
            1
        } else {
            r.weight.unwrap_or(0).max(0) as u32
        };
        total += weight as u64;
        let h = r.headers.as_ref();
        dests.push(Dest {
            backend: Some(target),
            weight,
            request: ops(h.and_then(|h| h.request.as_ref())),
            response: ops(h.and_then(|h| h.response.as_ref())),
        });
    }
    (dests, total)
}

/// A route or mirror destination (at `fp`) checked against the Services and DestinationRules.
fn istio_target(
    dest: &istio::Destination,
    fp: &str,
    ctx: &Ctx<'_>,
    d: &mut Diags,
) -> Option<Target> {
    let host = &dest.host;
    let Some(key) =
        host_to_key(host, ctx.ns, ctx.domain).filter(|k| ctx.svc.contains_key(k.as_str()))
    else {
        d.error(
            &format!("{fp}.host"),
            format!(
                "{host:?} names no known Service: use name, name.namespace or the FQDN of a Service"
            ),
        );
        return None;
    };
    if let Some(subset) = &dest.subset {
        match ctx.dr.get(&key) {
            None => d.error(
                &format!("{fp}.subset"),
                format!(
                    "no DestinationRule defines subsets for {key}: add one with subset {subset:?}"
                ),
            ),
            Some(dr) if !dr.subsets.iter().any(|s| &s.name == subset) => d.error(
                &format!("{fp}.subset"),
                format!(
                    "the DestinationRule for {key} has no subset {subset:?} (it has: {})",
                    dr.subsets
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Some(_) => {}
        }
    }
    if let Some(port) = &dest.port
        && let Some(s) = ctx.svc.get(key.as_str())
        && !s.ports.iter().any(|sp| sp.port as u32 == port.number)
    {
        d.error(
            &format!("{fp}.port.number"),
            format!("Service {key} has no port {}", port.number),
        );
    }
    Some(Target {
        service: key.into(),
        port: dest.port.as_ref().map(|p| p.number as u16),
        subset: dest.subset.clone().map(Into::into),
    })
}

/// The rule's timeout, retries, fault and mirrors (mirror hosts resolved to Services).
fn rule_policy(
    rule: &istio::HttpRoute,
    p: &str,
    ctx: &Ctx<'_>,
    d: &mut Diags,
) -> (Arc<RoutePolicy>, Vec<(Target, f64)>) {
    // validate_istio already reported this rule's own problems into `d`.
    let mut scratch = Diags::new("", "", "");
    let RulePolicy {
        mut policy,
        mirrors,
    } = resilience_istio::rule_policy(rule, p, &mut scratch);
    let targets = mirrors
        .into_iter()
        .filter_map(|(dest, pct, fp)| Some((istio_target(dest, &fp, ctx, d)?, pct)))
        .collect();
    let later = place_mirrors(targets, ctx.svc, &mut policy);
    (Arc::new(policy), later)
}
