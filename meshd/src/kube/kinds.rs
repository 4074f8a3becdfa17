//! The kinds meshd reads from the Kubernetes API, as `ApiResource`s (no discovery: the table is
//! the contract). Built-in kinds are always there; Istio's and Gateway API's are optional CRDs,
//! watched once they exist.
//!
//! Owns the table and how a kind is named in messages; not the watching (`source`).
//!
//! Not watched, on purpose: EndpointSlice (meshd matches pods to Service selectors itself, as
//! local mode and istiod's ambient workload builder do; slices would only add endpoints of
//! selector-less Services, which the model does not represent), ServiceAccount and Deployment
//! (the directory source accepts them but nothing reads them: identities come from each pod's
//! `spec.serviceAccountName`, and the pods a Deployment runs are watched as pods). Watching
//! them would cost memory and API load at scale for no effect on any node's config.

use kube::core::{ApiResource, GroupVersionKind};

/// One kind meshd watches.
#[derive(Debug, Clone)]
pub struct Kind {
    pub resource: ApiResource,
    /// A CRD that may be absent: reported, and watched once it appears.
    pub optional: bool,
}

impl Kind {
    /// The kind's name, e.g. `"AuthorizationPolicy"`.
    pub fn name(&self) -> &str {
        &self.resource.kind
    }

    /// The name of the CRD that defines it (`<plural>.<group>`); meaningless for built-ins.
    pub fn crd_name(&self) -> String {
        format!("{}.{}", self.resource.plural, self.resource.group)
    }

    /// `"AuthorizationPolicy (security.istio.io/v1)"`, as messages name the kind.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.resource.kind, self.resource.api_version)
    }

    /// Objects of built-in kinds are written and defaulted by Kubernetes itself (every Service
    /// has `spec.type`, every Pod `metadata.generateName`...), so what meshd does not read in
    /// them is no news to the user; the mesh kinds are what users write for meshd.
    pub fn written_by_cluster(&self) -> bool {
        !self.optional
    }

    /// What it means that the API does not serve this kind, for the one report of it.
    pub fn when_missing(&self) -> String {
        let why = match self.resource.group.as_str() {
            "security.istio.io" | "networking.istio.io" => "Istio's CRDs are not installed",
            "gateway.networking.k8s.io" => "the Gateway API CRDs are not installed",
            _ => "the API does not serve it",
        };
        format!(
            "no {} CRD serving {} ({why}, or too old to serve {}): {} objects are not read until it is",
            self.resource.kind,
            self.crd_name(),
            self.resource.version,
            self.resource.kind
        )
    }
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

/// Every kind the directory source acts on, as the API serves it.
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

/// CustomResourceDefinitions: watched only to notice an optional kind's CRD appearing (so it
/// is read at once rather than at the next retry); never gates anything.
pub fn crds() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_watched_kind_is_one_the_parser_reads() {
        for k in watched() {
            let schema = crate::schema::for_kind(&k.resource.api_version, &k.resource.kind);
            assert!(schema.is_some(), "{} is not parsed", k.describe());
        }
    }

    #[test]
    fn missing_crd_message_says_what_and_why() {
        let ap = watched()
            .into_iter()
            .find(|k| k.name() == "AuthorizationPolicy")
            .unwrap();
        let m = ap.when_missing();
        assert!(
            m.contains("authorizationpolicies.security.istio.io")
                && m.contains("Istio's CRDs are not installed")
                && m.contains("not read until"),
            "{m}"
        );
    }
}
