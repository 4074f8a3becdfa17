//! One HTTP request's way through the waypoint: authorize → match → route → fault → mirror →
//! admit → attempts (`attempts`: pick endpoint → send, retried as the route says).
//!
//! Owns the order of those steps, what the request and response look like on the way out
//! (header operations, rewrites, origin-form vs absolute URI, hop-by-hop headers), local
//! answers (404 no route, 503 no healthy upstream, redirects, direct responses, injected
//! aborts; shaped by `local_reply`, gRPC statuses for gRPC clients) and `Upgrade` (WebSocket)
//! hand-over, never retried. Every request ends in exactly one [`Record`], finished when its
//! response body ends — or fails, reset at the route timeout if the body is still coming.
//! Does not own connections (`upstream`), endpoint choice and limits (`balance`) or routing
//! rules.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::app::Ctx;
use crate::attempts::{AttemptBody, Attempts, Forwarded};
use crate::authz::Verdict;
use crate::balance::{self, Admit, InFlight, Overflow, Permit};
use crate::dest::Target;
use crate::local_reply::{is_grpc, local, local_answer, local_response, overflow};
use crate::retry::{REQUEST_BUFFER_LIMIT, Tee};
use crate::routing::{Forward, HttpDecision, RequestInfo};
use crate::telemetry::{Flag, Kind, Metrics, Record};
use crate::upstream::{self, Body};
use crate::{fault, mirror};
use meshcore::route::lb::HashRequest;

/// Who sent the requests of one downstream connection, and where they were going.
#[derive(Debug)]
pub struct Downstream {
    /// The client's SPIFFE identity; empty on the plain-HTTP listener.
    pub principal: String,
    /// The client's namespace (from its identity), for consumer routes.
    pub client_namespace: Option<String>,
    pub addr: SocketAddr,
    pub target: Target,
}

