//! The testbed: a Kubernetes-like cluster on one machine, built from network namespaces, used
//! by the integration tests and by the local-mode demo. Nodes are namespaces joined by a
//! bridged fabric; pods are namespaces with a veth to their node and routes so every pod
//! reaches every other pod (IPv4 and IPv6). It runs processes inside them and tears
//! everything down on drop; names carry a per-run id so concurrent runs never collide.
//!
//! This file only wires the modules together and re-exports the public API.

mod cgroups;
pub mod child;
mod cluster;
mod error;
pub mod kubeapi;
mod netns;
mod proc;
mod runs;
pub mod vm;

pub use cluster::{Cluster, ClusterConfig, FABRIC_HOST_V4, Node, Pod};
pub use error::TestbedError;
pub use netns::Netns;
pub use proc::Proc;
pub use runs::{SCRATCH_ROOT, leftovers, sweep_stale};

/// Others share one `Cluster` between threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Cluster>();
    const fn send<T: Send>() {}
    send::<Proc>();
};
