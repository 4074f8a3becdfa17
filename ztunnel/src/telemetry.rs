//! Istio's metric labels for one connection and the one result per connection that logs and
//! counts it: shared with the waypoint (`dataplane::telemetry`, `dataplane::conn_result`),
//! re-exported here under ztunnel's old module name.

pub use dataplane::conn_result::{AccessLog, ConnResult, Outcome};
pub use dataplane::telemetry::{End, tcp_labels};
