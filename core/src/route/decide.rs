//! The per-request decision: which rule of which resource applies to a request for a Service
//! (consumer Gateway API routes, then producer ones, then a VirtualService, then the default
//! route to the Service itself), and what it does — forward to a weighted choice of
//! destinations (with header edits and rewrites), redirect, answer directly, or 404.
//!
//! Owns the order of evaluation; the comparisons are `matcher`'s, the string surgery `rewrite`'s.

use std::sync::{Arc, LazyLock};

use http::HeaderMap;
use rand::Rng;

use super::compile::{Action, Dest, GwEntry, Match, PathCond, RouteTable, Rule, Target};
use super::lb::LbPolicy;
use super::matcher::{PathMatch, header_value, query_param, split_path};
use super::resilience::{Mirror, RoutePolicy};
use super::rewrite::{HeaderEdits, location, rewrite_path};

/// Names of the default route, shared rather than allocated per request.
static DEFAULT_ROUTE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("default"));
static NO_RESOURCE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));
static DEFAULT_POLICY: LazyLock<Arc<RoutePolicy>> =
    LazyLock::new(|| Arc::new(RoutePolicy::default()));

/// What the waypoint knows about a request when it routes it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequestInfo<'a> {
    /// The Service's key, `ns/name`.
    pub service: &'a str,
    /// The Service port the request came in on.
    pub port: u16,
    pub method: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// The `:authority` / `Host` as sent.
    pub authority: &'a str,
    /// Path and query, as sent (`/a/b?x=1`).
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    /// The client's namespace (from its identity), for consumer routes.
    pub client_namespace: Option<&'a str>,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// `ns/name`.
    pub service: Arc<str>,
    /// A port of that Service.
    pub port: u16,
    /// A DestinationRule subset (pick endpoints with [`RouteTable::subset_labels`]).
    pub subset: Option<Arc<str>>,
}

/// A request to forward, and what to change on the way.
#[derive(Debug, Clone)]
pub struct Forward {
    pub backend: Backend,
    /// The rule that matched: its `name`, or `<resource>#<index>`; `default` for the default route.
    pub route_name: Arc<str>,
    /// `"Kind ns/name"` of the resource, empty for the default route.
    pub resource: Arc<str>,
    /// Apply to the request before forwarding (rule level, then destination level).
    pub request_headers: HeaderEdits,
    /// Apply to the response before returning it.
    pub response_headers: HeaderEdits,
    /// New path and query, if rewritten.
    pub path: Option<String>,
    /// New authority (`Host`), if rewritten.
    pub authority: Option<String>,
    /// Timeouts, retries, fault and mirrors of the rule that matched.
    pub policy: Arc<RoutePolicy>,
}

#[derive(Debug, Clone)]
pub enum HttpDecision {
    Forward(Forward),
    Redirect {
        status: u16,
        location: String,
    },
    /// Answer without forwarding (VirtualService directResponse; 500 when a Gateway API rule
    /// has no usable backend).
    Direct {
        status: u16,
        body: String,
    },
    /// Routes exist for the Service but none matched: answer 404.
    NotFound,
}

/// Where a TCP connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpDecision {
    pub backend: Backend,
}

/// A request with its path split once.
struct Req<'a> {
    info: &'a HttpRequestInfo<'a>,
    path: &'a str,
    query: Option<&'a str>,
}

impl Match {
    fn matches(&self, r: &Req<'_>) -> bool {
        let i = r.info;
        self.port.is_none_or(|p| p == i.port)
            && self.path.as_ref().is_none_or(|p| match p {
                PathCond::Istio(m) => m.matches(r.path),
                PathCond::Gateway(m) => m.matches(r.path),
            })
            && self.scheme.as_ref().is_none_or(|m| m.matches(i.scheme))
            && self.method.as_ref().is_none_or(|m| m.matches(i.method))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| m.matches(i.authority))
            && self
                .headers
                .iter()
                .all(|(name, m)| header_value(i.headers, name).is_some_and(|v| m.matches(&v)))
            && !self
                .without_headers
                .iter()
                .any(|(name, m)| header_value(i.headers, name).is_some_and(|v| m.matches(&v)))
            && self
                .query
                .iter()
                .all(|(name, m)| query_param(r.query, name).is_some_and(|v| m.matches(&v)))
    }

    /// How many leading bytes of the path the match consumed, when it was a prefix match.
    fn matched_prefix(&self) -> Option<usize> {
        match &self.path {
            Some(PathCond::Istio(m)) => m.prefix_len(),
            Some(PathCond::Gateway(PathMatch::Prefix(p))) => Some(p.len()),
            _ => None,
        }
    }
}

