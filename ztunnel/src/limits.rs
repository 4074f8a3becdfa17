//! Caps on what peers can make ztunnel hold, and rate-limited logging of what they can cause
//! at will.
//!
//! Owns the counting: [`Gate`] (things in flight per source IP and in total), [`Limits`] (the
//! node's caps, sized from the open-files limit), [`Admission`] (the node's gates and
//! throttles, in [`crate::proxy::Ctx`]) and [`Throttle`] (one log line per period, the rest
//! counted). Where the caps apply is the accept loops' business ([`crate::proxy`],
//! [`crate::inbound`], [`crate::admin`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meshcore::store::canonical;

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

/// Why a [`Gate`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("{0} in flight from this source (the per-source cap)")]
    Source(usize),
    #[error("{0} in flight in total (the node's cap)")]
    Total(usize),
}

/// Counts things in flight per source IP and in total, refusing past either cap.
pub struct Gate {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl Gate {
    pub fn new(max_total: usize, max_per_source: usize) -> Gate {
        Gate {
            max_total,
            max_per_source,
            state: Mutex::default(),
        }
    }

    /// Counts one more from `source`, until the returned pass is dropped.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> Result<Pass, Full> {
        let source = canonical(source);
        let mut state = self.lock();
        if state.total >= self.max_total {
            return Err(Full::Total(state.total));
        }
        let n = state.by_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return Err(Full::Source(*n));
        }
        *n += 1;
        state.total += 1;
        Ok(Pass {
            gate: Arc::clone(self),
            source,
        })
    }

    /// How many are in flight in total.
    pub fn in_flight(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // Plain counters: still usable after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One admitted thing; leaving is dropping it.
pub struct Pass {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.total = state.total.saturating_sub(1);
        if let Some(n) = state.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                state.by_source.remove(&self.source);
            }
        }
    }
}

/// Lets one log line through per period and counts the rest, for events a peer can cause at
/// will (each would otherwise be a line: a log flood is a disk and CPU attack of its own).
pub struct Throttle {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub fn new(period: Duration) -> Throttle {
        Throttle {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// Records one event: `Some(n)` when a line may be written now (`n` events were
    /// suppressed since the last one), `None` when it should be counted silently.
    pub fn hit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, suppressed) = &mut *state;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.period) {
            *suppressed += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_caps_per_source_and_in_total_and_frees_on_drop() {
        let gate = Arc::new(Gate::new(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let a_mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let p1 = gate.enter(a).unwrap();
        let _p2 = gate.enter(a_mapped).unwrap();
        assert_eq!(gate.enter(a).err(), Some(Full::Source(2)));
        let _p3 = gate.enter(b).unwrap();
        assert_eq!(gate.enter(c).err(), Some(Full::Total(3)));
        drop(p1);
        assert_eq!(gate.in_flight(), 2);
        let _p4 = gate.enter(c).unwrap();
    }

    #[test]
    fn throttle_lets_one_line_per_period_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.hit(), Some(0));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
        let t = Throttle::new(Duration::ZERO);
        assert_eq!(t.hit(), Some(0));
        assert_eq!(t.hit(), Some(0));
    }

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
}
