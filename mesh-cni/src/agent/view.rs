//! The cluster as the agent reads it: pods of this node and their namespaces' labels, from the
//! Kubernetes API (watch, and a direct GET on a miss) or from local mode's config directory.
