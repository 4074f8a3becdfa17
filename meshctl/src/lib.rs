//! meshctl, the mesh's user CLI. Today: `meshctl waypoint apply|list|status|delete`, modelled on
//! `istioctl waypoint`, against local mode's directories ([`local::LocalBackend`]); every command
//! goes through [`backend::Backend`], which a Kubernetes backend can implement later.

pub mod backend;
pub mod cli;
pub mod local;
pub mod waypoint;
