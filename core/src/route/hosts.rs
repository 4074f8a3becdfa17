//! Host names in route resources → Service keys (`ns/name`), and [`references`]: which Services
//! a resource attaches to and which it sends traffic to (meshd uses this to know which waypoint
//! needs a resource).
//!
//! Owns name resolution only: whether a Service exists is `compile`'s question.

use std::collections::BTreeSet;

use serde_json::Value;

use super::schema::without_nulls;
use super::spec_gateway as gw;
use super::spec_istio as istio;
use super::validate::is_service_ref;

/// What a resource attaches to and sends to, as Service keys `ns/name`, sorted, no duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refs {
    pub attaches_to: Vec<String>,
    pub sends_to: Vec<String>,
}

/// The Service key a host names, resolved as Istio resolves hosts written in a resource of
/// `namespace`: `name` (that namespace), `name.ns`, `name.ns.svc`, `name.ns.svc.<cluster
/// domain>` (a trailing dot is allowed). `None` for wildcards and other names.
pub(crate) fn host_to_key(host: &str, namespace: &str, cluster_domain: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.is_empty() || host.contains('*') {
        return None;
    }
    let suffix = format!(".svc.{}", cluster_domain.trim_matches('.'));
    let short = host
        .strip_suffix(&suffix)
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(&host);
    let parts: Vec<&str> = short.split('.').collect();
    match parts.as_slice() {
        [name] => Some(format!("{namespace}/{name}")),
        [name, ns] => Some(format!("{ns}/{name}")),
        _ => None,
    }
}

/// Which Services a resource attaches to and sends to. Reads leniently: a spec that does not
/// parse yields what could be read (nothing); [`super::validate`] says what is wrong.
pub fn references(kind: &str, namespace: &str, spec: &Value, cluster_domain: &str) -> Refs {
    let spec = without_nulls(spec);
    let mut attaches = BTreeSet::new();
    let mut sends = BTreeSet::new();
    let key = |h: &str| host_to_key(h, namespace, cluster_domain);
    match kind {
        "VirtualService" => {
            if let Ok(vs) = serde_json::from_value::<istio::VirtualService>(spec) {
                attaches.extend(vs.hosts.iter().filter_map(|h| key(h)));
                let http = vs.http.iter().flat_map(|r| r.route.iter());
                let tcp = vs.tcp.iter().flat_map(|r| r.route.iter());
                sends.extend(http.chain(tcp).filter_map(|r| key(&r.destination.host)));
                // Mirrors are sent to as well: their Service needs this resource's waypoint.
                for rule in &vs.http {
                    let mirrors = rule.mirrors.iter().map(|m| &m.destination);
                    sends.extend(
                        rule.mirror
                            .iter()
                            .chain(mirrors)
                            .filter_map(|d| key(&d.host)),
                    );
                }
            }
        }
        "DestinationRule" => {
            if let Ok(dr) = serde_json::from_value::<istio::DestinationRule>(spec) {
                attaches.extend(key(&dr.host));
            }
        }
        "HTTPRoute" => {
            if let Ok(r) = serde_json::from_value::<gw::HttpRoute>(spec) {
                attaches.extend(parent_keys(&r.parent_refs, namespace));
                let refs = r.rules.iter().flat_map(|r| r.backend_refs.iter());
                let mirrors = r.rules.iter().flat_map(|r| mirror_refs(&r.filters));
                sends.extend(
                    refs.chain(mirrors)
                        .filter_map(|b| backend_key(b, namespace)),
                );
            }
        }
        "GRPCRoute" => {
            if let Ok(r) = serde_json::from_value::<gw::GrpcRoute>(spec) {
                attaches.extend(parent_keys(&r.parent_refs, namespace));
                let refs = r.rules.iter().flat_map(|r| r.backend_refs.iter());
                let mirrors = r.rules.iter().flat_map(|r| mirror_refs(&r.filters));
                sends.extend(
                    refs.chain(mirrors)
                        .filter_map(|b| backend_key(b, namespace)),
                );
            }
        }
        _ => {}
    }
    Refs {
        attaches_to: attaches.into_iter().collect(),
        sends_to: sends.into_iter().collect(),
    }
}

/// The backends a rule's RequestMirror filters copy requests to.
fn mirror_refs(filters: &[gw::Filter]) -> impl Iterator<Item = &gw::BackendRef> {
    filters
        .iter()
        .filter(|f| f.kind == "RequestMirror")
        .filter_map(|f| f.request_mirror.as_ref().map(|m| &m.backend_ref))
}

/// The Service keys of the Service parents (kind defaults to Gateway for parentRefs).
pub(crate) fn parent_keys<'a>(
    refs: &'a [gw::ParentRef],
    namespace: &'a str,
) -> impl Iterator<Item = String> + 'a {
    refs.iter()
        .filter(|r| is_service_ref(r.group.as_deref(), r.kind.as_deref().or(Some("Gateway"))))
        .map(move |r| format!("{}/{}", r.namespace.as_deref().unwrap_or(namespace), r.name))
}

/// The Service key of a backendRef (kind defaults to Service), `None` for other kinds.
pub(crate) fn backend_key(b: &gw::BackendRef, namespace: &str) -> Option<String> {
    is_service_ref(b.group.as_deref(), b.kind.as_deref())
        .then(|| format!("{}/{}", b.namespace.as_deref().unwrap_or(namespace), b.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hosts_resolve_like_istio() {
        let k = |h| host_to_key(h, "default", "cluster.local");
        assert_eq!(k("web").as_deref(), Some("default/web"));
        assert_eq!(k("web.shop").as_deref(), Some("shop/web"));
        assert_eq!(k("web.shop.svc").as_deref(), Some("shop/web"));
        assert_eq!(k("web.shop.svc.cluster.local").as_deref(), Some("shop/web"));
        assert_eq!(
            k("Web.Shop.svc.cluster.local.").as_deref(),
            Some("shop/web")
        );
        assert_eq!(k("web.shop.svc.other.domain"), None);
        assert_eq!(k("*.shop.svc.cluster.local"), None);
        assert_eq!(k("www.example.com"), None);
    }

    #[test]
    fn references_of_each_kind() {
        let vs = json!({"hosts": ["web"], "http": [{"route": [
            {"destination": {"host": "web", "subset": "v1"}, "weight": 90},
            {"destination": {"host": "canary.other.svc.cluster.local"}, "weight": 10}]}],
            "tcp": [{"route": [{"destination": {"host": "db"}}]}]});
        let r = references("VirtualService", "default", &vs, "cluster.local");
        assert_eq!(r.attaches_to, ["default/web"]);
        assert_eq!(r.sends_to, ["default/db", "default/web", "other/canary"]);

        let dr = json!({"host": "web.default.svc.cluster.local"});
        let r = references("DestinationRule", "default", &dr, "cluster.local");
        assert_eq!(r.attaches_to, ["default/web"]);

        let hr = json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "namespace": "mesh"},
                                       {"name": "some-gateway"}],
            "rules": [{"backendRefs": [{"name": "echo-v1", "port": 80}, {"kind": "Other", "name": "x"}]}]});
        let r = references("HTTPRoute", "consumer", &hr, "cluster.local");
        assert_eq!(r.attaches_to, ["mesh/echo"]);
        assert_eq!(r.sends_to, ["consumer/echo-v1"]);
        let r = references("GRPCRoute", "consumer", &hr, "cluster.local");
        assert_eq!(r.attaches_to, ["mesh/echo"]);
    }
}
