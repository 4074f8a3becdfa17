//! mesh-cni: race-free enrollment of pods into the ambient mesh.
//!
//! - [`plugin`]: the chained CNI plugin (spec 1.0) the container runtime runs for each pod
//!   sandbox; it asks the agent to enroll the pod and fails the sandbox if that cannot happen.
//! - [`install`]: puts the plugin into the primary CNI's conflist and keeps it there.
//! - [`agent`]: the node agent — decides who is ambient (from the cluster), hands each pod's
//!   network namespace to ztunnel over ZDS, finds pods again after a restart.
//! - [`probe_snat`]: the node-side rewrite that lets kubelet probes reach captured pods.
//! - [`event`]: the plugin ↔ agent messages.

pub mod agent;
pub mod event;
pub mod install;
pub mod plugin;
pub mod probe_snat;
