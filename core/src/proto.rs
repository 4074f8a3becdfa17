//! Generated gRPC code for meshd's services (see `core/proto/`).

/// The certificate authority protocol.
pub mod ca {
    tonic::include_proto!("mesh.ca.v1");
}

/// The config stream protocol.
pub mod config {
    tonic::include_proto!("mesh.config.v1");
}
