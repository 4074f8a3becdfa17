//! What a waypoint is sent of the mesh ([`view_for_waypoint`]): the Services bound to it, their
//! routes and endpoints, the policies attached to it, the trust bundle.
//!
//! Owns the waypoint scope only (pure). Does not know about streams or nodes (`config_service`,
//! `config_node`).

use std::collections::{BTreeMap, BTreeSet};

use crate::translate::MeshView;

/// What the waypoint of Gateway `gateway` ("ns/name") is sent: what it needs to route the
/// traffic bound to it, no more.
///
/// - The Services bound to it (service binding) that it admits (its namespace rules), and the
///   Services the routes attached to those send to.
/// - The route resources attached to its bound Services, and the DestinationRules of every
///   Service it is sent (subsets, load balancing).
/// - The workloads that are endpoints of those Services, and those bound to it (workload
///   binding), without their netns path and annotations (their nodes' business).
/// - The AuthorizationPolicies and RequestAuthentications it enforces: attached with
///   `targetRefs` to its Gateway, to a Service bound to it, or (from the root namespace) to the
///   `istio-waypoint` GatewayClass; and the Services their `jwksUri`s name (it fetches them).
/// - The trust bundle. No node identities, no other policies.
pub fn view_for_waypoint(view: &MeshView, gateway: &str, root_namespace: &str) -> MeshView {
    let empty = Default::default();
    let members = view.waypoint_members.get(gateway).unwrap_or(&empty);
    // Bound and admitted by the waypoint: not a Service of a namespace it does not allow.
    let bound: BTreeSet<&str> = members.services.iter().map(String::as_str).collect();
    let mut wanted: BTreeSet<&str> = bound.clone();
    let mut routes = BTreeMap::new();
    let refs = |key: &str| view.route_refs.get(key);
    for (key, r) in view
        .routes
        .iter()
        .filter(|(_, r)| r.kind != "DestinationRule")
    {
        let Some(refs) = refs(key) else { continue };
        if refs.attaches_to.iter().any(|s| bound.contains(s.as_str())) {
            routes.insert(key.clone(), r.clone());
            wanted.extend(refs.sends_to.iter().map(String::as_str));
        }
    }
    for (key, r) in view
        .routes
        .iter()
        .filter(|(_, r)| r.kind == "DestinationRule")
    {
        if refs(key).is_some_and(|f| f.attaches_to.iter().any(|s| wanted.contains(s.as_str()))) {
            routes.insert(key.clone(), r.clone());
        }
    }
    let mut policies = BTreeMap::new();
    let mut jwks_hosts = Vec::new();
    for (key, p) in &view.policies {
        let Ok(spec) = serde_json::from_str::<serde_json::Value>(&p.spec_json) else {
            continue;
        };
        if !matches!(
            p.kind.as_str(),
            "AuthorizationPolicy" | "RequestAuthentication"
        ) || !attached_to_waypoint(&spec, &p.namespace, gateway, &bound, root_namespace)
        {
            continue;
        }
        policies.insert(key.clone(), p.clone());
        jwks_hosts.extend(jwks_uri_hosts(&spec));
    }
    for host in &jwks_hosts {
        if let Some((k, _)) = view
            .services
            .iter()
            .find(|(_, s)| names_service(host, &s.hostname, &s.name, &s.namespace))
        {
            wanted.insert(k.as_str());
        }
    }
    let services: BTreeMap<String, _> = view
        .services
        .iter()
        .filter(|(k, _)| wanted.contains(k.as_str()))
        .map(|(k, s)| (k.clone(), s.clone()))
        .collect();
    let endpoints: BTreeSet<&str> = services
        .values()
        .flat_map(|s| s.endpoints.iter().map(|e| e.workload_uid.as_str()))
        .collect();
    let workloads = view
        .workloads
        .iter()
        .filter(|(k, _)| endpoints.contains(k.as_str()) || members.workloads.contains(*k))
        .map(|(k, w)| {
            let mut w = w.clone();
            w.netns.clear();
            w.annotations.clear();
            (k.clone(), w)
        })
        .collect();
    MeshView {
        workloads,
        services,
        routes,
        policies,
        trust_bundle: view.trust_bundle.clone(),
        ..Default::default()
    }
}

/// Whether a policy's `targetRef`/`targetRefs` name this waypoint's Gateway (same namespace),
/// a Service bound to it (`ns/name` in `bound`), or — from the root namespace — the waypoint
/// GatewayClass. meshcore's policy engine validates the references; this only scopes.
fn attached_to_waypoint(
    spec: &serde_json::Value,
    policy_ns: &str,
    gateway: &str,
    bound: &BTreeSet<&str>,
    root_namespace: &str,
) -> bool {
    let (gw_ns, gw_name) = gateway.split_once('/').unwrap_or(("", gateway));
    let spec_refs = spec.get("targetRefs").and_then(|v| v.as_array());
    let refs = spec_refs
        .into_iter()
        .flatten()
        .chain(spec.get("targetRef").filter(|v| v.is_object()));
    refs.into_iter().any(|r| {
        let get = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        match (get("group"), get("kind")) {
            ("gateway.networking.k8s.io", "Gateway") => {
                policy_ns == gw_ns && get("name") == gw_name
            }
            ("gateway.networking.k8s.io", "GatewayClass") => {
                policy_ns == root_namespace && get("name") == "istio-waypoint"
            }
            ("" | "core", "Service") => {
                bound.contains(format!("{policy_ns}/{}", get("name")).as_str())
            }
            _ => false,
        }
    })
}

/// The hosts of a RequestAuthentication's `jwksUri`s (`http://host[:port]/…`).
fn jwks_uri_hosts(spec: &serde_json::Value) -> Vec<String> {
    let rules = spec.get("jwtRules").and_then(|v| v.as_array());
    rules
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("jwksUri").or_else(|| r.get("jwks_uri"))?.as_str())
        .filter_map(|u| {
            let rest = u
                .strip_prefix("http://")
                .or_else(|| u.strip_prefix("https://"))?;
            let authority = rest.split(['/', '?', '#']).next()?;
            let host = authority.rsplit('@').next()?;
            let host = match host.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => host,
            };
            Some(host.to_ascii_lowercase())
        })
        .collect()
}

/// Whether `host` names the Service (its hostname, or `name.namespace[.svc]`), as the
/// waypoint's JWKS fetcher resolves it.
fn names_service(host: &str, hostname: &str, name: &str, namespace: &str) -> bool {
    let host = host.trim_end_matches('.');
    let short = format!("{name}.{namespace}");
    host == hostname || host == short || host == format!("{short}.svc")
}
