//! Circuit breakers: the counters a DestinationRule's `connectionPool` limits, per destination
//! (Envoy's cluster) per waypoint, never per endpoint — requests and retries in flight
//! (`http2MaxRequests`, `maxRetries`: [`Circuits::admit`]) and upstream connections with the
//! requests waiting for one (`maxConnections`, `http1MaxPendingRequests`: [`Slots`]).
//!
//! Owns only counting and refusing; which limit is configured comes from the
//! [`ConnectionPool`] passed in on each call (so a config change applies to the next request),
//! and the connections themselves are `upstream`'s. Overflow is answered by the caller
//! (503 `UO`, `x-envoy-overloaded`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use meshcore::route::resilience::ConnectionPool;
use tokio::sync::Notify;

use crate::balance::{Admit, Overflow};
use crate::routing::Backend;

/// Requests and retries in flight per destination.
#[derive(Default)]
pub struct Circuits {
    per_destination: Mutex<HashMap<Backend, Arc<InFlight>>>,
}

#[derive(Default)]
struct InFlight {
    requests: AtomicU32,
    retries: AtomicU32,
}

/// One admitted request or retry, counted until dropped.
pub struct Admitted {
    counters: Arc<InFlight>,
    what: Admit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.counter().fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admitted {
    fn counter(&self) -> &AtomicU32 {
        match self.what {
            Admit::Request => &self.counters.requests,
            Admit::Retry => &self.counters.retries,
        }
    }
}

impl Circuits {
    /// Counts `what` against `backend`'s limit for it; `Err` when that many are in flight already.
    pub fn admit(
        &self,
        backend: &Backend,
        pool: &ConnectionPool,
        what: Admit,
    ) -> Result<Admitted, Overflow> {
        let limit = match what {
            Admit::Request => pool.max_requests,
            Admit::Retry => pool.max_retries,
        };
        let counters = {
            let mut m = self
                .per_destination
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            m.entry(backend.clone()).or_default().clone()
        };
        let counter = match what {
            Admit::Request => &counters.requests,
            Admit::Retry => &counters.retries,
        };
        // Increment only below the limit, so a refused request never counts, even briefly.
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| Overflow)?;
        Ok(Admitted { counters, what })
    }

    /// Requests and retries in flight per destination, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let m = self
            .per_destination
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.iter()
            .map(|(b, c)| {
                serde_json::json!({
                    "destination": format!("{b:?}"),
                    "requests": c.requests.load(Ordering::Acquire),
                    "retries": c.retries.load(Ordering::Acquire),
                })
            })
            .collect()
    }
}

/// The upstream connections of one destination and the requests waiting for one.
#[derive(Default)]
pub struct Slots {
    counts: Mutex<Counts>,
    /// Woken whenever a connection closes or goes idle: waiters look again.
    changed: Notify,
}

#[derive(Default)]
struct Counts {
    open: u32,
    per_endpoint: HashMap<SocketAddr, u32>,
    pending: u32,
}

/// One open (or opening) connection, counted until dropped.
pub struct ConnSlot {
    slots: Arc<Slots>,
    endpoint: SocketAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        {
            let mut c = self.slots.lock();
            c.open = c.open.saturating_sub(1);
            if let Some(n) = c.per_endpoint.get_mut(&self.endpoint) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_endpoint.remove(&self.endpoint);
                }
            }
        }
        self.slots.changed.notify_waiters();
    }
}

