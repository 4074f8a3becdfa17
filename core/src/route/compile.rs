//! Building a [`RouteTable`] from every route resource and the known Services: resolves hosts
//! and parentRefs to Services, checks destinations and subsets against them, orders Gateway API
//! matches by precedence, settles conflicts (oldest resource wins; Gateway API routes beat a
//! VirtualService on the same Service) and reports each as a [`Diagnostic`].
//!
//! Owns the compiled form (consumed by `decide`); a resource with an Error is left out whole.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use super::hosts::{backend_key, host_to_key};
use super::lb::LbPolicy;
use super::matcher::{PathMatch, StrMatch, full_regex};
use super::rewrite::{HeaderOps, PathRewrite, Redirect, RedirectPort, re2_replacement};
use super::spec_gateway as gw;
use super::spec_istio as istio;
use super::validate::{Parsed, is_service_ref, parse};
use super::{Diagnostic, Diags, Kind, Severity};

/// A Service as the route engine needs it.
#[derive(Debug, Clone, Default)]
pub struct ServiceInfo {
    /// `ns/name`.
    pub key: String,
    pub name: String,
    pub namespace: String,
    /// FQDN, `name.ns.svc.<cluster domain>`.
    pub hostname: String,
    pub ports: Vec<PortInfo>,
}

#[derive(Debug, Clone, Default)]
pub struct PortInfo {
    pub port: u16,
    pub name: String,
    pub app_protocol: String,
}

/// One route resource as stored (meshd's `RouteResource`, with its spec parsed as JSON).
#[derive(Debug, Clone, Copy)]
pub struct RouteResourceRef<'a> {
    /// `VirtualService`, `DestinationRule`, `HTTPRoute`, `GRPCRoute`.
    pub kind: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub spec: &'a Value,
    /// Older is smaller: Gateway API's tie-break, and who wins a conflict.
    pub generation_order: i64,
}

/// The compiled routes of every Service; cheap to clone.
#[derive(Clone, Default)]
pub struct RouteTable {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Default)]
pub(crate) struct Inner {
    /// Service key → its port numbers.
    pub services: HashMap<String, Vec<u16>>,
    pub vs: HashMap<String, Arc<VsRoutes>>,
    /// Service key → Gateway API match entries, in precedence order.
    pub gw: HashMap<String, Vec<GwEntry>>,
    pub dr: HashMap<String, Arc<istio::DestinationRule>>,
}

pub(crate) struct VsRoutes {
    pub http: Vec<Rule>,
    pub tcp: Vec<TcpRule>,
}

/// A rule: its matches (OR-ed; empty matches everything) and what it does.
pub(crate) struct Rule {
    pub resource: Arc<str>,
    pub name: Arc<str>,
    pub matches: Vec<Match>,
    pub action: Action,
    pub request: Arc<HeaderOps>,
    pub response: Arc<HeaderOps>,
}

pub(crate) enum Action {
    Forward {
        dests: Vec<Dest>,
        total: u64,
        path: Option<PathRewrite>,
        authority: Option<String>,
    },
    Redirect(Redirect),
    Direct {
        status: u16,
        body: String,
    },
    /// Istio `delegate` (not implemented): never matches.
    Never,
}

pub(crate) struct Dest {
    /// `None`: a Gateway API backend that is not a known Service (its share gets 500).
    pub backend: Option<Target>,
    pub weight: u32,
    pub request: Arc<HeaderOps>,
    pub response: Arc<HeaderOps>,
}

/// A destination Service; `port` unset means "as Istio picks" (decided per request).
pub(crate) struct Target {
    pub service: Arc<str>,
    pub port: Option<u16>,
    pub subset: Option<Arc<str>>,
}

/// Gateway API precedence, smaller first: path kind (exact > prefix > regex), path length,
/// method, header count, query count, route age, route `ns/name`, rule index, match index.
type Precedence = (
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

/// One match (all set fields must hold).
#[derive(Debug, Clone, Default)]
pub(crate) struct Match {
    pub path: Option<PathCond>,
    pub scheme: Option<StrMatch>,
    pub method: Option<StrMatch>,
    pub authority: Option<StrMatch>,
    pub headers: Vec<(String, StrMatch)>,
    pub without_headers: Vec<(String, StrMatch)>,
    pub query: Vec<(String, StrMatch)>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone)]
pub(crate) enum PathCond {
    Istio(StrMatch),
    Gateway(PathMatch),
}