impl RouteTable {
    /// Routes one request (weighted choices with the thread-local RNG).
    pub fn http(&self, req: &HttpRequestInfo<'_>) -> HttpDecision {
        self.http_with(req, &mut rand::rng())
    }

    /// Routes one request, drawing weighted choices from `rng`.
    pub fn http_with(&self, req: &HttpRequestInfo<'_>, rng: &mut impl Rng) -> HttpDecision {
        let (path, query) = split_path(req.path_and_query);
        let r = Req {
            info: req,
            path,
            query,
        };
        if let Some(entries) = self.inner.gw.get(req.service) {
            let at_port = |e: &&GwEntry| e.port.is_none_or(|p| p == req.port);
            let mine = |e: &&GwEntry| {
                e.consumer_ns.is_some() && e.consumer_ns.as_deref() == req.client_namespace
            };
            // Consumer routes of the client's namespace replace the producer's for it.
            let consumer = entries.iter().filter(at_port).any(|e| mine(&e));
            let producer = !consumer
                && entries
                    .iter()
                    .filter(at_port)
                    .any(|e| e.consumer_ns.is_none());
            if consumer || producer {
                let applies = |e: &&GwEntry| {
                    if consumer {
                        mine(e)
                    } else {
                        e.consumer_ns.is_none()
                    }
                };
                for e in entries.iter().filter(at_port).filter(applies) {
                    if e.m.matches(&r) {
                        return self.act(&e.rule, &e.m, &r, rng);
                    }
                }
                return HttpDecision::NotFound;
            }
        }
        if let Some(vs) = self.inner.vs.get(req.service)
            && !vs.http.is_empty()
        {
            for rule in &vs.http {
                if matches!(rule.action, Action::Never) {
                    continue;
                }
                if rule.matches.is_empty() {
                    return self.act(rule, &Match::default(), &r, rng);
                }
                if let Some(m) = rule.matches.iter().find(|m| m.matches(&r)) {
                    return self.act(rule, m, &r, rng);
                }
            }
            return HttpDecision::NotFound;
        }
        let service = match self.inner.services.get(req.service) {
            Some((key, _)) => Arc::clone(key),
            None => req.service.into(),
        };
        let backend = Backend {
            service,
            port: req.port,
            subset: None,
        };
        let policy = self.sticky(Arc::clone(&DEFAULT_POLICY), &backend);
        HttpDecision::Forward(Forward {
            backend,
            route_name: Arc::clone(&DEFAULT_ROUTE),
            resource: Arc::clone(&NO_RESOURCE),
            request_headers: HeaderEdits::default(),
            response_headers: HeaderEdits::default(),
            path: None,
            authority: None,
            policy,
        })
    }

    fn act(&self, rule: &Rule, m: &Match, r: &Req<'_>, rng: &mut impl Rng) -> HttpDecision {
        let info = r.info;
        match &rule.action {
            Action::Direct { status, body } => HttpDecision::Direct {
                status: *status,
                body: body.clone(),
            },
            Action::Redirect(red) => HttpDecision::Redirect {
                status: red.status,
                location: location(
                    red,
                    info.scheme,
                    info.authority,
                    info.port,
                    info.path_and_query,
                    m.matched_prefix(),
                ),
            },
            Action::Never => HttpDecision::NotFound,
            Action::Forward {
                dests,
                total,
                path,
                authority,
            } => {
                let Some(dest) = choose(dests, *total, rng) else {
                    return no_backend();
                };
                let Some(target) = &dest.backend else {
                    return no_backend();
                };
                let backend = self.backend(target, info.port);
                let policy = self.sticky(self.policy(rule, info.port), &backend);
                HttpDecision::Forward(Forward {
                    backend,
                    route_name: Arc::clone(&rule.name),
                    resource: Arc::clone(&rule.resource),
                    request_headers: HeaderEdits::of(&[&rule.request, &dest.request]),
                    response_headers: HeaderEdits::of(&[&rule.response, &dest.response]),
                    path: path
                        .as_ref()
                        .map(|rw| rewrite_path(rw, info.path_and_query, m.matched_prefix())),
                    authority: authority.clone(),
                    policy,
                })
            }
        }
    }

