//! Whether an attempt is retried, how long to wait before the next one, and the request body
//! that makes a retry possible.
//!
//! Owns Envoy's `retry_on` classification (as Istio passes it through: istio-semantics.md),
//! its full-jitter exponential backoff, and [`Tee`]: the request body streamed to the current
//! attempt while a copy is kept, up to [`REQUEST_BUFFER_LIMIT`], for the next attempt and for
//! mirrors. The attempt loop itself is `pipeline`'s; this module sends nothing.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body as _, Frame, SizeHint};
use meshcore::route::resilience::{RetryOn, RetryPolicy};
use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::upstream::UpstreamError;

/// Bytes of request body kept for a retry or a mirror: Envoy's default per-request buffer
/// limit (the listener's `per_connection_buffer_limit_bytes`, 1 MiB). A longer body streams to
/// the first attempt only: it is never retried nor mirrored, since it could not be replayed.
pub const REQUEST_BUFFER_LIMIT: usize = 1 << 20;

/// How one attempt failed without a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection (HBONE or TCP) could not be made.
    Connect,
    /// HTTP/2 REFUSED_STREAM: the endpoint did not process the request.
    RefusedStream,
    /// The connection or stream ended before a response.
    Reset,
    /// The attempt's `perTryTimeout` expired.
    PerTryTimeout,
}

impl Failure {
    /// What became of a failed send.
    pub fn of(e: &UpstreamError) -> Failure {
        match e {
            UpstreamError::Request(_, err) if is_refused_stream(err) => Failure::RefusedStream,
            UpstreamError::Request(..) => Failure::Reset,
            _ => Failure::Connect,
        }
    }
}

fn is_refused_stream(err: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = e.source();
    }
    false
}

/// Whether `retry_on` retries a response with this status and headers (`grpc-status` in
/// the headers: a trailers-only gRPC answer).
pub fn retries_status(on: &RetryOn, status: u16, headers: &HeaderMap) -> bool {
    if on.five_xx && status >= 500
        || on.gateway_error && matches!(status, 502..=504)
        || on.retriable_4xx && status == 409
        || on.status_codes.contains(&status)
    {
        return true;
    }
    let grpc = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    match grpc {
        Some(1) => on.grpc.cancelled,
        Some(4) => on.grpc.deadline_exceeded,
        Some(8) => on.grpc.resource_exhausted,
        Some(13) => on.grpc.internal,
        Some(14) => on.grpc.unavailable,
        _ => false,
    }
}

/// Whether `retry_on` retries an attempt that ended without a response. `5xx` and
/// `gateway-error` include every such failure, a timed-out attempt too (Envoy's router docs).
pub fn retries_failure(on: &RetryOn, failure: Failure) -> bool {
    if on.five_xx || on.gateway_error || on.reset {
        return true;
    }
    match failure {
        Failure::Connect => on.connect_failure,
        Failure::RefusedStream => on.refused_stream,
        Failure::Reset | Failure::PerTryTimeout => false,
    }
}

/// The wait before retry `n` (1 for the first retry): uniform in [0, (2^n − 1) × base),
/// the bound capped at 10 × base (Envoy's fully jittered exponential backoff).
pub fn backoff(policy: &RetryPolicy, n: u32) -> Duration {
    let base = policy.backoff_base;
    let factor = 2u32.saturating_pow(n.min(31)).saturating_sub(1).max(1);
    let bound = base.saturating_mul(factor).min(base.saturating_mul(10));
    if bound.is_zero() {
        return Duration::ZERO;
    }
    let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..nanos))
}

/// A request body shared by the attempts of one request: the current attempt pulls from the
/// client, every frame is kept (while the total stays within the limit) so a later attempt or
/// a mirror can replay it. Nothing is read ahead of the upstream's demand, so streaming
/// requests (gRPC, chunked uploads) flow exactly as without retries.
#[derive(Clone)]
pub struct Tee {
    state: Arc<Mutex<TeeState>>,
    /// Woken when the body ends, fails or outgrows the limit (mirrors wait for that).
    settled: Arc<Notify>,
}

enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

struct TeeState {
    source: Option<crate::telemetry::RequestBody>,
    kept: Vec<Kept>,
    kept_bytes: usize,
    limit: usize,
    /// More than `limit` bytes came: `kept` is gone and the body cannot be replayed.
    overflowed: bool,
    /// The client's body failed.
    failed: bool,
    ended: bool,
    /// When the client's body ended or failed: Envoy's route timeout starts there.
    ended_at: Option<Instant>,
    /// Only this attempt may pull from the client; an abandoned one waits forever.
    current: u32,
    hint: SizeHint,
}

impl Tee {
    pub fn new(body: crate::telemetry::RequestBody, limit: usize) -> Tee {
        let ended = body.is_end_stream();
        let hint = body.size_hint();
        Tee {
            state: Arc::new(Mutex::new(TeeState {
                source: (!ended).then_some(body),
                kept: Vec::new(),
                kept_bytes: 0,
                limit,
                overflowed: false,
                failed: false,
                ended,
                ended_at: ended.then(Instant::now),
                current: 0,
                hint,
            })),
            settled: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TeeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a new attempt could send the whole body again.
    pub fn replayable(&self) -> bool {
        let s = self.lock();
        !s.overflowed && !s.failed
    }

    /// The body for the next attempt (replaying what was kept, then continuing from the
    /// client); earlier attempts' bodies stop being fed. `None` if it cannot be replayed.
    pub fn attempt(&self) -> Option<Replay> {
        let mut s = self.lock();
        if s.overflowed || s.failed {
            return None;
        }
        s.current += 1;
        Some(Replay {
            tee: self.clone(),
            attempt: s.current,
            pos: 0,
        })
    }

    /// When the client finished sending the body (or it failed), once it has.
    pub async fn ended_at(&self) -> Instant {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(t) = self.lock().ended_at {
                return t;
            }
            notified.await;
        }
    }

    /// The whole body once the client has sent it, if it fitted the limit (for mirrors).
    pub async fn complete(&self) -> Option<Vec<Frame<Bytes>>> {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.lock();
                if s.overflowed || s.failed {
                    return None;
                }
                if s.ended {
                    return Some(s.kept.iter().map(Kept::frame).collect());
                }
            }
            notified.await;
        }
    }
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Kept::Data(b) => Frame::data(b.clone()),
            Kept::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

/// One attempt's request body (see [`Tee`]).
pub struct Replay {
    tee: Tee,
    attempt: u32,
    /// Next kept frame to replay.
    pos: usize,
}

