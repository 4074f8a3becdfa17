//! The route decision for a request or connection: today the default route only (send to the
//! destination itself, same port), behind the shape `meshcore::route`'s `RouteTable` will fill
//! (forward with header operations and rewrites, redirect, direct response, not found).
//!
//! Owns the [`Router`] in force (recompiled when the config's route generation changes, the
//! last good one kept) and the decision types the pipeline matches on. Does not pick endpoints
//! or send anything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::dest::Target;

/// Where a forwarded request or connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A Service (`ns/name`) port, optionally a DestinationRule subset of it.
    Service {
        service: String,
        port: u16,
        subset: Option<String>,
    },
    /// One workload (`ns/name` uid) and port: pod-addressed traffic.
    Workload { uid: String, port: u16 },
    /// A fixed address reached over plain TCP (the plain-HTTP listener).
    Address(SocketAddr),
}

/// Header set/add/remove, applied in that order (Istio's and Gateway API's order).
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (k, v) in &self.set {
            headers.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            headers.append(k.clone(), v.clone());
        }
        for k in &self.remove {
            headers.remove(k);
        }
    }
}

/// What routing may look at in a request.
pub struct RequestInfo<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub headers: &'a HeaderMap,
    /// `Host` / `:authority`.
    pub authority: &'a str,
}

/// A forward decision.
#[derive(Clone, Debug)]
pub struct Forward {
    pub backend: Backend,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// New path (already computed for this request), if rewritten.
    pub rewrite_path: Option<String>,
    /// New authority, if rewritten.
    pub rewrite_authority: Option<String>,
    /// For logs: which route matched (`default` for the default route).
    pub route_name: String,
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
    NotFound,
}

/// The compiled routes in force. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Router {
    /// The route generation this was compiled from.
    pub generation: u64,
    inner: Arc<Compiled>,
}

#[derive(Debug, Default)]
struct Compiled {
    /// DestinationRule subsets: (service key, subset) → labels.
    subsets: BTreeMap<(String, String), BTreeMap<String, String>>,
}

impl Router {
    /// The routes of route generation `generation` (the default route only, for now).
    pub fn compile(generation: u64) -> Router {
        Router {
            generation,
            inner: Arc::default(),
        }
    }

    /// What the default route does for `target`: its own service (or pod), same port.
    fn default_backend(target: &Target) -> Backend {
        match target {
            Target::Service { service, port } => Backend::Service {
                service: service.key.clone(),
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
    pub fn http(&self, target: &Target, _req: &RequestInfo<'_>) -> HttpDecision {
        HttpDecision::Forward(Box::new(Forward {
            backend: Self::default_backend(target),
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
            rewrite_path: None,
            rewrite_authority: None,
            route_name: "default".to_string(),
        }))
    }

    /// The decision for a TCP connection to `target`.
    pub fn tcp(&self, target: &Target) -> TcpDecision {
        TcpDecision::Forward(Self::default_backend(target))
    }

    /// The pod labels a subset of `service` selects.
    pub fn subset_labels(&self, service: &str, subset: &str) -> Option<&BTreeMap<String, String>> {
        self.inner
            .subsets
            .get(&(service.to_string(), subset.to_string()))
    }

    /// What `/config_dump` shows about the routes.
    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({"generation": self.generation, "engine": "default-route", "diagnostics": []})
    }
}
