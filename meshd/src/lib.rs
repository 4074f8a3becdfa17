//! meshd, the mesh control plane: reads resources (a directory of Kubernetes YAML in local
//! mode), translates them into what the data plane needs, streams that to every node over gRPC
//! and runs the certificate authority.
//!
//! Data flow: `local_source` or `kube::source` (both via `parse`) → `ResourceSet` → `translate` → `MeshView` → `config_service`
//! (via `delta`) and `ca_service`; `daemon` wires them, `main.rs` is the CLI. Waypoint Gateways
//! are rendered by `waypoints`, their status computed by `status`, and both written by `outputs`;
//! `binding` resolves `istio.io/use-waypoint`; route resources are checked alone by `route_check`
//! (as they are read) and together by `route_gate` (after translation), both keeping the last
//! good version of a refused one.

pub mod authn;
pub mod binding;
pub mod ca_service;
pub mod config_node;
pub mod config_service;
pub mod config_waypoint;
pub mod daemon;
pub mod delta;
pub mod kube;
pub mod listener;
pub mod local_source;
pub mod outputs;
pub mod parse;
pub mod resources;
pub mod roots;
pub mod route_check;
pub mod route_gate;
pub mod schema;
pub mod settings;
pub mod state;
pub mod status;
pub mod translate;
pub mod waypoints;
