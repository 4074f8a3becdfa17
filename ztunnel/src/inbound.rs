//! Inbound: traffic arriving at an enrolled pod, on HBONE (15008) or captured plaintext (15006).
//!
//! HBONE: mutual TLS with the pod's own certificate (the peer's chain and trust domain are
//! checked in `meshcore::tls`; handshakes in flight are capped per source and in total, and
//! failures before authentication are counted and summarised, not logged one by one), then each
//! CONNECT's `:authority` must be the very address the connection reached (this pod's, same
//! family) — else 400 — and the app is dialled inside the pod's netns — 503 if that fails or
//! times out — before the 200.
//! Plaintext: refused under STRICT mTLS, else delivered to the original destination. Both are
//! authorized (L4 AuthorizationPolicy) first: a denied CONNECT gets 401 before any byte reaches
//! the app, denied plaintext is closed. Owns those checks and the copy; not the TLS or HTTP/2
//! machinery, nor policy semantics (`meshcore::policy`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use dataplane::hbone_in;
use http::{HeaderMap, HeaderValue, StatusCode};
use meshcore::hbone::InboundRequest;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use meshcore::policy::Connection;
use meshcore::store::canonical;

use crate::capture::ListenerInfo;
use crate::copy;
use crate::metrics::{FLAG_CONNECT, FLAG_DENY, UNKNOWN};
use crate::policy::check;
use crate::proxy::{Ctx, Pod, accept_loop, is_mesh_port};
use crate::telemetry::{AccessLog, ConnResult, End, Outcome, tcp_labels};

/// Accepts HBONE connections on one of the pod's 15008 listeners until aborted.
pub async fn serve_hbone(ctx: Arc<Ctx>, pod: Arc<Pod>, listener: TcpListener) {
    accept_loop(ctx, pod, listener, "HBONE", hbone_connection).await
}

/// One accepted HBONE connection: TLS with the pod's current certificate, then HTTP/2.
async fn hbone_connection(ctx: Arc<Ctx>, pod: Arc<Pod>, tcp: TcpStream, peer: SocketAddr) {
    // Counted from before the certificate lookup: an unauthenticated peer holds a slot until
    // its handshake ends (at most `handshake_timeout`).
    let handshake_slot = match ctx.admission.handshakes.enter(peer.ip()) {
        Ok(slot) => slot,
        Err(full) => {
            if let Some(suppressed) = ctx.admission.handshakes_refused.hit() {
                warn!(pod = %pod.workload.uid, %peer, reason = %full, refused_since_last_line = suppressed,
                    "HBONE connection refused: too many handshakes in flight");
            }
            return;
        }
    };
    let entry = match ctx.certs.get(&pod.identity).await {
        Ok(e) => e,
        Err(e) => {
            warn!(pod = %pod.workload.uid, %peer, error = %e, "HBONE connection refused: no certificate");
            return;
        }
    };
    let (handler_ctx, handler_pod) = (ctx.clone(), pod.clone());
    let handler =
        move |req: InboundRequest| handle_connect(handler_ctx.clone(), handler_pod.clone(), req);
    let at = hbone_in::Inbound {
        tls: entry.server_tls.clone(),
        drain: &ctx.drain,
        handshake_slot,
        peer,
        pod: Some(&pod.workload.uid),
        handshakes_failed: &ctx.admission.handshakes_failed,
        kernel_tls: ctx.kernel_tls.in_use(),
    };
    hbone_in::serve(tcp, handler, at).await;
}

/// One CONNECT: checked, authorized, the app dialled, then bytes copied until either side
/// ends (or a policy change closes it).
async fn handle_connect(ctx: Arc<Ctx>, pod: Arc<Pod>, req: InboundRequest) {
    // Boxed: what only the checks and the dial need (the request, the config snapshot, the
    // dial) would otherwise stay in every held connection's task for its whole life.
    let Some(Opened {
        result,
        live,
        mut app,
        mut tunnel,
    }) = Box::pin(open(&ctx, &pod, req)).await
    else {
        return;
    };
    let copied = copy::bidirectional_until(
        &mut tunnel,
        &mut app,
        result.metrics(),
        live.cancel.notified(),
    )
    .await;
    result.finish(outcome(copied));
}