/// One request waiting for a connection, counted until dropped.
pub struct Waiting(Arc<Slots>);

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut c = self.0.lock();
        c.pending = c.pending.saturating_sub(1);
    }
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection to `endpoint`, if `maxConnections` allows one. Like Envoy,
    /// an endpoint with no connection at all may always open one, so a request picked for it
    /// is never stuck behind other endpoints' connections.
    pub fn open(self: &Arc<Self>, endpoint: SocketAddr, max: u32) -> Option<ConnSlot> {
        let mut c = self.lock();
        let mine = c.per_endpoint.get(&endpoint).copied().unwrap_or(0);
        if c.open >= max && mine > 0 {
            return None;
        }
        c.open += 1;
        *c.per_endpoint.entry(endpoint).or_default() += 1;
        Some(ConnSlot {
            slots: self.clone(),
            endpoint,
        })
    }

    /// A place in the queue of requests waiting for a connection (`http1MaxPendingRequests`).
    pub fn wait(self: &Arc<Self>, max: u32) -> Result<Waiting, Overflow> {
        let mut c = self.lock();
        if c.pending >= max {
            return Err(Overflow);
        }
        c.pending += 1;
        Ok(Waiting(self.clone()))
    }

    /// Resolves after the next [`Slots::released`]; create it before looking, so no wake-up
    /// between looking and waiting is lost.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// A connection went idle: wake the waiters.
    pub fn released(&self) {
        self.changed.notify_waiters();
    }

    /// (open connections, waiting requests), for `/config_dump` and tests.
    pub fn counts(&self) -> (u32, u32) {
        let c = self.lock();
        (c.open, c.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(f: impl FnOnce(&mut ConnectionPool)) -> ConnectionPool {
        let mut p = ConnectionPool::default();
        f(&mut p);
        p
    }

    fn backend() -> Backend {
        Backend::Service {
            service: "app/web".into(),
            port: 80,
            subset: None,
        }
    }

    #[test]
    fn requests_are_admitted_up_to_the_limit_and_again_once_one_ends() {
        let c = Circuits::default();
        let p = pool(|p| p.max_requests = 2);
        let a = c.admit(&backend(), &p, Admit::Request).unwrap();
        let _b = c.admit(&backend(), &p, Admit::Request).unwrap();
        assert!(c.admit(&backend(), &p, Admit::Request).is_err());
        // Retries have their own limit (unlimited here), destinations their own counters.
        let _r = c.admit(&backend(), &p, Admit::Retry).unwrap();
        let other = Backend::Address(SocketAddr::from(([10, 0, 0, 1], 80)));
        let _o = c.admit(&other, &p, Admit::Request).unwrap();
        drop(a);
        let _c = c.admit(&backend(), &p, Admit::Request).unwrap();
        assert!(c.admit(&backend(), &p, Admit::Request).is_err());
    }

    #[test]
    fn retries_in_flight_are_limited_by_max_retries() {
        let c = Circuits::default();
        let p = pool(|p| p.max_retries = 1);
        let r = c.admit(&backend(), &p, Admit::Retry).unwrap();
        assert!(c.admit(&backend(), &p, Admit::Retry).is_err());
        let _q = c.admit(&backend(), &p, Admit::Request).unwrap();
        drop(r);
        assert!(c.admit(&backend(), &p, Admit::Retry).is_ok());
        // maxRetries 0: no retry is ever admitted.
        let p = pool(|p| p.max_retries = 0);
        assert!(c.admit(&backend(), &p, Admit::Retry).is_err());
    }

    #[test]
    fn connections_are_limited_per_destination_but_each_endpoint_may_have_one() {
        let s = Arc::new(Slots::default());
        let (a, b) = (
            SocketAddr::from(([10, 0, 0, 1], 80)),
            SocketAddr::from(([10, 0, 0, 2], 80)),
        );
        let a1 = s.open(a, 1).unwrap();
        assert!(s.open(a, 1).is_none());
        // b has none: it may open one past the limit.
        let b1 = s.open(b, 1).unwrap();
        assert!(s.open(b, 1).is_none());
        assert_eq!(s.counts().0, 2);
        drop(a1);
        drop(b1);
        assert_eq!(s.counts().0, 0);
        let _a2 = s.open(a, 2).unwrap();
        let _a3 = s.open(a, 2).unwrap();
        assert!(s.open(a, 2).is_none());
    }

    #[test]
    fn pending_requests_are_limited() {
        let s = Arc::new(Slots::default());
        let w = s.wait(1).unwrap();
        assert!(s.wait(1).is_err());
        drop(w);
        assert!(s.wait(1).is_ok());
        assert!(s.wait(0).is_err());
    }
}
