//! Authenticating the caller of a gRPC request from its `authorization` metadata: a node (its
//! ztunnel, `node:` token) or a service account (a waypoint, `sa:` token).
//!
//! Owns mapping meshcore's token verdicts to gRPC statuses, and doing so before a request's
//! body is read: [`NodeAuth`] is a tonic interceptor, which runs on the headers before the
//! service decodes anything, so an unauthenticated caller costs no more than its headers. What a
//! principal may then do is each service's decision ([`principal_of`] tells them who it is). A
//! connection that carried a valid token is marked so (`listener` closes the others after a
//! while). In Kubernetes mode a layer in front reviews service-account tokens and hands the
//! interceptor the principal they proved.

use std::sync::Arc;

use meshcore::nodeauth::{AUTH_METADATA, NodeAuthError, NodeAuthority, Principal};
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::{debug, warn};

use crate::listener::ConnAuth;

/// The principal a request's token proved; set in the request's extensions by [`NodeAuth`],
/// or before it by `kube::identity` for a Kubernetes service-account token.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Principal);

/// Interceptor that refuses requests without a valid token (`UNAUTHENTICATED`) and tells the
/// service who called.
#[derive(Clone)]
pub struct NodeAuth {
    auth: Arc<NodeAuthority>,
}

impl NodeAuth {
    pub fn new(auth: Arc<NodeAuthority>) -> Self {
        NodeAuth { auth }
    }
}

impl Interceptor for NodeAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        // Already proved by a Kubernetes token (`kube::identity`, a layer in front of this one:
        // extensions are set only by meshd's own code, never from anything on the wire).
        let principal = match req.extensions().get::<Authenticated>() {
            Some(proved) => proved.0.clone(),
            None => authenticate(&self.auth, &req)?,
        };
        // The connection may live on: it proved a principal (see `listener`).
        if let Some(conn) = req.extensions().get::<ConnAuth>() {
            conn.mark_authenticated();
        }
        req.extensions_mut().insert(Authenticated(principal));
        Ok(req)
    }
}

/// Who [`NodeAuth`] proved for this request. `UNAUTHENTICATED` if the service was served
/// without the interceptor (a wiring mistake must not become an open door).
pub fn principal_of<T>(req: &Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Authenticated>()
        .map(|a| a.0.clone())
        .ok_or_else(|| Status::unauthenticated("request was not authenticated"))
}

/// Who the request's token proves, or `UNAUTHENTICATED` saying how to supply one.
pub fn authenticate<T>(auth: &NodeAuthority, req: &Request<T>) -> Result<Principal, Status> {
    let header = match req.metadata().get(AUTH_METADATA) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| Status::unauthenticated(NodeAuthError::Malformed.to_string()))?,
        ),
    };
    auth.verify_principal(header).map_err(|e| {
        match &e {
            // Only a holder of a once-valid token gets here: worth an operator's attention.
            NodeAuthError::Expired { .. }
            | NodeAuthError::Legacy(_)
            | NodeAuthError::SaExpired { .. } => {
                warn!(error = %e, "refused a token")
            }
            // Anyone can send garbage; logging each would let them fill the disk.
            _ => debug!(error = %e, "refused a request without valid credentials"),
        }
        let how = match &e {
            NodeAuthError::SaMalformed
            | NodeAuthError::SaBadMac { .. }
            | NodeAuthError::SaExpired { .. } => {
                "supply `authorization: Bearer <service-account token>` as printed by `meshd workload-token --namespace <ns> --service-account <sa>`"
            }
            _ => {
                "supply `authorization: Bearer <node token>` as printed by `meshd node-token --node <name>`"
            }
        };
        Status::unauthenticated(format!("{e} ({how})"))
    })
}