/// A CONNECT answered 200: its result (metrics opened), its registration for policy changes,
/// the app's connection and the tunnel.
struct Opened {
    result: ConnResult,
    live: crate::policy::LiveGuard,
    app: TcpStream,
    tunnel: meshcore::hbone::H2Stream,
}

/// Checks and authorizes a CONNECT and dials the app; answers it (400, 401, 503 or 200).
/// None when it was refused (logged and counted here).
async fn open(ctx: &Arc<Ctx>, pod: &Arc<Pod>, req: InboundRequest) -> Option<Opened> {
    let start = Instant::now();
    let peer = req.peer_addr;
    let target = match req.authority.parse::<SocketAddr>() {
        Ok(t) => t,
        Err(_) => {
            warn!(pod = %pod.workload.uid, authority = %req.authority, "HBONE: authority is not ip:port; 400");
            req.reject(StatusCode::BAD_REQUEST);
            return None;
        }
    };
    if !pod.owns(target.ip()) || is_mesh_port(target.port()) {
        warn!(pod = %pod.workload.uid, %target, "HBONE: authority is not this pod's app; 400");
        req.reject(StatusCode::BAD_REQUEST);
        return None;
    }
    // As Istio's ztunnel: the target must be the address this connection reached. Another of
    // the pod's addresses (the other family) would be dialled from the pod's own IP — the
    // client's cannot be bound across families — and the app would see itself as the client.
    if canonical(target.ip()) != canonical(req.local_addr.ip()) {
        warn!(pod = %pod.workload.uid, %target, reached = %req.local_addr, "HBONE: authority is not the address this connection reached; 400");
        req.reject(StatusCode::BAD_REQUEST);
        return None;
    }
    // Authorization happens before the 200, so a denied client never reaches the app.
    let conn = Connection {
        src_identity: Some(req.peer_identity.clone()),
        src_ip: peer.ip(),
        dst_ip: target.ip(),
        dst_port: target.port(),
    };
    let policies = ctx.policies.borrow().clone();
    let store = ctx.config.borrow().clone();
    let src_workload = store
        .as_ref()
        .and_then(|s| s.workload_by_ip(peer.ip()).cloned());
    let principal = req.peer_identity.to_string();
    let labels = tcp_labels(
        "destination",
        End {
            workload: src_workload.as_deref(),
            principal: Some(&principal),
        },
        End {
            workload: Some(&pod.workload),
            principal: None,
        },
        None,
        true,
    );
    let log = AccessLog {
        direction: "inbound",
        src_workload: Some(
            src_workload
                .as_ref()
                .map_or(UNKNOWN, |w| w.uid.as_str())
                .into(),
        ),
        src_identity: Some(principal.into()),
        dst_workload: Some(pod.names.uid.clone()),
        dst_namespace: Some(pod.names.namespace.clone()),
        dst_identity: Some(pod.names.identity.clone()),
        peer: Some(peer),
        target: Some(target),
        protocol: Some("HBONE"),
        ..AccessLog::default()
    };
    let result = ConnResult::new(start, ctx.metrics.open(labels), log).traced(ctx.spans.as_ref());
    if let Err(reason) = check(&policies, &ctx.decisions, pod, &conn) {
        req.reject(StatusCode::UNAUTHORIZED);
        result.finish(Outcome::Denied {
            reason: reason.to_string(),
            message: "connection denied; 401",
        });
        return None;
    }
    // Not needed past the check: a connection that outlives config pushes must not keep every
    // old snapshot alive.
    drop((policies, store, src_workload));
    let live = ctx.live.register(pod.clone(), conn);
    let app = match pod.dial_app(peer.ip(), target).await {
        Ok(a) => a,
        Err(e) => {
            req.reject(StatusCode::SERVICE_UNAVAILABLE);
            result.finish(Outcome::failed(
                Some(FLAG_CONNECT),
                format!("connect {target}: {e}; 503"),
            ));
            return None;
        }
    };
    let tunnel = match req.accept(response_headers(pod)) {
        Ok(t) => t,
        Err(e) => {
            result.finish(Outcome::failed(
                None,
                format!("could not answer CONNECT: {e}"),
            ));
            return None;
        }
    };
    Some(Opened {
        result,
        live,
        app,
        tunnel,
    })
}

