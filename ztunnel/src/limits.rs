//! Caps on what peers can make ztunnel hold, and rate-limited logging of what they can cause
//! at will.
//!
//! Owns ztunnel's values: [`Limits`] (the node's caps, sized from the open-files limit) and
//! [`Admission`] (the node's gates and throttles, in [`crate::proxy::Ctx`]). The counting
//! itself — [`Gate`] (things in flight per source IP and in total) and [`Throttle`] (one log
//! line per period, the rest counted) — is `meshcore::admission`, shared with meshd. Where the
//! caps apply is the accept loops' business ([`crate::proxy`], [`crate::inbound`],
//! [`crate::admin`]).

use std::sync::Arc;
use std::time::Duration;

pub use meshcore::admission::{Full, Gate, Pass, Throttle};

/// At most one line per this period for each kind of event peers can trigger at will.
pub const LOG_PERIOD: Duration = Duration::from_secs(10);

/// Caps on what peers can make ztunnel hold at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Accepted connections in flight on all listeners (outbound, plaintext, HBONE).
    pub max_connections: usize,
    /// Of those, from one source IP (an HBONE peer node's pod, a plaintext client, or the
    /// enrolled pod itself for outbound).
    pub max_connections_per_source: usize,
    /// HBONE TLS + HTTP/2 handshakes in flight: peers not yet authenticated.
    pub max_handshakes: usize,
    /// Of those, from one source IP.
    pub max_handshakes_per_source: usize,
}

impl Limits {
    /// Sized for `open_files` descriptors: a proxied connection holds about two (client and
    /// app or tunnel), so connections get 40% of them, leaving the rest for HBONE pool
    /// connections, listeners and the admin servers; one source gets a quarter of that, and
    /// handshakes (cheap to start, costly to finish) at most 1024, 64 per source.
    pub fn for_open_files(open_files: u64) -> Limits {
        let fds = usize::try_from(open_files).unwrap_or(usize::MAX);
        let max_connections = (fds / 5 * 2).max(256);
        let max_handshakes = max_connections.min(1024);
        Limits {
            max_connections,
            max_connections_per_source: (max_connections / 4).max(64),
            max_handshakes,
            max_handshakes_per_source: (max_handshakes / 16).max(16),
        }
    }
}

impl Limits {
    /// These limits with the connection caps an operator set in place of the sized ones: a
    /// node cap alone keeps a quarter of it per source; a per-source cap never exceeds the
    /// node's. Handshake caps stay as sized.
    pub fn with_connection_caps(self, total: Option<u64>, per_source: Option<u64>) -> Limits {
        let cap = |v: u64| usize::try_from(v).unwrap_or(usize::MAX).max(1);
        let max_connections = total.map_or(self.max_connections, cap);
        let default_per_source = match total {
            Some(_) => (max_connections / 4).max(1),
            None => self.max_connections_per_source,
        };
        Limits {
            max_connections,
            max_connections_per_source: per_source
                .map_or(default_per_source, cap)
                .min(max_connections),
            ..self
        }
    }
}

impl Default for Limits {
    /// [`Limits::for_open_files`] of this process's soft open-files limit (read when called:
    /// after main raised it), or of 1024 if it cannot be read.
    fn default() -> Limits {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        Limits::for_open_files(soft)
    }
}

/// The node's caps ([`Limits`]) and the throttles of what they refuse.
pub struct Admission {
    /// Accepted connections in flight.
    pub connections: Arc<Gate>,
    /// HBONE handshakes in flight.
    pub handshakes: Arc<Gate>,
    /// Connections closed over [`Admission::connections`].
    pub connections_refused: Throttle,
    /// HBONE connections closed over [`Admission::handshakes`].
    pub handshakes_refused: Throttle,
    /// HBONE handshakes that failed before the peer authenticated.
    pub handshakes_failed: Throttle,
    /// Accept errors of every listener.
    pub accept_errors: Throttle,
}

impl Admission {
    pub fn new(limits: &Limits) -> Admission {
        Admission {
            connections: Arc::new(Gate::new(
                limits.max_connections,
                limits.max_connections_per_source,
            )),
            handshakes: Arc::new(Gate::new(
                limits.max_handshakes,
                limits.max_handshakes_per_source,
            )),
            connections_refused: Throttle::new(LOG_PERIOD),
            handshakes_refused: Throttle::new(LOG_PERIOD),
            handshakes_failed: Throttle::new(LOG_PERIOD),
            accept_errors: Throttle::new(LOG_PERIOD),
        }
    }
}

impl Default for Admission {
    fn default() -> Admission {
        Admission::new(&Limits::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_fit_the_open_files_limit() {
        let l = Limits::for_open_files(20_000);
        assert_eq!(l.max_connections, 8_000);
        assert_eq!(l.max_connections_per_source, 2_000);
        assert_eq!(l.max_handshakes, 1_024);
        assert_eq!(l.max_handshakes_per_source, 64);
        let small = Limits::for_open_files(100);
        assert!(small.max_connections >= 256 && small.max_handshakes <= small.max_connections);
    }

    #[test]
    fn connection_caps_set_by_the_operator_replace_the_sized_ones() {
        let sized = Limits::for_open_files(20_000);
        assert_eq!(sized.clone().with_connection_caps(None, None), sized);
        let both = sized
            .clone()
            .with_connection_caps(Some(16_000), Some(12_000));
        assert_eq!(
            (both.max_connections, both.max_connections_per_source),
            (16_000, 12_000)
        );
        assert_eq!(both.max_handshakes, sized.max_handshakes);
        let total = sized.clone().with_connection_caps(Some(40_000), None);
        assert_eq!(total.max_connections_per_source, 10_000);
        let per_source = sized.clone().with_connection_caps(None, Some(5_000));
        assert_eq!(
            (
                per_source.max_connections,
                per_source.max_connections_per_source
            ),
            (8_000, 5_000)
        );
        // One source never gets more than the node.
        let over = sized.with_connection_caps(Some(100), Some(5_000));
        assert_eq!(over.max_connections_per_source, 100);
    }
}
