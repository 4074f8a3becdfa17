//! The attempts of one forwarded request: pick an endpoint, send, and retry as the route's
//! policy says — 1 + `attempts` tries at most, each within `perTryTimeout`, all of them and
//! their backoff within the route's `timeout` (504 `upstream request timeout`, `UT`, never
//! retried), retries preferring untried endpoints and admitted under `maxRetries`, each
//! attempt's outcome reported to the balancer. Both timeouts run, as Envoy's, from the end of
//! the client's request (or the retry's start) to the end of the response: the answer carries
//! a timer its body must beat (`pipeline` enforces it).
//!
//! Owns the loop and the answers it makes; `retry` decides what is retriable, how long to
//! back off and keeps the body; `pipeline` does everything before and after.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use meshcore::route::DestinationPolicy;
use meshcore::route::lb::HashRequest;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

use crate::app::Ctx;
use crate::balance::{Admit, Endpoint, InFlight, Outcome, Overflow, Permit};
use crate::retry::{self, Failure, Tee};
use crate::routing::{Forward, Router};
use crate::telemetry::{Flag, RequestBody};
use crate::upstream::{self, Body, UpstreamError};

/// A request's body for its attempts.
pub(crate) enum AttemptBody {
    /// Kept for replay while it fits the buffer.
    Kept(Tee),
    /// Sent as it comes, once (upgrades).
    Once(Option<RequestBody>),
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
pub(crate) struct Attempts<'a> {
    pub ctx: &'a Ctx,
    pub router: &'a Router,
    pub forward: &'a Forward,
    pub endpoints: &'a [Endpoint],
    pub hash: &'a HashRequest<'a>,
    pub destination: &'a DestinationPolicy,
    pub version: upstream::Version,
}

/// How the attempts ended.
pub(crate) enum Forwarded {
    /// An endpoint's response, to pass on.
    Response {
        resp: Response<Incoming>,
        in_flight: InFlight,
        set_cookie: Option<String>,
        upstream: SocketAddr,
        /// `URX` (retries used up on a retriable status) or `UO` (`maxRetries` full).
        flag: Option<Flag>,
        /// Fires when the response must have ended: the route timeout or the attempt's
        /// `perTryTimeout`, whichever comes first (both span the whole response in Envoy).
        expires: Option<oneshot::Receiver<()>>,
    },
    /// An answer made here.
    Local(LocalAnswer),
}

pub(crate) struct LocalAnswer {
    pub status: StatusCode,
    pub text: &'static str,
    pub flag: Flag,
    /// `URX` or `UO` after the cause, as Envoy lists them (`UF,URX`).
    pub extra: Option<Flag>,
    pub error: Option<String>,
    pub upstream: Option<SocketAddr>,
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
    pub async fn run(&self, head: &http::request::Parts, mut body: AttemptBody) -> Forwarded {
        let policy = &self.forward.policy;
        let retry = &policy.retry;
        let start = Instant::now();
        let tee = match &body {
            AttemptBody::Kept(t) => Some(t.clone()),
            AttemptBody::Once(_) => None,
        };
        let route_expiry = || policy.timeout.map(|t| expiry(tee.clone(), start, t));
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
            let try_start = Instant::now();
            let try_expiry = || {
                retry
                    .per_try_timeout
                    .map(|t| expiry(tee.clone(), try_start, t))
            };
            let send =
                self.ctx
                    .upstream
                    .send(&picked.endpoint, self.version, req, &self.destination.pool);
            // Which limit ends this attempt: the route's (504, final) or its own (retriable).
            let mut route_limit = false;
            let sent = tokio::select! {
                biased;
                sent = send => Some(sent),
                () = maybe(route_expiry()) => {
                    route_limit = true;
                    None
                }
                () = maybe(try_expiry()) => None,
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
                        expires: watchdog(route_expiry(), try_expiry()),
                    };
                    (retriable, answer)
                }
                // Never reached the endpoint: not its fault, and Envoy never retries it.
                Some(Err(UpstreamError::Overflow(_))) => {
                    return Forwarded::Local(LocalAnswer {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        text: crate::local_reply::OVERFLOW_TEXT,
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
            let wait = tokio::time::sleep(retry::backoff(retry, retries));
            tokio::select! {
                biased;
                () = maybe(route_expiry()) => {
                    return Forwarded::Local(LocalAnswer::timeout(Some(addr)));
                }
                () = wait => {}
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
            expires,
            ..
        } => Forwarded::Response {
            resp,
            in_flight,
            set_cookie,
            upstream,
            flag: Some(flag),
            expires,
        },
        Forwarded::Local(l) => Forwarded::Local(LocalAnswer {
            extra: Some(flag),
            ..l
        }),
    }
}

/// A timeout that runs from when the client's request ended (Envoy starts its route and
/// per-try timers there, so a streaming request is not cut while the client still sends) or
/// from `start`, if later (a retry). A body sent once (an upgrade) counts as ended at `start`.
type Expiry = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

fn expiry(tee: Option<Tee>, start: Instant, timeout: Duration) -> Expiry {
    Box::pin(async move {
        let ended = match tee {
            Some(t) => t.ended_at().await,
            None => start,
        };
        tokio::time::sleep_until(ended.max(start) + timeout).await;
    })
}

/// `expiry`, or never.
async fn maybe(expiry: Option<Expiry>) {
    match expiry {
        Some(e) => e.await,
        None => std::future::pending().await,
    }
}

/// A receiver that fires at the first of two expiries (none if neither is set); the timer
/// task ends early once the receiver is dropped (the response ended).
fn watchdog(a: Option<Expiry>, b: Option<Expiry>) -> Option<oneshot::Receiver<()>> {
    if a.is_none() && b.is_none() {
        return None;
    }
    let (mut tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        tokio::select! {
            () = maybe(a) => {}
            () = maybe(b) => {}
            () = tx.closed() => return,
        }
        let _ = tx.send(());
    });
    Some(rx)
}
