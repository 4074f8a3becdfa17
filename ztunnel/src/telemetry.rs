//! Istio's metric labels for one connection, from what the config says about both ends:
//! shared with the waypoint, so this is `dataplane::telemetry` under its old name.

pub use dataplane::telemetry::{End, tcp_labels};
