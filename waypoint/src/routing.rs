//! The route decision for a request or connection, from `meshcore::route`'s compiled
//! [`RouteTable`] (VirtualService, DestinationRule, HTTPRoute, GRPCRoute).
//!
//! Owns the [`Router`] in force — compiled from the config's route resources and services, and
//! recompiled only when the config's route generation changes — and the translation of a
//! destination (Service, pod, fixed address) into the engine's questions and answers. Pod- and
//! address-targeted traffic takes the default route (to itself). Does not pick endpoints or
//! send anything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use meshcore::route::lb::LbPolicy;
use meshcore::route::{
    self, DestinationPolicy, Diagnostic, HeaderEdits, HttpRequestInfo, RoutePolicy,
    RouteResourceRef, RouteTable, ServiceInfo, Severity,
};
use meshcore::store::ConfigStore;
use tracing::{info, warn};

use crate::dest::Target;

/// Where a forwarded request or connection goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// A Service (`ns/name`) port, optionally a DestinationRule subset of it.
    Service {
        service: Arc<str>,
        port: u16,
        subset: Option<Arc<str>>,
    },
    /// One workload (`ns/name` uid) and port: pod-addressed traffic.
    Workload { uid: String, port: u16 },
    /// A fixed address reached over plain TCP (the plain-HTTP listener).
    Address(SocketAddr),
}

/// A forward decision.
#[derive(Clone, Debug)]
pub struct Forward {
    pub backend: Backend,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    /// New path and query, if rewritten.
    pub rewrite_path: Option<String>,
    /// New authority, if rewritten.
    pub rewrite_authority: Option<String>,
    /// For logs: which route matched (`default` for the default route).
    pub route_name: Arc<str>,
    /// Timeouts, retries, fault and mirrors of the matched rule (Istio's defaults for the
    /// default route).
    pub policy: Arc<RoutePolicy>,
}

/// What to do with one HTTP request.
#[derive(Clone, Debug)]
pub enum HttpDecision {
    Forward(Box<Forward>),
    Redirect {
        status: StatusCode,
        location: String,
    },
    Direct {
        status: StatusCode,
        body: String,
    },
    NotFound,
}

/// What to do with one TCP connection.
#[derive(Clone, Debug)]
pub enum TcpDecision {
    Forward(Backend),
}

/// What routing may look at in a request.
pub struct RequestInfo<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub headers: &'a HeaderMap,
    /// `Host` / `:authority`.
    pub authority: &'a str,
    /// The client's namespace (from its identity), for consumer routes.
    pub client_namespace: Option<&'a str>,
}

/// The compiled routes in force. Cheap to clone.
#[derive(Clone, Default)]
pub struct Router {
    /// The route generation this was compiled from (`None`: nothing compiled yet).
    pub generation: Option<u64>,
    table: RouteTable,
    diagnostics: Arc<Vec<Diagnostic>>,
}

/// The cluster domain, read off a Service's FQDN (`name.ns.svc.<domain>`).
fn cluster_domain(store: &ConfigStore) -> String {
    store
        .services()
        .find_map(|s| {
            let prefix = format!("{}.{}.svc.", s.name, s.namespace);
            s.hostname.strip_prefix(&prefix).map(str::to_string)
        })
        .unwrap_or_else(|| "cluster.local".to_string())
}

impl Router {
    /// Compiles every route resource in `store` against its services. Resources with errors
    /// are left out (meshd refuses them and keeps their last good version); every finding is
    /// logged and kept for `/config_dump`.
    pub fn compile(store: &ConfigStore) -> Router {
        let services: Vec<ServiceInfo> =
            store.services().map(|s| ServiceInfo::from(&**s)).collect();
        let mut diagnostics = Vec::new();
        let specs: Vec<_> = store
            .routes()
            .filter_map(
                |r| match serde_json::from_str::<serde_json::Value>(&r.spec_json) {
                    Ok(spec) => Some((r.clone(), spec)),
                    Err(e) => {
                        diagnostics.push(Diagnostic {
                            resource: format!("{} {}/{}", r.kind, r.namespace, r.name),
                            field: "spec".to_string(),
                            message: format!("not JSON: {e}"),
                            severity: Severity::Error,
                        });
                        None
                    }
                },
            )
            .collect();
        let refs: Vec<RouteResourceRef<'_>> = specs
            .iter()
            .map(|(r, spec)| RouteResourceRef {
                kind: &r.kind,
                namespace: &r.namespace,
                name: &r.name,
                spec,
                generation_order: r.generation_order,
            })
            .collect();
        let (table, found) = route::compile(&refs, &services, &cluster_domain(store));
        diagnostics.extend(found);
        for d in &diagnostics {
            warn!(diagnostic = %d, "route resource");
        }
        info!(
            generation = store.route_generation,
            resources = refs.len(),
            diagnostics = diagnostics.len(),
            "routes compiled"
        );
        Router {
            generation: Some(store.route_generation),
            table,
            diagnostics: Arc::new(diagnostics),
        }
    }

