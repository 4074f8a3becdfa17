//! Istio's L4 metric families, shared by ztunnel and the waypoint:
//!
//! | exposed name                          | counts                                                    |
//! |---------------------------------------|-----------------------------------------------------------|
//! | `istio_tcp_connections_opened_total`  | connections, when [`TcpMetrics::open`] is called          |
//! | `istio_tcp_connections_closed_total`  | connections, when their [`ConnMetrics`] guard is dropped  |
//! | `istio_tcp_received_bytes_total`      | bytes from the client side (request direction)            |
//! | `istio_tcp_sent_bytes_total`          | bytes to the client side (response direction)             |
//!
//! "Client side" is from the reporter's point of view. prometheus-client appends `_total` to
//! every counter, so counters are registered without it. Owns these four families and the
//! pruning of gone workloads' series; registers them in the binary's registry and does not
//! decide labels ([`crate::telemetry`]) or move bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::telemetry::{TcpLabels, UNKNOWN};

/// The four L4 families. Cheap to share (`Arc`); all byte updates are atomic adds on
/// pre-resolved counters, so the byte path never hashes labels or takes a lock.
pub struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    received_bytes: Family<TcpLabels, Counter>,
    sent_bytes: Family<TcpLabels, Counter>,
    /// Every L4 label set that has series, with how many open connections use it: what
    /// [`TcpMetrics::prune`] may remove (the families cannot be listed). Open connections
    /// share these label sets instead of holding their own (23 strings each).
    series: Mutex<HashMap<Arc<TcpLabels>, usize>>,
}

impl std::fmt::Debug for TcpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpMetrics").finish_non_exhaustive()
    }
}

impl TcpMetrics {
    /// Registers the four families in `registry` (which shares their series).
    pub fn register(registry: &mut Registry) -> Arc<TcpMetrics> {
        let m = TcpMetrics {
            opened: Family::default(),
            closed: Family::default(),
            received_bytes: Family::default(),
            sent_bytes: Family::default(),
            series: Mutex::default(),
        };
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened, as seen by the reporter",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed, as seen by the reporter",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client side of TCP connections (request direction)",
            m.received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client side of TCP connections (response direction)",
            m.sent_bytes.clone(),
        );
        Arc::new(m)
    }
    /// Counts a connection as opened now and returns its guard.
    ///
    /// The guard counts bytes as they flow ([`ConnMetrics::received`], [`ConnMetrics::sent`])
    /// and counts the close when dropped, so hold it for exactly the connection's lifetime.
    /// A connection refused before any byte flows (policy `DENY`, upstream `CONNECT` failure)
    /// is still opened and closed: open it with those `response_flags` and drop the guard.
    pub fn open(self: &Arc<Self>, labels: TcpLabels) -> ConnMetrics {
        let labels = {
            let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
            let shared = match series.get_key_value(&labels) {
                Some((known, _)) => Arc::clone(known),
                None => Arc::new(labels),
            };
            *series.entry(Arc::clone(&shared)).or_default() += 1;
            shared
        };
        self.opened.get_or_create(&labels).inc();
        // Resolve the byte counters once; each chunk is then a single atomic add.
        let received = self.received_bytes.get_or_create_owned(&labels);
        let sent = self.sent_bytes.get_or_create_owned(&labels);
        ConnMetrics {
            metrics: Arc::clone(self),
            labels,
            close_flags: None,
            received,
            sent,
        }
    }

    /// Removes the L4 series of workloads that are gone, so churning pods do not grow the
    /// exposition (and the proxy's memory) without bound. A series is kept while a connection
    /// using it is open, and when both of its workloads are unknown or still `exists(namespace,
    /// name)`. Returns how many label sets were removed.
    pub fn prune(&self, exists: impl Fn(&str, &str) -> bool) -> usize {
        let known = |ns: &str, name: &str| name == UNKNOWN || exists(ns, name);
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let before = series.len();
        series.retain(|l, open| {
            let keep = *open > 0
                || (known(&l.source_workload_namespace, &l.source_workload)
                    && known(&l.destination_workload_namespace, &l.destination_workload));
            if !keep {
                for family in [
                    &self.opened,
                    &self.closed,
                    &self.received_bytes,
                    &self.sent_bytes,
                ] {
                    family.remove(&**l);
                }
            }
            keep
        });
        before - series.len()
    }
}

/// One open connection's metrics: counts bytes as they flow, counts the close on drop.
///
/// Labels are fixed when the connection opens: the opened counter and both byte counters use
/// them for the connection's whole life. Only the *closed* counter can carry a different
/// `response_flags` (see [`ConnMetrics::set_response_flags`]), so that a connection closed by a
/// later policy change shows up as `closed{response_flags="DENY"}` without splitting its byte
/// series.
#[derive(Debug)]
pub struct ConnMetrics {
    metrics: Arc<TcpMetrics>,
    labels: Arc<TcpLabels>,
    close_flags: Option<String>,
    received: Counter,
    sent: Counter,
}

impl ConnMetrics {
    /// Counts `n` bytes received from the client side (request direction).
    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }

    /// Counts `n` bytes sent to the client side (response direction).
    pub fn sent(&self, n: u64) {
        self.sent.inc_by(n);
    }

    /// Sets the `response_flags` the close will be counted with (e.g. [`FLAG_DENY`] when a
    /// policy change ends the connection). Affects only `istio_tcp_connections_closed_total`;
    /// the opened and byte series keep the labels given to [`TcpMetrics::open`].
    pub fn set_response_flags(&mut self, flags: &str) {
        self.close_flags = Some(flags.to_string());
    }

    /// The labels this connection was opened with.
    pub fn labels(&self) -> &TcpLabels {
        &self.labels
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        let mut series = self
            .metrics
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(open) = series.get_mut(&self.labels) {
            *open = open.saturating_sub(1);
        }
        match self.close_flags.take() {
            Some(flags) if flags != self.labels.response_flags => {
                let labels = TcpLabels {
                    response_flags: flags,
                    ..(*self.labels).clone()
                };
                self.metrics.closed.get_or_create(&labels).inc();
                // Only `closed` has this label set; prune must know of it to remove it.
                if !series.contains_key(&labels) {
                    series.insert(Arc::new(labels), 0);
                }
            }
            _ => {
                self.metrics.closed.get_or_create(&self.labels).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(workload: &str) -> TcpLabels {
        TcpLabels {
            source_workload: workload.to_string(),
            source_workload_namespace: "ns".to_string(),
            ..TcpLabels::unknown("destination")
        }
    }

    #[test]
    fn open_connections_share_their_label_set_until_it_is_pruned() {
        let m = TcpMetrics::register(&mut Registry::default());
        let a = m.open(labels("a"));
        let a2 = m.open(labels("a"));
        let b = m.open(labels("b"));
        assert!(
            Arc::ptr_eq(&a.labels, &a2.labels),
            "one label set for equal labels"
        );
        assert!(!Arc::ptr_eq(&a.labels, &b.labels));
        assert_eq!(
            m.prune(|_, _| false),
            0,
            "open connections keep their series"
        );
        drop((a, a2));
        assert_eq!(
            m.prune(|_, w| w == "b"),
            1,
            "a's series goes once it is closed"
        );
        let again = m.open(labels("a"));
        assert_eq!(again.labels(), &labels("a"));
        assert_eq!(m.series.lock().unwrap().len(), 2);
        drop((again, b));
    }
}
