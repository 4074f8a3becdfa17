//! VirtualService fault injection: which faults one request gets, and the abort's answer.
//!
//! Delay and abort are drawn independently, each with its own percentage (istio-semantics.md);
//! the delay comes first, then the abort. Owns only that choice and the answer's shape; the
//! pipeline sleeps, answers and flags the record (`DI`, `FI`). Touches no connection.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use meshcore::route::resilience::{AbortStatus, Fault};
use rand::Rng;

/// The faults drawn for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    pub delay: Option<Duration>,
    pub abort: Option<AbortStatus>,
}

/// Envoy's body for an injected abort.
pub const ABORT_TEXT: &str = "fault filter abort";

/// Draws the faults of one request.
pub fn draw(fault: &Fault) -> Injected {
    let mut rng = rand::rng();
    Injected {
        delay: fault
            .delay
            .as_ref()
            .filter(|d| hit(&mut rng, d.percent))
            .map(|d| d.fixed),
        abort: fault
            .abort
            .as_ref()
            .filter(|a| hit(&mut rng, a.percent))
            .map(|a| a.status),
    }
}

/// True with probability `percent`/100 (0 never, 100 always).
pub fn hit(rng: &mut impl Rng, percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rng.random::<f64>() * 100.0 < percent)
}

/// The answer to an aborted request: status, headers and body text. A gRPC abort is Envoy's
/// trailers-only gRPC response: HTTP 200 with `grpc-status` in the headers and no body.
pub fn answer(abort: AbortStatus) -> (StatusCode, HeaderMap, &'static str) {
    match abort {
        AbortStatus::Http(code) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            HeaderMap::new(),
            ABORT_TEXT,
        ),
        AbortStatus::Grpc(code) => {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static(ABORT_TEXT));
            (StatusCode::OK, h, "")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_bound_the_draw() {
        let mut rng = rand::rng();
        assert!((0..1000).all(|_| hit(&mut rng, 100.0)));
        assert!((0..1000).all(|_| !hit(&mut rng, 0.0)));
        let n = (0..10_000).filter(|_| hit(&mut rng, 50.0)).count();
        // 6 sigma of Binomial(10000, 0.5) is 300.
        assert!((4700..=5300).contains(&n), "{n}");
    }

    #[test]
    fn grpc_abort_is_trailers_only_200() {
        let (status, h, body) = answer(AbortStatus::Grpc(14));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["content-type"], "application/grpc");
        assert!(body.is_empty());
        let (status, _, body) = answer(AbortStatus::Http(418));
        assert_eq!(status.as_u16(), 418);
        assert_eq!(body, ABORT_TEXT);
    }
}