    /// What the default route does for `target`: its own service (or pod), same port.
    fn default_backend(target: &Target) -> Backend {
        match target {
            Target::Service { service, port } => Backend::Service {
                service: service.key.as_str().into(),
                port: port.port as u16,
                subset: None,
            },
            Target::Workload { workload, port, .. } => Backend::Workload {
                uid: workload.uid.clone(),
                port: *port,
            },
            Target::Address(a) => Backend::Address(*a),
        }
    }

    /// The decision for a request to `target`.
    pub fn http(&self, target: &Target, req: &RequestInfo<'_>) -> HttpDecision {
        let Target::Service { service, port } = target else {
            return HttpDecision::Forward(Box::new(Forward {
                backend: Self::default_backend(target),
                request_headers: HeaderEdits::default(),
                response_headers: HeaderEdits::default(),
                rewrite_path: None,
                rewrite_authority: None,
                route_name: "default".into(),
                policy: Arc::new(RoutePolicy::default()),
            }));
        };
        let path_and_query = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let info = HttpRequestInfo {
            service: &service.key,
            port: port.port as u16,
            method: req.method.as_str(),
            scheme: "http",
            authority: req.authority,
            path_and_query,
            headers: req.headers,
            client_namespace: req.client_namespace,
        };
        match self.table.http(&info) {
            route::HttpDecision::Forward(f) => HttpDecision::Forward(Box::new(Forward {
                backend: Backend::Service {
                    service: f.backend.service,
                    port: f.backend.port,
                    subset: f.backend.subset,
                },
                request_headers: f.request_headers,
                response_headers: f.response_headers,
                rewrite_path: f.path,
                rewrite_authority: f.authority,
                route_name: f.route_name,
                policy: f.policy,
            })),
            route::HttpDecision::Redirect { status, location } => HttpDecision::Redirect {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
                location,
            },
            route::HttpDecision::Direct { status, body } => HttpDecision::Direct {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            },
            route::HttpDecision::NotFound => HttpDecision::NotFound,
        }
    }

    /// The decision for a TCP connection to `target`.
    pub fn tcp(&self, target: &Target) -> TcpDecision {
        match target {
            Target::Service { service, port } => {
                let d = self.table.tcp(&service.key, port.port as u16);
                TcpDecision::Forward(Backend::Service {
                    service: d.backend.service,
                    port: d.backend.port,
                    subset: d.backend.subset,
                })
            }
            _ => TcpDecision::Forward(Self::default_backend(target)),
        }
    }

    /// The pod labels a subset of `service` selects.
    pub fn subset_labels(&self, service: &str, subset: &str) -> Option<&BTreeMap<String, String>> {
        self.table.subset_labels(service, subset)
    }

    /// The load-balancing policy of a destination.
    pub fn lb_policy(&self, service: &str, port: u16, subset: Option<&str>) -> LbPolicy {
        self.table.lb_policy(service, port, subset)
    }

    /// Connection-pool limits and outlier detection for `backend` (DestinationRule; Istio's
    /// defaults for pods and fixed addresses).
    pub fn destination_policy(&self, backend: &Backend) -> Arc<DestinationPolicy> {
        match backend {
            Backend::Service {
                service,
                port,
                subset,
            } => self
                .table
                .destination_policy(service, *port, subset.as_deref()),
            _ => Arc::new(DestinationPolicy::default()),
        }
    }

    /// What `/config_dump` shows about the routes.
    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "generation": self.generation,
            "diagnostics": *self.diagnostics,
        })
    }
}
