//! Request mirroring (VirtualService `mirror`/`mirrors`, HTTPRoute `RequestMirror`):
//! fire-and-forget copies of a request to other Services.
//!
//! Owns the copy: drawn with the mirror's percentage, Host/authority with `-shadow` appended
//! (Envoy's), the body only once the client has sent all of it within the retry buffer (a body
//! the waypoint no longer has is never mirrored), its own timeout, and a bound on copies in
//! flight. The response is discarded. Nothing here may delay or fail the client's request:
//! the client's exchange never waits for a mirror.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty, StreamBody};
use meshcore::route::lb::HashRequest;
use meshcore::route::resilience::Mirror;
use tracing::debug;

use crate::app::Ctx;
use crate::balance::{self, Admit, Outcome};
use crate::retry::Tee;
use crate::routing::{Backend, Router};
use crate::upstream::{self, Body};

/// Mirror requests in flight, all destinations together; beyond it copies are dropped, so a
/// stalled mirror cannot pile up work (process-wide: one waypoint per process).
pub const MAX_IN_FLIGHT: usize = 512;

/// A mirror request's whole life, body wait included.
pub const TIMEOUT: Duration = Duration::from_secs(10);

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Mirror requests in flight now.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Acquire)
}

/// One place in [`MAX_IN_FLIGHT`], until dropped.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        IN_FLIGHT
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_IN_FLIGHT).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Starts the copies of a request whose outbound head is `head` (header edits and rewrites
/// applied) and whose body is `body`; returns at once.
pub fn spawn(
    ctx: &Arc<Ctx>,
    router: &Router,
    mirrors: &[Mirror],
    head: &Parts,
    version: upstream::Version,
    body: &Tee,
) {
    for m in mirrors {
        if !crate::fault::hit(&mut rand::rng(), m.percent) {
            continue;
        }
        let Some(slot) = Slot::take() else {
            debug!(mirror = %m.backend.service, "mirror dropped: too many in flight");
            continue;
        };
        let backend = Backend::Service {
            service: m.backend.service.clone(),
            port: m.backend.port,
            subset: m.backend.subset.clone(),
        };
        let mut head = head.clone();
        shadow(&mut head);
        let (ctx, router, body) = (ctx.clone(), router.clone(), body.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(TIMEOUT, send(&ctx, &router, &backend, head, version, body))
                .await
            {
                Ok(Ok(status)) => debug!(?backend, status, "mirror answered"),
                Ok(Err(why)) => debug!(?backend, why, "mirror not sent or failed"),
                Err(_) => debug!(?backend, "mirror timed out"),
            }
        });
    }
}

async fn send(
    ctx: &Ctx,
    router: &Router,
    backend: &Backend,
    head: Parts,
    version: upstream::Version,
    body: Tee,
) -> Result<u16, &'static str> {
    let frames = body.complete().await.ok_or("body not kept")?;
    let body: Body = if frames.is_empty() {
        Empty::<Bytes>::new().map_err(|n| match n {}).boxed()
    } else {
        StreamBody::new(futures::stream::iter(
            frames.into_iter().map(Ok::<_, hyper::Error>),
        ))
        .boxed()
    };
    let endpoints = match ctx.config.borrow().as_deref() {
        Some(store) => balance::endpoints(store, router, backend),
        None => Vec::new(),
    };
    let destination = router.destination_policy(backend);
    let _permit = ctx
        .balancer
        .admit(backend, &destination, Admit::Request)
        .map_err(|_| "destination overflow")?;
    let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let picked = ctx
        .balancer
        .pick(
            router,
            backend,
            &endpoints,
            &HashRequest {
                headers: &head.headers,
                path_and_query: path,
                source_ip: None,
            },
            &[],
        )
        .ok_or("no endpoint")?;
    let ep = picked.endpoint.clone();
    let sent = ctx
        .upstream
        .send(
            &ep,
            version,
            Request::from_parts(head, body),
            &destination.pool,
        )
        .await;
    let outcome = match &sent {
        Ok(r) => Outcome::Status(r.status().as_u16()),
        Err(e) if e.is_connect() => Outcome::ConnectFailure,
        Err(_) => Outcome::Reset,
    };
    ctx.balancer.report(backend, &destination, ep.addr, outcome);
    let resp = sent.map_err(|_| "upstream failed")?;
    let status = resp.status().as_u16();
    // Read (and drop) the answer so the connection can serve others.
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// Envoy's shadow host: `-shadow` after the host name, before any port.
pub fn shadow_host(authority: &str) -> String {
    let (host, port) = match authority.rsplit_once(':') {
        // `[v6]` alone has colons but no port.
        Some((h, p)) if !p.contains(']') && p.chars().all(|c| c.is_ascii_digit()) => (h, Some(p)),
        _ => (authority, None),
    };
    match port {
        Some(p) => format!("{host}-shadow:{p}"),
        None => format!("{host}-shadow"),
    }
}

fn shadow(head: &mut Parts) {
    if let Some(a) = head.uri.authority() {
        let mut parts = head.uri.clone().into_parts();
        if let Ok(a) = shadow_host(a.as_str()).parse() {
            parts.authority = Some(a);
            if let Ok(u) = Uri::from_parts(parts) {
                head.uri = u;
            }
        }
    }
    if let Some(h) = head.headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && let Ok(v) = shadow_host(h).parse()
    {
        head.headers.insert(header::HOST, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_goes_before_the_port() {
        assert_eq!(shadow_host("web"), "web-shadow");
        assert_eq!(shadow_host("web.app:8080"), "web.app-shadow:8080");
        assert_eq!(shadow_host("[::1]:80"), "[::1]-shadow:80");
    }

    #[test]
    fn in_flight_is_bounded() {
        let held: Vec<Slot> = std::iter::from_fn(Slot::take)
            .take(MAX_IN_FLIGHT + 5)
            .collect();
        assert!(held.len() <= MAX_IN_FLIGHT);
        assert!(Slot::take().is_none());
        drop(held);
        assert!(Slot::take().is_some());
    }
}
