//! L7 access control at the waypoint: RequestAuthentication (JWT) and AuthorizationPolicy
//! attached with `targetRefs` to our Gateway or to a Service bound to it, evaluated per
//! request with the client's identity (from its certificate) and the request's attributes.
//!
//! Owns the per-request verdict and the policy set compiled once per config version; the
//! policy model and its evaluation are meshcore's (one engine for L4 and L7), the keys of
//! `jwksUri`s are `jwks`'s. Does not route or forward.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use http::Request;
use hyper::body::Incoming;
use meshcore::Identity;
use meshcore::policy::jwt::{self, Authn};
use meshcore::policy::{self, DEFAULT_ROOT_NAMESPACE, Decision, PolicySet, WaypointTarget};
use meshcore::store::ConfigStore;
use tracing::{debug, info, warn};

use crate::app::Ctx;
use crate::dest::Target;
use crate::jwks::Jwks;
use crate::pipeline::Downstream;

/// The answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// 403 `RBAC: access denied`; `policy` names the deciding policy for the log.
    Deny {
        policy: String,
    },
    /// 401: a token was presented and failed verification (why, for the log).
    Unauthenticated {
        reason: String,
    },
}

/// The compiled policies (per config version) and the JWKS cache.
pub struct Authz {
    compiled: Mutex<Option<(usize, u64, Arc<PolicySet>)>>,
    pub jwks: Jwks,
}

impl Authz {
    /// Needs a tokio runtime (starts the JWKS refresher, whose HBONE connections go to kernel
    /// TLS if `kernel_tls`).
    pub fn start(
        config: dataplane::subscription::ConfigRx,
        cert: crate::own_cert::OwnCert,
        kernel_tls: bool,
    ) -> Authz {
        Authz {
            compiled: Mutex::new(None),
            jwks: Jwks::start(config, cert, kernel_tls),
        }
    }

    /// The policy set of `store`, compiled on the first request that sees this version.
    fn policies(&self, store: &Arc<ConfigStore>) -> Arc<PolicySet> {
        let id = (Arc::as_ptr(store) as usize, store.version);
        let mut c = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((ptr, version, set)) = c.as_ref()
            && (*ptr, *version) == id
        {
            return set.clone();
        }
        let set = Arc::new(PolicySet::compile(
            store.policies().map(|p| &**p),
            DEFAULT_ROOT_NAMESPACE,
        ));
        for e in set.errors() {
            warn!("policy rejected: {e}");
        }
        *c = Some((id.0, id.1, set.clone()));
        set
    }
}

impl Authz {
    /// For `/config_dump`: the L7 policies that attach to this waypoint (to its Gateway or
    /// any Service), the RequestAuthentications, the rejected policies, and each `jwksUri`'s
    /// state.
    pub fn dump(&self, store: &Arc<ConfigStore>, gateway: &str) -> serde_json::Value {
        let set = self.policies(store);
        let (ns, name) = gateway.split_once('/').unwrap_or(("", gateway));
        let at = WaypointTarget {
            gateway_namespace: ns,
            gateway_name: name,
            service: None,
        };
        let on_gateway: Vec<&str> = set
            .waypoint_authorizations(&at)
            .map(|a| a.key.as_str())
            .collect();
        let jwks: serde_json::Map<String, serde_json::Value> = set
            .jwks_uris()
            .into_iter()
            .map(|u| {
                let state = match self.jwks.get(&u) {
                    Ok(k) => format!("{} key(s)", k.keys.len()),
                    Err(e) => format!("no keys: {e}"),
                };
                (u, state.into())
            })
            .collect();
        serde_json::json!({
            "authorizationPolicies": set.waypoint_policies(),
            "onGateway": on_gateway,
            "requestAuthentications": set.jwt_policies(),
            "jwks": jwks,
            "rejected": set.errors(),
        })
    }
}

