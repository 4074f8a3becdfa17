//! The waypoint's small HTTP servers: readiness on 15021 (`GET /healthz/ready`: 200 once it
//! has its certificate and a first config, else 503 with why) and metrics on 15020
//! (`GET /metrics`, `GET /config_dump`). Owns the listeners and paths; what readiness and the
//! dump say comes from `app`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::warn;

use crate::app::Ctx;

/// Which server a listener is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Ready,
    Metrics,
}

/// Serves `server` on `listener` until the task is dropped.
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener, server: Server) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, ?server, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(answer(&ctx, server, &req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(2))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn answer(ctx: &Ctx, server: Server, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(
        (server, path),
        (Server::Ready, "/healthz/ready") | (Server::Metrics, "/metrics" | "/config_dump")
    );
    if !known {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        );
    }
    match path {
        "/healthz/ready" => match ctx.ready() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ctx.metrics.encode(),
        ),
        _ => reply(
            StatusCode::OK,
            "application/json",
            format!("{:#}\n", ctx.config_dump()),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}
