//! The plain-HTTP listener: the same HTTP engine and pipeline without HBONE in, routing every
//! request to one backend address over plain TCP. It exists to measure the engine against
//! Envoy and nginx like for like (and is the start of an ingress gateway). Owns only its
//! accept loop.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::app::Ctx;
use crate::dest::Target;
use crate::http_server;
use crate::pipeline::Downstream;
use crate::sniff::{self, Rewind};

/// Accepts plain HTTP connections until the task is dropped; every request goes to `backend`.
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener, backend: SocketAddr) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "plain HTTP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _tracked = ctx.drain.track();
            let mut tcp = tcp;
            let (kind, prefix) = match sniff::sniff(&mut tcp, None).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(%peer, error = %e, "plain HTTP client failed before its first bytes");
                    return;
                }
            };
            let down = Arc::new(Downstream {
                principal: String::new(),
                client_namespace: None,
                addr: peer,
                target: Target::Address(backend),
            });
            let kind = match kind {
                sniff::Sniffed::Other => sniff::Sniffed::Http1,
                k => k,
            };
            http_server::serve(ctx, down, Rewind::new(prefix, tcp), kind).await;
        });
    }
}
