//! Draining: the connections a stopping ztunnel still serves, and the signal that it is stopping.
//!
//! A stop is usually a restart (a DaemonSet rollout): the next ztunnel binds the same in-pod
//! ports next to ours (SO_REUSEPORT) and takes new connections, while this one closes its
//! listeners and finishes what it already serves — HBONE clients get a GOAWAY so their pools
//! move new streams to the next ztunnel — until nothing is left or the drain timeout ends.
//! Owns the count and the signal; what a connection does when told is its handler's business.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

#[derive(Debug)]
pub struct Drain {
    active: AtomicUsize,
    idle: Notify,
    stopping: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            stopping: watch::Sender::new(false),
        }
    }
}

/// Counts one accepted connection until dropped.
#[derive(Debug)]
pub struct Tracked(Arc<Drain>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Counts a connection as in flight for as long as the returned guard lives.
    pub fn track(self: &Arc<Self>) -> Tracked {
        self.active.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    /// Connections in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves once the stop began (at once if it already has).
    pub async fn stopping(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Tells every connection that ztunnel is stopping, then waits until none is left or
    /// `timeout` passes. Returns how many were still open.
    pub async fn stop(&self, timeout: Duration) -> usize {
        self.stopping.send_replace(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register before checking, so a last connection ending in between still wakes us.
            let idle = self.idle.notified();
            if self.active() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.active();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_waits_for_the_last_connection_or_the_timeout() {
        let drain = Arc::new(Drain::default());
        assert_eq!(drain.stop(Duration::from_millis(1)).await, 0);

        let drain = Arc::new(Drain::default());
        let a = drain.track();
        let b = drain.track();
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.stop(Duration::from_secs(30)).await }
        });
        drain.stopping().await;
        drop(a);
        assert_eq!(drain.active(), 1);
        drop(b);
        assert_eq!(waiter.await.unwrap(), 0);

        let drain = Arc::new(Drain::default());
        let _held = drain.track();
        assert_eq!(drain.stop(Duration::from_millis(20)).await, 1);
    }
}
