//! The data-plane runtime shared by ztunnel and the waypoint: everything a proxy of the mesh
//! needs besides its own traffic handling.
//!
//! - [`meshd`]: the connection to the control plane (unix socket or TLS) and its bearer token.
//! - [`subscription`]: the config stream, kept through meshd outages, published on a watch.
//! - [`certs`]: workload certificates from meshd's CA, cached and refreshed.
//! - [`hbone_in`]: how an inbound HBONE connection's end is logged.
//! - [`drain`]: counting live connections and waiting for them on shutdown.
//! - [`supervise`]: background tasks whose end is fatal.
//! - [`admin`]: the metrics, readiness and admin HTTP servers.
//! - [`telemetry`]: Istio's labels for both ends of a connection; [`tcp_metrics`]: Istio's
//!   L4 metric families; [`conn_result`]: one result per connection, logged and counted together.
//! - [`backoff`]: capped, jittered exponential retry delays.
//! - [`record_encryption`]: `--kernel-tls` and whether HBONE's records go to the kernel.
//!
//! Nothing here captures traffic, proxies bytes or makes policy decisions.

pub mod admin;
pub mod backoff;
pub mod certs;
pub mod conn_result;
pub mod drain;
pub mod hbone_in;
pub mod memory;
pub mod meshd;
pub mod record_encryption;
pub mod spans;
pub mod subscription;
pub mod supervise;
pub mod tcp_metrics;
pub mod telemetry;
pub mod zds;
