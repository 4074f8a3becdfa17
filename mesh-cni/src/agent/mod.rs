//! The node agent. Owns the plugin socket, the ZDS server, the enrolled-pod cache and the
//! reconcile loop; which pods are ambient is read from the cluster through [`view`].
//! [`view`]: the cluster as the agent reads it (Kubernetes API or local mode's config directory).
pub mod view;
