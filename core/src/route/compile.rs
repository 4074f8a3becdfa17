//! Building a [`RouteTable`] from every route resource and the known Services: resolves hosts
//! and parentRefs to Services, checks destinations and subsets against them, orders Gateway API
//! matches by precedence, settles conflicts (oldest resource wins; Gateway API routes beat a
//! VirtualService on the same Service) and reports each as a [`Diagnostic`].
//!
//! Owns the compiled form (consumed by `decide`); a resource with an Error is left out whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use serde_json::Value;

use super::decide::Backend;
use super::lb::LbPolicy;
use super::matcher::{PathMatch, StrMatch};
use super::resilience::{DestinationPolicy, Mirror, RoutePolicy};
use super::resilience_dr::DrPolicies;
use super::rewrite::{HeaderOps, PathRewrite, Redirect};
use super::spec_istio as istio;
use super::validate::{Parsed, parse};
use super::{Diagnostic, Diags, Kind, Severity, compile_gateway, compile_istio};

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

impl From<&crate::proto::config::Service> for ServiceInfo {
    /// The Service as the config stream carries it (meshd and the waypoint both compile from
    /// it). A port that is not a TCP port number is left out.
    fn from(s: &crate::proto::config::Service) -> ServiceInfo {
        ServiceInfo {
            key: s.key.clone(),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: s.hostname.clone(),
            ports: s
                .ports
                .iter()
                .filter_map(|p| {
                    Some(PortInfo {
                        port: u16::try_from(p.port).ok()?,
                        name: p.name.clone(),
                        app_protocol: p.app_protocol.clone(),
                    })
                })
                .collect(),
        }
    }
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

/// Istio's defaults, shared by every destination without a DestinationRule.
static DEFAULT_DESTINATION: LazyLock<Arc<DestinationPolicy>> =
    LazyLock::new(|| Arc::new(DestinationPolicy::default()));

/// The compiled routes of every Service; cheap to clone.
#[derive(Clone, Default)]
pub struct RouteTable {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Default)]
pub(crate) struct Inner {
    /// Service key → the key shared (no allocation per default-routed request) and its ports.
    pub services: HashMap<String, (Arc<str>, Vec<u16>)>,
    pub vs: HashMap<String, Arc<VsRoutes>>,
    /// Service key → Gateway API match entries, in precedence order.
    pub gw: HashMap<String, Vec<GwEntry>>,
    pub dr: HashMap<String, Arc<istio::DestinationRule>>,
    /// Service key → its DestinationRule's pools and outlier detection, per subset and port.
    pub dest_policy: HashMap<String, DrPolicies>,
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
    /// Timeouts, retries, fault, and the mirrors whose port is known at compile time.
    pub policy: Arc<RoutePolicy>,
    /// Mirrors without a port on a multi-port Service: they use the request's port (Istio),
    /// so `decide` adds them per request.
    pub mirror_at_request_port: Vec<(Target, f64)>,
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
#[derive(Clone)]
pub(crate) struct Target {
    pub service: Arc<str>,
    pub port: Option<u16>,
    pub subset: Option<Arc<str>>,
}

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
    pub(super) order: super::compile_gateway::Precedence,
}

pub(crate) struct TcpRule {
    pub ports: Vec<u16>,
    pub dests: Vec<Dest>,
    pub total: u64,
}

/// Puts the mirrors whose port is known now (set, or the Service's only port) into `policy`;
/// returns the others, which take the request's port.
pub(super) fn place_mirrors(
    targets: Vec<(Target, f64)>,
    svc: &Services<'_>,
    policy: &mut RoutePolicy,
) -> Vec<(Target, f64)> {
    let mut later = Vec::new();
    for (t, percent) in targets {
        let only = svc
            .get(t.service.as_ref())
            .and_then(|s| match s.ports.as_slice() {
                [one] => Some(one.port),
                _ => None,
            });
        match t.port.or(only) {
            Some(port) => policy.mirrors.push(Mirror {
                backend: Backend {
                    service: t.service,
                    port,
                    subset: t.subset,
                },
                percent,
            }),
            None => later.push((t, percent)),
        }
    }
    later
}

/// One resource on its way through compilation.
pub(super) struct Item<'r, 'a> {
    pub r: &'r RouteResourceRef<'a>,
    pub parsed: Option<Parsed>,
    pub d: Diags,
}

/// The Services by key.
pub(super) type Services<'a> = HashMap<&'a str, &'a ServiceInfo>;

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
            .map(|s| {
                let ports = s.ports.iter().map(|p| p.port).collect();
                (s.key.clone(), (Arc::from(s.key.as_str()), ports))
            })
            .collect(),
        ..Inner::default()
    };
    let svc: HashMap<&str, &ServiceInfo> = services.iter().map(|s| (s.key.as_str(), s)).collect();
    let mut order: Vec<&RouteResourceRef<'_>> = resources.iter().collect();
    order.sort_by_key(|r| (r.generation_order, r.namespace, r.name, r.kind));

    let mut parsed: Vec<Item<'_, '_>> = Vec::new();
    for r in order {
        let mut d = Diags::new(r.kind, r.namespace, r.name);
        let p = match Kind::parse(r.kind) {
            Some(k) => parse(k, r.spec, &mut d),
            None => {
                d.error("kind", "not a route kind");
                None
            }
        };
        parsed.push(Item { r, parsed: p, d });
    }

    // DestinationRules first: VirtualServices check subsets against them.
    compile_istio::destination_rules(&mut parsed, &svc, cluster_domain, &mut inner);
    let vs_owner = compile_istio::virtual_services(&mut parsed, &svc, cluster_domain, &mut inner);
    let gw_owner = compile_gateway::routes(&mut parsed, &svc, &mut inner);
    for entries in inner.gw.values_mut() {
        entries.sort_by(|a, b| a.order.cmp(&b.order));
    }
    // Gateway API routes win over a VirtualService on the same Service: say so on the VS.
    for Item { r, parsed: p, d } in parsed.iter_mut() {
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
    let diags = parsed.into_iter().flat_map(|i| i.d.list).collect();
    (
        RouteTable {
            inner: Arc::new(inner),
        },
        diags,
    )
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

    /// Connection-pool limits and outlier detection for a destination (service, service
    /// port, subset): DestinationRule `trafficPolicy`, then `portLevelSettings`, then the
    /// subset's. Istio's defaults when no DestinationRule says otherwise.
    pub fn destination_policy(
        &self,
        service: &str,
        port: u16,
        subset: Option<&str>,
    ) -> Arc<DestinationPolicy> {
        self.inner
            .dest_policy
            .get(service)
            .and_then(|p| p.get(port, subset))
            .unwrap_or_else(|| Arc::clone(&DEFAULT_DESTINATION))
    }
}
