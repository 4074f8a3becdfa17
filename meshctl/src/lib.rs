//! meshctl, the mesh's user CLI, modelled on `istioctl`. `meshctl waypoint apply|list|status|
//! delete` goes through [`backend::Backend`]: local mode's directories ([`local::LocalBackend`])
//! or a cluster's API ([`cluster::Cluster`]). On clusters also `install`, `check`, `status` and
//! `uninstall`, from the manifests compiled in ([`manifests`]).

pub mod backend;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod install;
pub mod local;
pub mod manifests;
pub mod readiness;
pub mod report;
pub mod status;
pub mod uninstall;
pub mod waypoint;