/// Handles one request; never fails (errors become responses).
pub async fn handle(
    ctx: Arc<Ctx>,
    down: Arc<Downstream>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    // A gRPC client gets every answer made here as a gRPC status (Envoy's local replies).
    let grpc = is_grpc(req.headers());
    if !normalize_path(&mut req) {
        let (status, headers, text) = local_answer(
            grpc,
            StatusCode::BAD_REQUEST,
            HeaderMap::new(),
            "Bad Request",
        );
        return Ok(local_response(status, headers, text));
    }
    let authority = request_authority(&req).unwrap_or_default();
    let protocol = match req.version() {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let mut record = Record::new(
        down.principal.clone(),
        down.addr.to_string(),
        down.target.name(),
        down.target.port(),
        Kind::Http {
            method: req.method().to_string(),
            authority: authority.clone(),
            path: req.uri().path().to_string(),
            protocol,
            status: 0,
        },
    );
    crate::trace::on_request(&ctx, &mut req, &mut record);
    // access control (JWT, then AuthorizationPolicy), before anything is routed
    match crate::authz::check(&ctx, &down, &mut req) {
        Verdict::Allow => {}
        Verdict::Deny { policy } => {
            record.flag = Some(Flag::RbacDenied);
            record.error = Some(format!("denied by {policy}"));
            return Ok(local(
                &ctx.metrics,
                grpc,
                record,
                StatusCode::FORBIDDEN,
                HeaderMap::new(),
                "RBAC: access denied",
            ));
        }
        Verdict::Unauthenticated { reason } => {
            record.error = Some(reason);
            return Ok(local(
                &ctx.metrics,
                grpc,
                record,
                StatusCode::UNAUTHORIZED,
                HeaderMap::new(),
                "Jwt verification fails",
            ));
        }
    }
    // match → route
    let router = ctx.router.borrow().clone();
    let decision = router.http(
        &down.target,
        &RequestInfo {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            authority: &authority,
            client_namespace: down.client_namespace.as_deref(),
        },
    );
    let forward = match decision {
        HttpDecision::Forward(f) => f,
        HttpDecision::NotFound => {
            record.flag = Some(Flag::NoRoute);
            return Ok(local(
                &ctx.metrics,
                grpc,
                record,
                StatusCode::NOT_FOUND,
                HeaderMap::new(),
                "",
            ));
        }
        HttpDecision::Redirect { status, location } => {
            let mut h = HeaderMap::new();
            if let Ok(v) = location.parse() {
                h.insert(header::LOCATION, v);
            }
            record.route = "redirect".to_string();
            return Ok(local(&ctx.metrics, grpc, record, status, h, ""));
        }
        HttpDecision::Direct { status, body } => {
            record.route = "direct".to_string();
            return Ok(local(
                &ctx.metrics,
                grpc,
                record,
                status,
                HeaderMap::new(),
                &body,
            ));
        }
    };
    record.route = forward.route_name.to_string();
    record.set_backend(&forward.backend);
    let policy = forward.policy.clone();
    // faults: the delay first, then the abort (each drawn on its own)
    if let Some(fault) = &policy.fault {
        let injected = fault::draw(fault);
        if let Some(delay) = injected.delay {
            record.add_flag(Flag::DelayInjected);
            tokio::time::sleep(delay).await;
        }
        if let Some(abort) = injected.abort {
            record.add_flag(Flag::FaultInjected);
            let (status, headers, text) = fault::answer(abort);
            return Ok(local(&ctx.metrics, grpc, record, status, headers, text));
        }
    }
    let upgrade = is_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let version = if req.version() == Version::HTTP_2 {
        upstream::Version::Http2
    } else {
        upstream::Version::Http1
    };
    let (head, body) = req.into_parts();
    let body = record.count_request(body);
    let hash_headers = head.headers.clone();
    let hash_path = head
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let out = outbound_head(head, &forward, &authority, version, upgrade);
    // An upgrade's body is the connection itself: sent once, never kept.
    let body = if upgrade {
        AttemptBody::Once(Some(body))
    } else {
        AttemptBody::Kept(Tee::new(body, REQUEST_BUFFER_LIMIT))
    };
    if let AttemptBody::Kept(tee) = &body {
        mirror::spawn(&ctx, &router, &policy.mirrors, &out, version, tee);
    }
    // admit, then pick and send, retrying as the route says
    let endpoints = match ctx.config.borrow().as_deref() {
        Some(store) => balance::endpoints(store, &router, &forward.backend),
        None => Vec::new(),
    };
    let destination = router.destination_policy(&forward.backend);
    let permit = match ctx
        .balancer
        .admit(&forward.backend, &destination, Admit::Request)
    {
        Ok(p) => p,
        Err(Overflow) => return Ok(overflow(&ctx.metrics, grpc, record)),
    };
    let attempts = Attempts {
        ctx: &ctx,
        router: &router,
        forward: &forward,
        endpoints: &endpoints,
        hash: &HashRequest {
            headers: &hash_headers,
            path_and_query: &hash_path,
            source_ip: Some(down.addr.ip()),
        },
        destination: &destination,
        version,
    };
    let (mut resp, in_flight, set_cookie, expires, endpoint) = match attempts.run(&out, body).await
    {
        Forwarded::Response {
            resp,
            in_flight,
            set_cookie,
            upstream,
            flag,
            expires,
        } => {
            record.upstream = upstream.to_string();
            if let Some(f) = flag {
                record.add_flag(f);
            }
            (resp, in_flight, set_cookie, expires, upstream)
        }
        Forwarded::Local(l) => {
            if let Some(u) = l.upstream {
                record.upstream = u.to_string();
            }
            record.add_flag(l.flag);
            if let Some(f) = l.extra {
                record.add_flag(f);
            }
            record.error = l.error;
            let mut h = HeaderMap::new();
            if l.flag == Flag::UpstreamOverflow {
                h.insert("x-envoy-overloaded", http::HeaderValue::from_static("true"));
            }
            return Ok(local(&ctx.metrics, grpc, record, l.status, h, l.text));
        }
    };
    if let (Some(down_upgrade), true) = (
        downstream_upgrade,
        resp.status() == StatusCode::SWITCHING_PROTOCOLS,
    ) {
        let up_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::join!(down_upgrade, up_upgrade) {
                (Ok(d), Ok(u)) => {
                    let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                        debug!(error = %e, "upgraded connection ended with an error");
                    }
                }
                (d, u) => debug!(
                    downstream = d.is_ok(),
                    upstream = u.is_ok(),
                    "upgrade did not complete"
                ),
            }
        });
    }
    let (mut head, body) = resp.into_parts();
    if head.status != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(&mut head.headers);
    }
    forward.response_headers.apply(&mut head.headers);
    if let Some(cookie) = set_cookie.and_then(|c| http::HeaderValue::from_str(&c).ok()) {
        head.headers.append(header::SET_COOKIE, cookie);
    }
    if let Kind::Http { status, .. } = &mut record.kind {
        *status = head.status.as_u16();
    }
    let body = Logged {
        inner: body.boxed(),
        record: Some(record),
        metrics: ctx.metrics.clone(),
        _in_flight: in_flight,
        _permit: permit,
        // An upgraded connection is no longer this exchange's response.
        expires: expires.filter(|_| head.status != StatusCode::SWITCHING_PROTOCOLS),
        on_timeout: Some({
            let (ctx, backend) = (ctx.clone(), forward.backend.clone());
            Box::new(move || {
                ctx.balancer
                    .report(&backend, &destination, endpoint, balance::Outcome::Timeout)
            })
        }),
    };
    Ok(Response::from_parts(head, BodyExt::boxed(body)))
}

/// Removes dot segments from the path once, before policy, routing and forwarding all read it
/// (Istio's default `pathNormalization: BASE`, as Envoy does): the backend serves the very path
/// the AuthorizationPolicy and the route matched, so `/public/%2e%2e/admin` cannot reach
/// `/admin` under a rule meant for `/public`.
/// `false`: the normalized path does not form a URI (the request is refused, not passed raw).
fn normalize_path<B>(req: &mut Request<B>) -> bool {
    let uri = req.uri();
    let std::borrow::Cow::Owned(path) = meshcore::policy::normalize_path(uri.path()) else {
        return true;
    };
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    match Uri::from_parts(parts) {
        Ok(normalized) => {
            *req.uri_mut() = normalized;
            true
        }
        Err(_) => false,
    }
}

