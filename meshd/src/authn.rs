//! Authenticating the calling node of a gRPC request from its `authorization` metadata.
//!
//! Owns mapping meshcore's node-token verdicts to gRPC statuses. What a node may then do is
//! each service's decision.

use meshcore::nodeauth::{AUTH_METADATA, NodeAuthError, NodeAuthority};
use tonic::{Request, Status};

/// The node the request's token proves, or `UNAUTHENTICATED` saying how to supply one.
pub fn authenticate<T>(auth: &NodeAuthority, req: &Request<T>) -> Result<String, Status> {
    let header = match req.metadata().get(AUTH_METADATA) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| Status::unauthenticated(NodeAuthError::Malformed.to_string()))?,
        ),
    };
    auth.verify(header).map_err(|e| {
        Status::unauthenticated(format!(
            "{e} (supply `authorization: Bearer <node token>` as printed by `meshd node-token --node <name>`)"
        ))
    })
}