/// One Gateway API match of one rule, attached to one Service.
pub(crate) struct GwEntry {
    /// `Some(ns)`: a consumer route, for clients in `ns` only.
    pub consumer_ns: Option<String>,
    /// The parentRef's port, if it names one.
    pub port: Option<u16>,
    pub m: Match,
    pub rule: Arc<Rule>,
    order: Precedence,
}

pub(crate) struct TcpRule {
    pub ports: Vec<u16>,
    pub dests: Vec<Dest>,
    pub total: u64,
}

/// Compiles every resource against the known Services. Diagnostics cover every resource; those
/// with an Error are left out of the table.
pub fn compile(
    resources: &[RouteResourceRef<'_>],
    services: &[ServiceInfo],
    cluster_domain: &str,
) -> (RouteTable, Vec<Diagnostic>) {
    let mut inner = Inner {
        services: services
            .iter()
            .map(|s| (s.key.clone(), s.ports.iter().map(|p| p.port).collect()))
            .collect(),
        ..Inner::default()
    };
    let svc: HashMap<&str, &ServiceInfo> = services.iter().map(|s| (s.key.as_str(), s)).collect();
    let mut order: Vec<&RouteResourceRef<'_>> = resources.iter().collect();
    order.sort_by_key(|r| (r.generation_order, r.namespace, r.name, r.kind));

    let mut parsed = Vec::new();
    for r in order {
        let mut d = Diags::new(r.kind, r.namespace, r.name);
        let p = match Kind::parse(r.kind) {
            Some(k) => parse(k, r.spec, &mut d),
            None => {
                d.error("kind", "not a route kind");
                None
            }
        };
        parsed.push((r, p, d));
    }

    // DestinationRules first: VirtualServices check subsets against them.
    for (r, p, d) in parsed.iter_mut() {
        let Some(Parsed::DestinationRule(dr)) = p else {
            continue;
        };
        match host_to_key(&dr.host, r.namespace, cluster_domain).filter(|k| svc.contains_key(k.as_str())) {
            None => d.error("spec.host", format!("{:?} names no known Service: use name, name.namespace or the FQDN of a Service", dr.host)),
            Some(k) if inner.dr.contains_key(&k) => d.push(
                Severity::Conflict,
                "spec.host",
                format!("an older DestinationRule already applies to {k}: this one is ignored"),
            ),
            Some(k) => {
                inner.dr.insert(k, Arc::new(dr.clone()));
            }
        }
    }
    let mut vs_owner: HashMap<String, String> = HashMap::new();
    for (r, p, d) in parsed.iter_mut() {
        let Some(Parsed::VirtualService(vs)) = p else {
            continue;
        };
        let resource: Arc<str> = format!("VirtualService {}/{}", r.namespace, r.name).into();
        let ctx = Ctx {
            ns: r.namespace,
            domain: cluster_domain,
            svc: &svc,
            dr: &inner.dr,
        };
        let mut hosts = Vec::new();
        for (i, h) in vs.hosts.iter().enumerate() {
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
        if hosts.is_empty() {
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
    let mut gw_owner: HashMap<String, String> = HashMap::new();
    for (r, p, d) in parsed.iter_mut() {
        let kind = match p {
            Some(Parsed::HttpRoute(_)) => "HTTPRoute",
            Some(Parsed::GrpcRoute(_)) => "GRPCRoute",
            _ => continue,
        };
        let resource: Arc<str> = format!("{kind} {}/{}", r.namespace, r.name).into();
        let (rules, refs) = match p {
            Some(Parsed::HttpRoute(h)) => (
                http_rules(h, &resource, r.namespace, &svc, d),
                &h.parent_refs,
            ),
            Some(Parsed::GrpcRoute(g)) => (
                grpc_rules(g, &resource, r.namespace, &svc, d),
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
            gw_owner
                .entry(key.clone())
                .or_insert_with(|| resource.to_string());
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
    // Gateway API routes win over a VirtualService on the same Service: say so on the VS.
    for (r, p, d) in parsed.iter_mut() {
        let Some(Parsed::VirtualService(_)) = p else {
            continue;
        };
        let me = format!("VirtualService {}/{}", r.namespace, r.name);
        for (k, owner) in &vs_owner {
            if *owner == me
                && let Some(route) = gw_owner.get(k)
            {
                d.push(
                    Severity::Conflict,
                    "spec.http",
                    format!("{route} also routes {k}: Gateway API routes take precedence, this VirtualService's http routes are not used for it"),
                );
            }
        }
    }
    let diags = parsed.into_iter().flat_map(|(_, _, d)| d.list).collect();
    (
        RouteTable {
            inner: Arc::new(inner),
        },
        diags,
    )
}

struct Ctx<'a> {
    ns: &'a str,
    domain: &'a str,
    svc: &'a HashMap<&'a str, &'a ServiceInfo>,
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
                (None, Some(rr)) => regex::Regex::new(&rr.pattern)
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
        http.push(Rule {
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
        let fp = format!("{p}[{k}].destination");
        let host = &r.destination.host;
        let Some(key) =
            host_to_key(host, ctx.ns, ctx.domain).filter(|k| ctx.svc.contains_key(k.as_str()))
        else {
            d.error(&format!("{fp}.host"), format!("{host:?} names no known Service: use name, name.namespace or the FQDN of a Service"));
            continue;
        };
        if let Some(subset) = &r.destination.subset {
            match ctx.dr.get(&key) {
                None => d.error(&format!("{fp}.subset"), format!("no DestinationRule defines subsets for {key}: add one with subset {subset:?}")),
                Some(dr) if !dr.subsets.iter().any(|s| &s.name == subset) => d.error(
                    &format!("{fp}.subset"),
                    format!("the DestinationRule for {key} has no subset {subset:?} (it has: {})", dr.subsets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")),
                ),
                Some(_) => {}
            }
        }
        if let Some(port) = &r.destination.port
            && let Some(s) = ctx.svc.get(key.as_str())
            && !s.ports.iter().any(|sp| sp.port as u32 == port.number)
        {
            d.error(
                &format!("{fp}.port.number"),
                format!("Service {key} has no port {}", port.number),
            );
        }
        // One destination gets everything, whatever its weight (Istio).
        let weight = if single {
            1
        } else {
            r.weight.unwrap_or(0).max(0) as u32
        };
        total += weight as u64;
        let h = r.headers.as_ref();
        dests.push(Dest {
            backend: Some(Target {
                service: key.into(),
                port: r.destination.port.as_ref().map(|p| p.number as u16),
                subset: r.destination.subset.clone().map(Into::into),
            }),
            weight,
            request: ops(h.and_then(|h| h.request.as_ref())),
            response: ops(h.and_then(|h| h.response.as_ref())),
        });
    }
    (dests, total)
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
    svc: &HashMap<&str, &ServiceInfo>,
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

/// A compiled Gateway API match with its precedence rank (3 exact, 2 prefix, 1 regex) and
/// path length.
type RankedMatch = (Match, u8, usize);

fn http_rules(
    r: &gw::HttpRoute,
    resource: &Arc<str>,
    ns: &str,
    svc: &HashMap<&str, &ServiceInfo>,
    d: &mut Diags,
) -> Vec<(Arc<Rule>, Vec<RankedMatch>)> {
    let mut out = Vec::new();
    for (i, rule) in r.rules.iter().enumerate() {
        let mut matches: Vec<RankedMatch> = rule.matches.iter().map(http_match).collect();
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
    svc: &HashMap<&str, &ServiceInfo>,
    d: &mut Diags,
) -> Vec<(Arc<Rule>, Vec<RankedMatch>)> {
    let mut out = Vec::new();
    for (i, rule) in r.rules.iter().enumerate() {
        let mut matches: Vec<RankedMatch> = rule.matches.iter().map(grpc_match).collect();
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

impl RouteTable {
    /// The labels that select a subset's pods (`None`: no such subset).
    pub fn subset_labels(&self, service: &str, subset: &str) -> Option<&BTreeMap<String, String>> {
        let dr = self.inner.dr.get(service)?;
        dr.subsets
            .iter()
            .find(|s| s.name == subset)
            .map(|s| &s.labels)
    }

    /// The load-balancing policy for a destination (service, service port, subset).
    pub fn lb_policy(&self, service: &str, port: u16, subset: Option<&str>) -> LbPolicy {
        let Some(dr) = self.inner.dr.get(service) else {
            return LbPolicy::default();
        };
        let sub = subset
            .and_then(|name| dr.subsets.iter().find(|s| s.name == name))
            .and_then(|s| s.traffic_policy.as_ref());
        LbPolicy::resolve(dr.traffic_policy.as_ref(), sub, port)
    }
}