/// The request's authority: the URI's (HTTP/2 `:authority`) or `Host` (HTTP/1.1).
fn request_authority<B>(req: &Request<B>) -> Option<String> {
    req.uri().authority().map(|a| a.to_string()).or_else(|| {
        req.headers()
            .get(header::HOST)?
            .to_str()
            .ok()
            .map(str::to_string)
    })
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Connection-scoped headers (RFC 9110 §7.6.1) do not cross a proxy.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::UPGRADE,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(name);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// The request head as sent to the endpoint: header operations, rewrites, and the URI form
/// the upstream protocol wants (origin form + Host for HTTP/1.1, absolute for HTTP/2).
fn outbound_head(
    mut head: http::request::Parts,
    forward: &Forward,
    authority: &str,
    version: upstream::Version,
    upgrade: bool,
) -> http::request::Parts {
    if !upgrade {
        strip_hop_by_hop(&mut head.headers);
    }
    forward.request_headers.apply(&mut head.headers);
    let authority = forward
        .rewrite_authority
        .as_deref()
        .unwrap_or(authority)
        .to_string();
    let path = match &forward.rewrite_path {
        Some(p) => p.clone(),
        None => head
            .uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.to_string()),
    };
    match version {
        upstream::Version::Http1 => {
            head.uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
            if let Ok(v) = authority.parse() {
                head.headers.insert(header::HOST, v);
            }
            head.version = Version::HTTP_11;
        }
        upstream::Version::Http2 => {
            head.headers.remove(header::HOST);
            let uri = format!("http://{authority}{path}");
            head.uri = uri.parse().unwrap_or_else(|_| Uri::from_static("/"));
            head.version = Version::HTTP_2;
        }
    }
    head
}

/// The body of a response to the client: an endpoint's (whose error may also be the route
/// timeout expiring mid-body) or one made here.
pub type ResponseBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// The route timeout or `perTryTimeout` expired after the response headers were passed on:
/// the client's stream is reset (HTTP/2 RST_STREAM, HTTP/1.1 connection closed), as Envoy does.
#[derive(Debug, thiserror::Error)]
#[error("upstream request timeout after the response started")]
struct ResponseTimeout;

/// A response body that finishes its request's [`Record`] when it ends (or is dropped), and
/// keeps the endpoint's in-flight count until then; it fails (`UT`) if the response has not
/// ended by its deadline.
struct Logged {
    inner: Body,
    record: Option<Record>,
    metrics: Arc<Metrics>,
    _in_flight: InFlight,
    _permit: Permit,
    /// Fires at the route timeout or `perTryTimeout` (see `attempts`).
    expires: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Tells outlier detection the endpoint timed out (Envoy counts it, as a 504, also when
    /// the headers had come).
    on_timeout: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Logged {
    fn finish(&mut self, flag: Option<Flag>, error: Option<String>) {
        if let Some(mut r) = self.record.take() {
            if r.flag.is_none() {
                r.flag = flag;
            }
            if error.is_some() {
                r.error = error;
            }
            r.finish(&self.metrics);
        }
    }
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let expired = match self.expires.as_mut().map(|e| Pin::new(e).poll(cx)) {
            Some(Poll::Ready(fired)) => {
                self.expires = None;
                fired.is_ok()
            }
            _ => false,
        };
        // Past the deadline the response is cut even while data still flows; a response
        // ending right now is let through.
        let ending = matches!(polled, Poll::Ready(None))
            || matches!(polled, Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream());
        if expired && !ending {
            if let Some(r) = self.record.as_mut() {
                r.add_flag(Flag::UpstreamTimeout);
            }
            self.finish(None, Some(ResponseTimeout.to_string()));
            if let Some(report) = self.on_timeout.take() {
                report();
            }
            // Dropping the endpoint's body resets its stream too.
            self.inner = Body::default();
            return Poll::Ready(Some(Err(Box::new(ResponseTimeout))));
        }
        if let (Poll::Ready(Some(Ok(f))), Some(r)) = (&polled, &mut self.record) {
            r.count_response(f);
        }
        match &polled {
            // hyper stops polling once a body says it has ended (e.g. Content-Length reached).
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(None, None),
            Poll::Ready(None) => self.finish(None, None),
            Poll::Ready(Some(Err(e))) => {
                let e = e.to_string();
                self.finish(Some(Flag::UpstreamReset), Some(e));
            }
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            // Empty, or ended without hyper asking for the end.
            self.finish(None, None);
        } else {
            // Dropped before its end: the client went away mid-response.
            self.finish(Some(Flag::DownstreamReset), None);
        }
    }
}