impl hyper::body::Body for Replay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let tee = self.tee.clone();
        let mut s = tee.lock();
        if s.current != self.attempt {
            // Abandoned: ending it would hand the old endpoint a truncated request as if it
            // were whole; it is reset when hyper drops it.
            return Poll::Pending;
        }
        if !s.overflowed
            && let Some(k) = s.kept.get(self.pos)
        {
            let frame = k.frame();
            self.pos += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(source).poll_frame(cx);
        let settled = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let kept = if let Some(d) = frame.data_ref() {
                    s.kept_bytes = s.kept_bytes.saturating_add(d.len());
                    Some(Kept::Data(d.clone()))
                } else {
                    frame.trailers_ref().map(|t| Kept::Trailers(t.clone()))
                };
                let mut settled = if s.overflowed {
                    false
                } else if s.kept_bytes > s.limit {
                    s.overflowed = true;
                    s.kept = Vec::new();
                    true
                } else {
                    s.kept.extend(kept);
                    self.pos = s.kept.len();
                    false
                };
                // hyper stops polling a body that says it has ended (Content-Length reached).
                if s.source.as_ref().is_some_and(|b| b.is_end_stream()) {
                    s.ended = true;
                    s.ended_at = Some(Instant::now());
                    s.source = None;
                    settled = true;
                }
                settled
            }
            Poll::Ready(None) => {
                s.ended = true;
                s.ended_at = Some(Instant::now());
                s.source = None;
                true
            }
            Poll::Ready(Some(Err(_))) => {
                s.failed = true;
                s.ended_at = Some(Instant::now());
                s.source = None;
                true
            }
            Poll::Pending => false,
        };
        if settled {
            self.tee.settled.notify_waiters();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let s = self.tee.lock();
        s.current == self.attempt && s.ended && (s.overflowed || self.pos >= s.kept.len())
    }

    fn size_hint(&self) -> SizeHint {
        self.tee.lock().hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcore::route::resilience::GrpcRetryOn;

    fn on(f: impl FnOnce(&mut RetryOn)) -> RetryOn {
        let mut o = RetryOn::default();
        f(&mut o);
        o
    }

    #[test]
    fn status_conditions_follow_envoy() {
        let h = HeaderMap::new();
        let five = on(|o| o.five_xx = true);
        assert!(retries_status(&five, 500, &h) && retries_status(&five, 503, &h));
        assert!(!retries_status(&five, 409, &h));
        let gw = on(|o| o.gateway_error = true);
        assert!(retries_status(&gw, 502, &h) && retries_status(&gw, 504, &h));
        assert!(!retries_status(&gw, 500, &h));
        let four = on(|o| o.retriable_4xx = true);
        assert!(retries_status(&four, 409, &h) && !retries_status(&four, 404, &h));
        let codes = on(|o| o.status_codes = vec![418]);
        assert!(retries_status(&codes, 418, &h) && !retries_status(&codes, 500, &h));
        let grpc = on(|o| {
            o.grpc = GrpcRetryOn {
                unavailable: true,
                ..GrpcRetryOn::default()
            }
        });
        let mut g = HeaderMap::new();
        g.insert("grpc-status", "14".parse().unwrap());
        assert!(retries_status(&grpc, 200, &g));
        g.insert("grpc-status", "13".parse().unwrap());
        assert!(!retries_status(&grpc, 200, &g));
    }

    #[test]
    fn failure_conditions_follow_envoy() {
        let cf = on(|o| o.connect_failure = true);
        assert!(retries_failure(&cf, Failure::Connect));
        assert!(!retries_failure(&cf, Failure::Reset));
        assert!(!retries_failure(&cf, Failure::PerTryTimeout));
        let rs = on(|o| o.refused_stream = true);
        assert!(retries_failure(&rs, Failure::RefusedStream));
        assert!(!retries_failure(&rs, Failure::Connect));
        for o in [
            on(|o| o.five_xx = true),
            on(|o| o.gateway_error = true),
            on(|o| o.reset = true),
        ] {
            for f in [
                Failure::Connect,
                Failure::RefusedStream,
                Failure::Reset,
                Failure::PerTryTimeout,
            ] {
                assert!(retries_failure(&o, f), "{o:?} {f:?}");
            }
        }
        assert!(!retries_failure(&RetryOn::default(), Failure::Connect));
    }

    #[test]
    fn backoff_is_jittered_below_the_capped_exponential_bound() {
        let p = RetryPolicy::istio_default();
        let base = p.backoff_base;
        for (n, bound) in [(1, base), (2, base * 3), (3, base * 7), (4, base * 10)] {
            let mut max = Duration::ZERO;
            for _ in 0..500 {
                let b = backoff(&p, n);
                assert!(b < bound, "retry {n}: {b:?} ≥ {bound:?}");
                max = max.max(b);
            }
            // Jittered over the whole range, not a fixed wait.
            assert!(max > bound / 2, "retry {n}: max {max:?}");
        }
        assert!(backoff(&p, 40) < base * 10);
    }
}
