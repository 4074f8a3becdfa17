//! ztunnel: the per-node agent of the ambient mesh.
//!
//! Flat modules named by their job: [`meshd`] (the connection to the control plane),
//! [`config`] (the config subscription), [`certs`] (workload certificates), [`pods`]
//! (which pods are enrolled: from the config or over ZDS, [`zds_client`] and [`zds_pods`]),
//! [`enroll`] (one pod's listeners and capture; [`pod_netns`] checks its namespace,
//! [`exclusions`] its port annotations), [`netns`] (sockets in pod namespaces), [`capture`] (redirecting pod traffic; [`ebpf`] loads
//! its kernel programs; [`cleanup`] removes what a killed one left),
//! [`outbound`] and [`inbound`] (the proxy paths; [`outbound_stream`] opens an outbound HBONE stream, retrying once elsewhere), [`proxy`] (what those share; [`routed`] counts connections per destination pod), [`supervise`] (background tasks that must not die),
//! [`settings`] (the typed flags) and [`app`] (wiring them into a running ztunnel).

// Shared with the waypoint (crate `dataplane`); re-exported under their old names.
pub use dataplane::subscription as config;
pub use dataplane::{certs, drain, meshd, supervise};

pub mod admin;
pub mod app;
pub mod capture;
pub mod cleanup;
pub mod copy;
pub mod dump;
pub mod ebpf;
pub mod enroll;
pub mod exclusions;
pub mod fastpath;
pub mod inbound;
pub mod limits;
pub mod metrics;
pub mod netns;
pub mod origsrc;
pub mod outbound;
pub mod outbound_stream;
pub mod pod_netns;
pub mod pod_record;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod routed;
pub mod settings;
pub mod telemetry;
pub mod zds_client;
pub mod zds_pods;

/// What the crate's own privileged unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    /// Whether a privileged test runs: always (they fail without root), unless told to skip
    /// with `MESH_SKIP_PRIVILEGED=1`, which it says loudly.
    pub(crate) fn privileged() -> bool {
        if std::env::var("MESH_SKIP_PRIVILEGED").as_deref() == Ok("1") {
            eprintln!("!!! SKIPPING privileged test: MESH_SKIP_PRIVILEGED=1 !!!");
            return false;
        }
        true
    }
}