    /// The rule's policy, with the mirrors that take the request's port added.
    fn policy(&self, rule: &Rule, request_port: u16) -> Arc<RoutePolicy> {
        if rule.mirror_at_request_port.is_empty() {
            return Arc::clone(&rule.policy);
        }
        let mut p = RoutePolicy::clone(&rule.policy);
        p.mirrors.extend(
            rule.mirror_at_request_port
                .iter()
                .map(|(t, percent)| Mirror {
                    backend: self.backend(t, request_port),
                    percent: *percent,
                }),
        );
        Arc::new(p)
    }

    /// Istio leaves out the previous-hosts retry predicate when the destination hashes
    /// (consistentHash): a retry goes back to the endpoint the key picks.
    fn sticky(&self, policy: Arc<RoutePolicy>, backend: &Backend) -> Arc<RoutePolicy> {
        if !policy.retry.avoid_previous_hosts || !self.inner.dr.contains_key(&*backend.service) {
            return policy;
        }
        let lb = self.lb_policy(&backend.service, backend.port, backend.subset.as_deref());
        if !matches!(lb, LbPolicy::ConsistentHash(_)) {
            return policy;
        }
        let mut p = RoutePolicy::clone(&policy);
        p.retry.avoid_previous_hosts = false;
        Arc::new(p)
    }

    /// Istio: a destination without a port uses the Service's only port, else the request's.
    fn backend(&self, t: &Target, request_port: u16) -> Backend {
        let port = t.port.unwrap_or_else(|| {
            match self
                .inner
                .services
                .get(t.service.as_ref())
                .map(|(_, ports)| ports.as_slice())
            {
                Some([only]) => *only,
                _ => request_port,
            }
        });
        Backend {
            service: Arc::clone(&t.service),
            port,
            subset: t.subset.clone(),
        }
    }

    /// Routes a TCP connection to `service:port` (VirtualService `tcp` rules; default: itself).
    pub fn tcp(&self, service: &str, port: u16) -> TcpDecision {
        self.tcp_with(service, port, &mut rand::rng())
    }

    pub fn tcp_with(&self, service: &str, port: u16, rng: &mut impl Rng) -> TcpDecision {
        let itself = || TcpDecision {
            backend: Backend {
                service: service.into(),
                port,
                subset: None,
            },
        };
        let Some(vs) = self.inner.vs.get(service) else {
            return itself();
        };
        let Some(rule) = vs
            .tcp
            .iter()
            .find(|r| r.ports.is_empty() || r.ports.contains(&port))
        else {
            return itself();
        };
        match choose(&rule.dests, rule.total, rng).and_then(|d| d.backend.as_ref()) {
            Some(target) => TcpDecision {
                backend: self.backend(target, port),
            },
            None => itself(),
        }
    }
}

/// Gateway API: a rule whose backends are all invalid or weigh 0 answers 500.
fn no_backend() -> HttpDecision {
    HttpDecision::Direct {
        status: 500,
        body: "no valid backend for this route\n".into(),
    }
}

/// A destination with probability weight / total.
fn choose<'a>(dests: &'a [Dest], total: u64, rng: &mut impl Rng) -> Option<&'a Dest> {
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    for d in dests {
        if x < d.weight as u64 {
            return Some(d);
        }
        x -= d.weight as u64;
    }
    None
}
