//! Shared pieces of the fuzz targets: turning fuzzer bytes into mesh-shaped inputs.
//!
//! - [`gen`]: Istio policies, workloads, connections and config-stream updates drawn from small
//!   vocabularies, so that random bytes produce inputs that actually match each other.
//! - [`h2wire`]: HTTP/2 frames and HPACK header blocks written by hand, so the HBONE target can
//!   send what no well-behaved client library would.

pub mod r#gen;
pub mod h2wire;