/// How a copy that ran ended, as the access log and metrics count it.
fn outcome(copied: std::io::Result<copy::Outcome>) -> Outcome {
    match copied {
        Ok(copy::Outcome::Completed(t)) => Outcome::Complete {
            sent: t.server_to_client,
            received: t.client_to_server,
        },
        Ok(copy::Outcome::Cancelled(t)) => Outcome::Failed {
            flags: Some(FLAG_DENY),
            error: "closed: denied by a policy change".to_string(),
            bytes: Some((t.server_to_client, t.client_to_server)),
        },
        Err(e) => Outcome::failed(None, e.to_string()),
    }
}

/// Istio's ztunnel answers with baggage describing the destination.
fn response_headers(pod: &Pod) -> HeaderMap {
    let mut h = HeaderMap::new();
    let w = &pod.workload;
    if let Ok(v) = HeaderValue::from_str(&format!(
        "k8s.namespace.name={},k8s.pod.name={}",
        w.namespace, w.name
    )) {
        h.insert("baggage", v);
    }
    h
}

/// Accepts captured plaintext on one of the pod's 15006 listeners until aborted.
pub async fn serve_plaintext(ctx: Arc<Ctx>, pod: Arc<Pod>, listener: TcpListener) {
    let at = ctx.capture.listener_info(&listener);
    let handle = move |ctx, pod, tcp, peer| plaintext(ctx, pod, tcp, peer, at);
    accept_loop(ctx, pod, listener, "plaintext", handle).await
}

async fn plaintext(
    ctx: Arc<Ctx>,
    pod: Arc<Pod>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    at: ListenerInfo,
) {
    let start = Instant::now();
    let dst = match ctx.capture.original_dst(&tcp, peer, &at) {
        Ok(d) => d,
        Err(e) => {
            warn!(pod = %pod.workload.uid, %peer, error = %e, "inbound: cannot recover original destination; closing");
            return;
        }
    };
    if !pod.owns(dst.ip()) || is_mesh_port(dst.port()) {
        warn!(pod = %pod.workload.uid, %peer, %dst, "inbound plaintext to a mesh port or foreign address; closing");
        return;
    }
    let conn = Connection {
        src_identity: None,
        src_ip: peer.ip(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let policies = ctx.policies.borrow().clone();
    let store = ctx.config.borrow().clone();
    let src_workload = store
        .as_ref()
        .and_then(|s| s.workload_by_ip(peer.ip()).cloned());
    let labels = tcp_labels(
        "destination",
        End {
            workload: src_workload.as_deref(),
            principal: None,
        },
        End {
            workload: Some(&pod.workload),
            principal: None,
        },
        None,
        false,
    );
    let log = AccessLog {
        direction: "inbound",
        dst_workload: Some(pod.names.uid.clone()),
        peer: Some(peer),
        dst: Some(dst),
        protocol: Some("TCP"),
        ..AccessLog::default()
    };
    let result = ConnResult::new(start, ctx.metrics.open(labels), log).traced(ctx.spans.as_ref());
    if let Err(reason) = check(&policies, &ctx.decisions, &pod, &conn) {
        return result.finish(Outcome::Denied {
            reason: reason.to_string(),
            message: "connection denied; closed",
        });
    }
    drop((policies, store, src_workload));
    let live = ctx.live.register(pod.clone(), conn);
    let outcome = match pod.dial_app(peer.ip(), dst).await {
        Ok(mut app) => outcome(
            copy::bidirectional_until(&mut tcp, &mut app, result.metrics(), live.cancel.notified())
                .await,
        ),
        Err(e) => Outcome::failed(Some(FLAG_CONNECT), format!("connect {dst}: {e}")),
    };
    result.finish(outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task_size<F, Fut>(_: F) -> usize
    where
        F: Fn(Arc<Ctx>, Arc<Pod>, InboundRequest) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every held connection pays for this future (1.3–1.4 KB in dev and release builds; 2.2
    /// before the checks and the dial were boxed): only what the copy needs stays.
    #[test]
    fn an_inbound_connection_task_stays_small() {
        let size = task_size(handle_connect);
        assert!(
            size <= 1536,
            "an inbound CONNECT's future is {size} bytes: box what only its opening needs"
        );
    }
}
