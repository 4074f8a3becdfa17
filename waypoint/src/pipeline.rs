//! One HTTP request's way through the waypoint: authorize → match → route → fault → mirror →
//! admit → (pick endpoint → send) per attempt.
//!
//! Owns the order of those steps, the attempt loop (retries, per-try and route timeouts, with
//! `retry` saying what is retriable and keeping the body), what the request and response look
//! like on the way out (header operations, rewrites, origin-form vs absolute URI, hop-by-hop
//! headers), local answers (404 no route, 503 no healthy upstream, 504 timeout, redirects,
//! direct responses, injected aborts) and `Upgrade` (WebSocket) hand-over, never retried.
//! Every request ends in exactly one [`Record`], finished when its response body ends. Does
//! not own connections (`upstream`), endpoint choice and limits (`balance`) or routing rules.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::app::Ctx;
use crate::authz::Verdict;
use crate::balance::{self, Admit, Endpoint, InFlight, Outcome, Overflow, Permit};
use crate::dest::Target;
use crate::retry::{self, Failure, REQUEST_BUFFER_LIMIT, Tee};
use crate::routing::{Forward, HttpDecision, RequestInfo, Router};
use crate::telemetry::{Flag, Kind, Metrics, Record};
use crate::upstream::{self, Body, UpstreamError};
use crate::{fault, mirror};
use meshcore::route::DestinationPolicy;
use meshcore::route::lb::HashRequest;
use tokio::time::Instant;

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
) -> Result<Response<Body>, Infallible> {
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
            return Ok(local(&ctx.metrics, record, status, h, ""));
        }
        HttpDecision::Direct { status, body } => {
            record.route = "direct".to_string();
            return Ok(local(&ctx.metrics, record, status, HeaderMap::new(), &body));
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
            return Ok(local(&ctx.metrics, record, status, headers, text));
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
        Err(Overflow) => return Ok(overflow(&ctx.metrics, record)),
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
    let (mut resp, in_flight, set_cookie) = match attempts.run(&out, body).await {
        Forwarded::Response {
            resp,
            in_flight,
            set_cookie,
            upstream,
            flag,
        } => {
            record.upstream = upstream.to_string();
            if let Some(f) = flag {
                record.add_flag(f);
            }
            (resp, in_flight, set_cookie)
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
            return Ok(local(&ctx.metrics, record, l.status, h, l.text));
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
    };
    Ok(Response::from_parts(head, BodyExt::boxed(body)))
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

/// A response made here (not by an endpoint); the record is finished now.
fn local(
    metrics: &Metrics,
    mut record: Record,
    status: StatusCode,
    headers: HeaderMap,
    text: &str,
) -> Response<Body> {
    if let Kind::Http { status: s, .. } = &mut record.kind {
        *s = status.as_u16();
    }
    record.finish(metrics);
    let mut resp = Response::new(
        Full::new(Bytes::from(text.to_string()))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if !text.is_empty() {
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
    }
    resp
}

const OVERFLOW_TEXT: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// A connection-pool limit overflowed: Envoy's immediate 503 `UO` with `x-envoy-overloaded`.
fn overflow(metrics: &Metrics, mut record: Record) -> Response<Body> {
    record.flag = Some(Flag::UpstreamOverflow);
    let mut h = HeaderMap::new();
    h.insert("x-envoy-overloaded", http::HeaderValue::from_static("true"));
    local(
        metrics,
        record,
        StatusCode::SERVICE_UNAVAILABLE,
        h,
        OVERFLOW_TEXT,
    )
}

/// A response body that finishes its request's [`Record`] when it ends (or is dropped), and
/// keeps the endpoint's in-flight count until then.
struct Logged {
    inner: Body,
    record: Option<Record>,
    metrics: Arc<Metrics>,
    _in_flight: InFlight,
    _permit: Permit,
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
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
        polled
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

/// A request's body for its attempts.
enum AttemptBody {
    /// Kept for replay while it fits the buffer.
    Kept(Tee),
    /// Sent as it comes, once (upgrades).
    Once(Option<crate::telemetry::RequestBody>),
}

impl AttemptBody {
    /// The body for a new attempt; `None` once it can no longer be sent whole.
    fn attempt(&mut self) -> Option<Body> {
        match self {
            AttemptBody::Kept(tee) => tee.attempt().map(|b| b.boxed()),
            AttemptBody::Once(b) => b.take().map(|b| b.boxed()),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            AttemptBody::Kept(tee) => tee.replayable(),
            AttemptBody::Once(_) => false,
        }
    }
}

/// Everything the attempts of one request share.
struct Attempts<'a> {
    ctx: &'a Ctx,
    router: &'a Router,
    forward: &'a Forward,
    endpoints: &'a [Endpoint],
    hash: &'a HashRequest<'a>,
    destination: &'a DestinationPolicy,
    version: upstream::Version,
}

/// How the attempts ended.
enum Forwarded {
    /// An endpoint's response, to pass on.
    Response {
        resp: Response<Incoming>,
        in_flight: InFlight,
        set_cookie: Option<String>,
        upstream: SocketAddr,
        /// `URX` (retries used up on a retriable status) or `UO` (`maxRetries` full).
        flag: Option<Flag>,
    },
    /// An answer made here.
    Local(LocalAnswer),
}

struct LocalAnswer {
    status: StatusCode,
    text: &'static str,
    flag: Flag,
    /// `URX` or `UO` after the cause, as Envoy lists them (`UF,URX`).
    extra: Option<Flag>,
    error: Option<String>,
    upstream: Option<SocketAddr>,
}

/// Envoy's words, which clients and runbooks grep for.
const TIMEOUT_TEXT: &str = "upstream request timeout";
const CONNECT_TEXT: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const RESET_TEXT: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
const REFUSED_TEXT: &str = "upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset";

impl LocalAnswer {
    fn timeout(upstream: Option<SocketAddr>) -> LocalAnswer {
        LocalAnswer {
            status: StatusCode::GATEWAY_TIMEOUT,
            text: TIMEOUT_TEXT,
            flag: Flag::UpstreamTimeout,
            extra: None,
            error: None,
            upstream,
        }
    }

    fn failed(failure: Failure, error: String, upstream: SocketAddr) -> LocalAnswer {
        let (text, flag) = match failure {
            Failure::Connect => (CONNECT_TEXT, Flag::UpstreamConnect),
            Failure::RefusedStream => (REFUSED_TEXT, Flag::UpstreamReset),
            Failure::Reset => (RESET_TEXT, Flag::UpstreamReset),
            Failure::PerTryTimeout => return LocalAnswer::timeout(Some(upstream)),
        };
        LocalAnswer {
            status: StatusCode::SERVICE_UNAVAILABLE,
            text,
            flag,
            extra: None,
            error: Some(error),
            upstream: Some(upstream),
        }
    }
}

impl Attempts<'_> {
    /// Sends the request (`head` + `body`) as the route's retry policy says: 1 + `attempts`
    /// tries at most, each within `perTryTimeout`, all (backoff included) within the route's
    /// `timeout`, retrying only what `retryOn` names and only with a body still whole.
    async fn run(&self, head: &http::request::Parts, mut body: AttemptBody) -> Forwarded {
        let policy = &self.forward.policy;
        let retry = &policy.retry;
        let deadline = policy.timeout.map(|t| Instant::now() + t);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retries = 0u32;
        // Held from the decision to retry until that retry's answer (`maxRetries`).
        let mut retry_permit: Option<Permit> = None;
        loop {
            let exclude = if retry.avoid_previous_hosts {
                &tried[..]
            } else {
                &[]
            };
            let Some(picked) = self.ctx.balancer.pick(
                self.router,
                &self.forward.backend,
                self.endpoints,
                self.hash,
                exclude,
            ) else {
                return Forwarded::Local(LocalAnswer {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    text: "no healthy upstream",
                    flag: Flag::NoHealthyUpstream,
                    extra: None,
                    error: None,
                    upstream: tried.last().copied(),
                });
            };
            let addr = picked.endpoint.addr;
            tried.push(addr);
            let Some(attempt_body) = body.attempt() else {
                // Only a retry can find the body gone, and retries check first.
                return Forwarded::Local(LocalAnswer::failed(
                    Failure::Reset,
                    "request body no longer available".to_string(),
                    addr,
                ));
            };
            let req = Request::from_parts(head.clone(), attempt_body);
            let per_try = retry.per_try_timeout.map(|t| Instant::now() + t);
            // Which limit ends this attempt: the route's (504, final) or its own (retriable).
            let (limit, route_limit) = match (deadline, per_try) {
                (Some(d), Some(p)) if p < d => (Some(p), false),
                (Some(d), _) => (Some(d), true),
                (None, p) => (p, false),
            };
            let send =
                self.ctx
                    .upstream
                    .send(&picked.endpoint, self.version, req, &self.destination.pool);
            let sent = match limit {
                Some(l) => tokio::time::timeout_at(l, send).await.ok(),
                None => Some(send.await),
            };
            drop(retry_permit.take());
            let report = |o| {
                self.ctx
                    .balancer
                    .report(&self.forward.backend, self.destination, addr, o)
            };
            let (retriable, answer) = match sent {
                None => {
                    report(Outcome::Timeout);
                    if route_limit {
                        return Forwarded::Local(LocalAnswer::timeout(Some(addr)));
                    }
                    (
                        retry::retries_failure(&retry.retry_on, Failure::PerTryTimeout),
                        Forwarded::Local(LocalAnswer::timeout(Some(addr))),
                    )
                }
                Some(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    report(Outcome::Status(status));
                    let retriable = retry::retries_status(&retry.retry_on, status, resp.headers());
                    let answer = Forwarded::Response {
                        resp,
                        in_flight: picked.in_flight,
                        set_cookie: picked.set_cookie,
                        upstream: addr,
                        flag: None,
                    };
                    (retriable, answer)
                }
                // Never reached the endpoint: not its fault, and Envoy never retries it.
                Some(Err(UpstreamError::Overflow(_))) => {
                    return Forwarded::Local(LocalAnswer {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        text: OVERFLOW_TEXT,
                        flag: Flag::UpstreamOverflow,
                        extra: None,
                        error: None,
                        upstream: Some(addr),
                    });
                }
                Some(Err(e)) => {
                    let failure = Failure::of(&e);
                    report(if failure == Failure::Connect {
                        Outcome::ConnectFailure
                    } else {
                        Outcome::Reset
                    });
                    (
                        retry::retries_failure(&retry.retry_on, failure),
                        Forwarded::Local(LocalAnswer::failed(failure, e.to_string(), addr)),
                    )
                }
            };
            if !retriable || !body.replayable() {
                return answer;
            }
            if retries >= retry.attempts {
                // Envoy flags `URX` when a retry policy ran out; `attempts: 0` has none.
                return if retry.attempts > 0 {
                    with_flag(answer, Flag::RetryLimitExceeded)
                } else {
                    answer
                };
            }
            match self
                .ctx
                .balancer
                .admit(&self.forward.backend, self.destination, Admit::Retry)
            {
                Ok(p) => retry_permit = Some(p),
                // `maxRetries` is full: the last answer stands, flagged `UO` (Envoy).
                Err(Overflow) => return with_flag(answer, Flag::UpstreamOverflow),
            }
            drop(answer);
            retries += 1;
            let wait = Instant::now() + retry::backoff(retry, retries);
            match deadline {
                Some(d) if d <= wait => {
                    tokio::time::sleep_until(d).await;
                    return Forwarded::Local(LocalAnswer::timeout(Some(addr)));
                }
                _ => tokio::time::sleep_until(wait).await,
            }
            debug!(retry = retries, previous = %addr, "retrying");
        }
    }
}

/// `answer` with `flag` added after its cause.
fn with_flag(answer: Forwarded, flag: Flag) -> Forwarded {
    match answer {
        Forwarded::Response {
            resp,
            in_flight,
            set_cookie,
            upstream,
            ..
        } => Forwarded::Response {
            resp,
            in_flight,
            set_cookie,
            upstream,
            flag: Some(flag),
        },
        Forwarded::Local(l) => Forwarded::Local(LocalAnswer {
            extra: Some(flag),
            ..l
        }),
    }
}