/// Decides whether `req` may proceed; may add headers to it (`outputPayloadToHeader`) and
/// remove the verified token (unless `forwardOriginalToken`).
pub fn check(ctx: &Ctx, down: &Downstream, req: &mut Request<Incoming>) -> Verdict {
    let Some((set, at)) = scope(ctx, down) else {
        return Verdict::Allow;
    };
    let rules = set.jwt_rules(&at);
    let claims = if rules.is_empty() {
        None
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let keys = |uri: &str| ctx.authz.jwks.get(uri);
        jwt::strip_outputs(&rules, req.headers_mut());
        match jwt::authenticate(&rules, req.headers(), req.uri().query(), &keys, now) {
            Authn::NoToken => None,
            Authn::Failed(reason) => {
                debug!(client = %down.principal, %reason, "JWT refused");
                return Verdict::Unauthenticated { reason };
            }
            Authn::Verified(v) => {
                v.apply(req.headers_mut());
                Some(v.claims)
            }
        }
    };
    if set.waypoint_authorizations(&at).next().is_none() {
        return Verdict::Allow;
    }
    let conn = connection(down);
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let path = policy::normalize_path(req.uri().path());
    let attrs = policy::Request {
        method: req.method().as_str(),
        host: &host,
        path: &path,
        headers: req.headers(),
        remote_ip: down.addr.ip(),
        // The waypoint does not terminate the application's TLS: there is no SNI to see.
        sni: None,
        auth: claims.as_ref(),
    };
    let verdict = set.authorize_request(&at, &conn, &attrs);
    if !verdict.audited.is_empty() {
        info!(client = %down.principal, method = %attrs.method, path = %attrs.path,
            policies = ?verdict.audited, "request matched AUDIT policies");
    }
    match verdict.decision {
        Decision::Allow => Verdict::Allow,
        Decision::Deny { policy } => Verdict::Deny { policy },
    }
}

/// Decides whether a TCP connection (a TCP port, or bytes that were not HTTP) may proceed:
/// the same AuthorizationPolicies as requests, judged on the connection alone (meshcore's
/// `authorize_connection`). RequestAuthentication has nothing to read here.
pub fn check_connection(ctx: &Ctx, down: &Downstream) -> Verdict {
    let Some((set, at)) = scope(ctx, down) else {
        return Verdict::Allow;
    };
    if set.waypoint_authorizations(&at).next().is_none() {
        return Verdict::Allow;
    }
    let conn = connection(down);
    match set.authorize_connection(&at, &conn).decision {
        Decision::Allow => Verdict::Allow,
        Decision::Deny { policy } => Verdict::Deny { policy },
    }
}

/// The compiled policies and where this connection stands among them; `None` with no config
/// yet or no Gateway (the standalone listener), where nothing attaches.
fn scope<'a>(ctx: &'a Ctx, down: &'a Downstream) -> Option<(Arc<PolicySet>, WaypointTarget<'a>)> {
    let store = ctx.config.borrow().clone()?;
    let (gw_ns, gw_name) = ctx.gateway.split_once('/')?;
    let at = WaypointTarget {
        gateway_namespace: gw_ns,
        gateway_name: gw_name,
        service: match &down.target {
            Target::Service { service, .. } => Some((&service.namespace, &service.name)),
            Target::Workload { .. } | Target::Address(_) => None,
        },
    };
    Some((ctx.authz.policies(&store), at))
}

/// The connection's facts as the policy engine reads them.
fn connection(down: &Downstream) -> policy::Connection {
    let (dst_ip, dst_port) = destination(&down.target);
    policy::Connection {
        src_identity: down.principal.parse::<Identity>().ok().map(Arc::new),
        src_ip: down.addr.ip(),
        dst_ip,
        dst_port,
    }
}

/// `destination.ip` / `destination.port`: the address the client asked for.
fn destination(target: &Target) -> (IpAddr, u16) {
    let unspecified = IpAddr::from([0, 0, 0, 0]);
    match target {
        Target::Service { service, port } => (
            service
                .vips
                .iter()
                .find_map(|v| v.parse().ok())
                .unwrap_or(unspecified),
            port.port as u16,
        ),
        Target::Workload { workload, port, .. } => (
            workload
                .ips
                .iter()
                .find_map(|v| v.parse().ok())
                .unwrap_or(unspecified),
            *port,
        ),
        Target::Address(a) => (a.ip(), a.port()),
    }
}
