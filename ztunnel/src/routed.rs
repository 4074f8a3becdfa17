//! Connections routed to each destination pod, counted from the routing decision until the
//! connection ends: what a pod that is leaving still owes its clients.
//!
//! A pod removed from the config gets no new connections, but one routed to it a moment before
//! may still be opening its stream. The config dump lists these counts, so whoever stops pods
//! (local mode's kubelet; in Kubernetes a preStop hook would wait the same way) can wait until
//! no ztunnel has a connection routed to the pod, instead of guessing how long to wait.
//!
//! Owns the counts; not the routing (`crate::outbound`) nor the connections themselves.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

/// Per destination pod (its uid, "ns/name"): connections routed to it and not yet ended.
#[derive(Debug, Default)]
pub struct Routed {
    counts: Mutex<HashMap<Arc<str>, u32>>,
}

/// One connection routed to a pod; dropping it ends the count.
#[derive(Debug)]
pub struct RoutedGuard {
    routed: Arc<Routed>,
    uid: Arc<str>,
}

impl Routed {
    /// Counts one connection routed to `uid` until the guard is dropped.
    pub fn enter(self: &Arc<Self>, uid: &str) -> RoutedGuard {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let uid = match counts.get_key_value(uid) {
            Some((k, _)) => k.clone(),
            None => Arc::from(uid),
        };
        *counts.entry(uid.clone()).or_default() += 1;
        RoutedGuard {
            routed: self.clone(),
            uid,
        }
    }

    /// The pods with connections routed to them, and how many (by uid, sorted).
    pub fn snapshot(&self) -> BTreeMap<String, u32> {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }
}

impl Drop for RoutedGuard {
    fn drop(&mut self) {
        let mut counts = self
            .routed
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Gone pods leave nothing behind.
                counts.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_listed_while_a_connection_is_routed_to_it_and_not_after() {
        let r = Arc::new(Routed::default());
        let a1 = r.enter("ns/a");
        let a2 = r.enter("ns/a");
        let b = r.enter("ns/b");
        let counts = |c: &[(&str, u32)]| -> BTreeMap<String, u32> {
            c.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        assert_eq!(r.snapshot(), counts(&[("ns/a", 2), ("ns/b", 1)]));
        drop(a1);
        drop(b);
        assert_eq!(r.snapshot(), counts(&[("ns/a", 1)]));
        drop(a2);
        assert!(r.snapshot().is_empty());
    }
}
