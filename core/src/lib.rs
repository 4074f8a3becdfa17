//! The shared core of the mesh: everything ztunnel, waypoint and meshd must agree on.
//!
//! - [`identity`]: SPIFFE identities (`spiffe://<td>/ns/<ns>/sa/<sa>`).
//! - [`ca`]: certificate authority primitives (root, signing CSRs) and CSR generation.
//! - [`tls`]: rustls configurations for HBONE's mutual TLS, with SPIFFE verification.
//! - [`hbone`]: the HBONE protocol (HTTP/2 CONNECT over mTLS): client pool and server.
//! - [`ktls`]: whether the kernel could take over HBONE's record encryption (kTLS).
//! - [`enrollment`]: who is in the ambient mesh (the label rule meshd and the CNI agent share).
//! - [`nodeauth`]: how a node agent proves which node it is to meshd.
//! - [`manifest`]: the limits on reading an operator's YAML manifests (meshd, local mode).
//! - [`proto`]: the gRPC protocols between meshd and the data plane.
//! - [`store`]: the data plane's view of the config stream, indexed for lookups.
//! - [`route`]: the L7 route engine (VirtualService, DestinationRule, HTTPRoute, GRPCRoute):
//!   validation, compilation, per-request decisions, load balancing.
//!
//! Nothing here knows about network namespaces, capture or Kubernetes objects.

pub mod admission;
pub mod ca;
pub mod enrollment;
pub mod hbone;
pub mod identity;
pub mod ktls;
pub mod manifest;
pub mod nodeauth;
pub mod policy;
pub mod proto;
pub mod route;
pub mod store;
pub mod tls;

pub use identity::Identity;

/// The HBONE port on every mesh pod and waypoint.
pub const HBONE_PORT: u16 = 15008;
/// ztunnel's in-pod outbound listener.
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's in-pod inbound plaintext listener.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The SO_MARK carried by the mesh's own sockets, so capture skips them.
pub const MESH_SOCKET_MARK: u32 = 0x539;
/// The pod annotation that tells local mode where a pod's network namespace is.
pub const NETNS_ANNOTATION: &str = "mesh.local/netns";
