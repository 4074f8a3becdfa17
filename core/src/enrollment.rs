//! Who is in the ambient mesh, by the labels Istio users write — the one rule meshd (which
//! computes each workload's `captured`) and the CNI node agent (which enrolls pods before their
//! apps start) must agree on, and the names both use on the wire to the cluster.
//!
//! Owns the rule and the names only; nothing here reads the API or touches a pod.

/// Namespace and pod label: `ambient` on a namespace enrolls its pods; `none` on a pod opts it out.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// The pod annotation Istio's node agent sets on a pod it has enrolled (`enabled`); our agent
/// sets it too, so tools that read it (istioctl, dashboards) work unchanged.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// The source address kubelet probes are rewritten to on the node (Istio's choice), so the pod's
/// capture can let them reach the app without mTLS. IPv4 and IPv6.
pub const PROBE_SNAT_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 7, 127);
pub const PROBE_SNAT_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// Ambient enrollment: the namespace opted in, the pod did not opt out, and it does not share
/// the node's network (a hostNetwork pod's traffic is the node's, which the mesh must not
/// capture).
pub fn is_ambient<'a>(
    namespace_label: Option<&'a str>,
    pod_label: Option<&'a str>,
    host_network: bool,
) -> bool {
    namespace_label == Some("ambient") && pod_label != Some("none") && !host_network
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_opts_in_pod_opts_out_host_network_never() {
        assert!(is_ambient(Some("ambient"), None, false));
        assert!(is_ambient(Some("ambient"), Some("ambient"), false));
        assert!(!is_ambient(Some("ambient"), Some("none"), false));
        assert!(!is_ambient(Some("ambient"), None, true));
        assert!(
            !is_ambient(None, Some("ambient"), false),
            "a pod alone cannot opt in"
        );
        assert!(
            !is_ambient(Some("Ambient"), None, false),
            "values are case-sensitive"
        );
    }
}
