//! Admission of what peers can make a server hold: a [`Gate`] counts things in flight (open
//! connections, handshakes) per source IP and in total and refuses past either cap; a
//! [`Throttle`] lets one log line through per period for events a peer can cause at will, and
//! counts the rest.
//!
//! Shared by every binary that accepts connections from peers it does not trust yet (ztunnel's
//! listeners and admin servers, meshd's API). Owns the counting only: the caps' values and what
//! to do on refusal are the caller's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::store::canonical;

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
}
