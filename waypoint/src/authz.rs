//! L7 access control at the waypoint: RequestAuthentication (JWT) and AuthorizationPolicy
//! attached with `targetRefs` to our Gateway or to a Service bound to it, evaluated per
//! request with the client's identity (from its certificate) and the request's attributes.
//!
//! Owns the per-request verdict; the policy model and its evaluation are meshcore's (one
//! engine for L4 and L7). Does not route or forward.

use http::Request;
use hyper::body::Incoming;

use crate::app::Ctx;
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

/// Decides whether `req` may proceed; may add headers to it (`outputPayloadToHeader`).
pub fn check(ctx: &Ctx, down: &Downstream, req: &mut Request<Incoming>) -> Verdict {
    let _ = (ctx, down, req);
    Verdict::Allow
}
