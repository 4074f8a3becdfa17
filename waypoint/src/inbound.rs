//! HBONE in: the waypoint's 15008. mTLS with its own certificate (the client's identity comes
//! from its certificate), then each CONNECT: the original destination from its authority
//! (unknown or not bound here ⇒ refused, 400/404, before any byte flows), then by protocol:
//! HTTP served by the pipeline, anything else passed through. Handshakes and connections in
//! flight are capped per source and in total (`meshcore::admission`), as ztunnel's are.
//! Owns the listener and the per-CONNECT dispatch; not TLS or HTTP/2 (`meshcore::hbone`).

use std::net::SocketAddr;
use std::sync::Arc;

use dataplane::hbone_in;
use meshcore::hbone::InboundRequest;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::app::Ctx;
use crate::dest::{self, Protocol};
use crate::pipeline::Downstream;
use crate::sniff::{self, Rewind, Sniffed};
use crate::{http_server, tcp};

/// Accepts HBONE connections until the task is dropped.
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of fds and the like: back off instead of spinning.
                if let Some(n) = ctx.admission.accept_failed.hit() {
                    warn!(error = %e, suppressed = n, "HBONE accept failed");
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let pass = match ctx.admission.connections.enter(peer.ip()) {
            Ok(p) => p,
            Err(full) => {
                if let Some(n) = ctx.admission.refused.hit() {
                    warn!(%peer, reason = %full, refused_since_last_line = n, "HBONE connection refused: too many in flight");
                }
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _pass = pass;
            let _tracked = ctx.drain.track();
            connection(ctx, tcp, peer).await;
        });
    }
}

async fn connection(ctx: Arc<Ctx>, tcp: TcpStream, peer: SocketAddr) {
    let handshake_slot = match ctx.admission.handshakes.enter(peer.ip()) {
        Ok(s) => s,
        Err(full) => {
            if let Some(n) = ctx.admission.refused.hit() {
                warn!(%peer, reason = %full, refused_since_last_line = n, "HBONE connection refused: too many handshakes in flight");
            }
            return;
        }
    };
    let entry = match ctx.cert.get().await {
        Ok(e) => e,
        Err(e) => {
            warn!(%peer, error = %e, "HBONE connection refused: no certificate");
            return;
        }
    };
    let handler_ctx = ctx.clone();
    let handler = move |req: InboundRequest| handle_connect(handler_ctx.clone(), req);
    let at = hbone_in::Inbound {
        tls: entry.server_tls.clone(),
        drain: &ctx.drain,
        handshake_slot,
        peer,
        pod: None,
        handshakes_failed: &ctx.admission.handshakes_failed,
        kernel_tls: ctx.kernel_tls.in_use(),
    };
    hbone_in::serve(tcp, handler, at).await;
}

async fn handle_connect(ctx: Arc<Ctx>, req: InboundRequest) {
    let store = ctx.config.borrow().clone();
    let target = match store.as_deref() {
        Some(store) => dest::resolve(store, &req.authority, &ctx.gateway),
        None => Err(dest::Refusal {
            status: http::StatusCode::SERVICE_UNAVAILABLE,
            reason: "no config yet".to_string(),
        }),
    };
    let target = match target {
        Ok(t) => t,
        Err(refusal) => {
            // Any client can ask for any destination: one debug line each, a periodic summary.
            debug!(src.identity = %req.peer_identity, peer = %req.peer_addr, authority = %req.authority,
                reason = %refusal, status = refusal.status.as_u16(), "HBONE CONNECT refused");
            ctx.metrics.connect_refused(refusal.status.as_u16());
            if let Some(n) = ctx.admission.connect_refused.hit() {
                warn!(src.identity = %req.peer_identity, authority = %req.authority, reason = %refusal,
                    status = refusal.status.as_u16(), refused_since_last_line = n,
                    "HBONE CONNECT refused (each one is logged at debug)");
            }
            req.reject(refusal.status);
            return;
        }
    };
    let down = Arc::new(Downstream {
        principal: req.peer_identity.to_string(),
        client_namespace: Some(req.peer_identity.namespace.clone()),
        addr: req.peer_addr,
        target,
    });
    let protocol = down.target.protocol();
    let mut stream = match req.accept(http::HeaderMap::new()) {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "could not answer CONNECT");
            return;
        }
    };
    let timeout = match protocol {
        Protocol::Tcp => {
            tcp::passthrough(ctx, down, stream, bytes::Bytes::new()).await;
            return;
        }
        Protocol::Http => None,
        Protocol::Detect => Some(ctx.sniff_timeout),
    };
    let (kind, prefix) = match sniff::sniff(&mut stream, timeout).await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "downstream failed before its first bytes");
            return;
        }
    };
    match (protocol, kind) {
        // A declared HTTP port that does not open like HTTP/2 gets HTTP/1 (and hyper's 400).
        (Protocol::Http, Sniffed::Other) => {
            http_server::serve(ctx, down, Rewind::new(prefix, stream), Sniffed::Http1).await
        }
        (_, Sniffed::Other) => tcp::passthrough(ctx, down, stream, prefix).await,
        (_, kind) => http_server::serve(ctx, down, Rewind::new(prefix, stream), kind).await,
    }
}
