//! The kinds meshd reads from the Kubernetes API, as `ApiResource`s (no discovery: the table is
//! the contract). Built-in kinds are always there; Istio's and Gateway API's are optional CRDs,
//! watched once they exist.

use kube::core::{ApiResource, GroupVersionKind};

/// One kind meshd watches.
#[derive(Debug, Clone)]
pub struct Kind {
    pub resource: ApiResource,
    /// A CRD that may be absent: reported, and watched once it appears.
    pub optional: bool,
}

fn kind(group: &str, version: &str, kind: &str, plural: &str, optional: bool) -> Kind {
    Kind {
        resource: ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            plural,
        ),
        optional,
    }
}

/// Every kind the directory source understands, as the API serves it.
pub fn watched() -> Vec<Kind> {
    vec![
        kind("", "v1", "Namespace", "namespaces", false),
        kind("", "v1", "Pod", "pods", false),
        kind("", "v1", "Service", "services", false),
        kind(
            "security.istio.io",
            "v1",
            "AuthorizationPolicy",
            "authorizationpolicies",
            true,
        ),
        kind(
            "security.istio.io",
            "v1",
            "PeerAuthentication",
            "peerauthentications",
            true,
        ),
        kind(
            "security.istio.io",
            "v1",
            "RequestAuthentication",
            "requestauthentications",
            true,
        ),
        kind(
            "networking.istio.io",
            "v1",
            "VirtualService",
            "virtualservices",
            true,
        ),
        kind(
            "networking.istio.io",
            "v1",
            "DestinationRule",
            "destinationrules",
            true,
        ),
        kind(
            "gateway.networking.k8s.io",
            "v1",
            "Gateway",
            "gateways",
            true,
        ),
        kind(
            "gateway.networking.k8s.io",
            "v1",
            "HTTPRoute",
            "httproutes",
            true,
        ),
        kind(
            "gateway.networking.k8s.io",
            "v1",
            "GRPCRoute",
            "grpcroutes",
            true,
        ),
    ]
}
