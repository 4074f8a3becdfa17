//! Serving HTTP on one downstream byte stream (an HBONE tunnel or a plain TCP connection):
//! HTTP/1.1 with keep-alive and upgrades, or HTTP/2 (h2c, gRPC) when the client opened with
//! the preface. Each request goes to [`pipeline::handle`]. A stopping waypoint closes kept-alive
//! connections gracefully (HTTP/2 GOAWAY). Owns the hyper server side only.

use std::sync::Arc;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use crate::app::Ctx;
use crate::pipeline::{self, Downstream};
use crate::sniff::Sniffed;
use crate::upstream::Io;

/// Serves `io` until the client is done. `kind` says which HTTP it opened with.
pub async fn serve<S: Io + 'static>(ctx: Arc<Ctx>, down: Arc<Downstream>, io: S, kind: Sniffed) {
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| pipeline::handle(ctx.clone(), down.clone(), req))
    };
    let io = TokioIo::new(io);
    let drain = ctx.drain.clone();
    let result = if kind == Sniffed::Http2 {
        let conn = http2::Builder::new(TokioExecutor::new()).serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = drain.stopping() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        // The timer gives hyper's 30 s limit on reading a request head: a client that opens
        // a request and never finishes its headers does not hold the connection forever.
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = drain.stopping() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "downstream HTTP connection ended with an error");
    }
}
