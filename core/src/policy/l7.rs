//! Policies a waypoint enforces: AuthorizationPolicy and RequestAuthentication attached with
//! `targetRefs` to its Gateway (or the `istio-waypoint` GatewayClass from the root namespace)
//! or to a Service bound to it, evaluated per request with the client's identity.
//!
//! Owns `targetRefs` parsing, which policies apply to a request at a waypoint, and the L7
//! decision (same rules, same matcher and same DENY → ALLOW → AUDIT combination as L4: see
//! `matcher` and [`super::Tally`]). Does not verify tokens (`jwt`) or read the request itself.

use serde::Serialize;
use serde_json::{Map, Value};

use super::jwt::{JwtPolicy, JwtRule, Keys};
use super::matcher::{Peer, Request, Rule};
use super::spec::{Diag, as_array, as_object, check_known_fields, field, index, string_field};
use super::{Action, Connection, PolicySet, Tally, Verdict};

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass of waypoints: a policy in the root namespace attached to it applies to
/// every waypoint.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// One `targetRefs` entry (same namespace as the policy: Istio allows no other).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// Where a request is, as far as attachment goes.
#[derive(Debug, Clone, Copy)]
pub struct WaypointTarget<'a> {
    /// The waypoint's Gateway.
    pub gateway_namespace: &'a str,
    pub gateway_name: &'a str,
    /// The Service the request is addressed to, if it is addressed to one: `(namespace, name)`.
    pub service: Option<(&'a str, &'a str)>,
}

impl TargetRef {
    fn selects(&self, policy_ns: &str, root_namespace: &str, at: &WaypointTarget<'_>) -> bool {
        match (self.group.as_str(), self.kind.as_str()) {
            (GATEWAY_GROUP, "Gateway") => {
                policy_ns == at.gateway_namespace && self.name == at.gateway_name
            }
            (GATEWAY_GROUP, "GatewayClass") => {
                policy_ns == root_namespace && self.name == WAYPOINT_CLASS
            }
            ("", "Service") => at
                .service
                .is_some_and(|(ns, name)| ns == policy_ns && name == self.name),
            _ => false,
        }
    }
}

/// `targetRef` / `targetRefs` as Istio validates them. Empty when neither is set.
pub(crate) fn parse_targets(spec: &Map<String, Value>, d: &mut Diag) -> Vec<TargetRef> {
    let mut items: Vec<(String, &Value)> = Vec::new();
    if let Some(v) = field(spec, "targetRef") {
        items.push(("spec.targetRef".to_string(), v));
    }
    if let Some(v) = field(spec, "targetRefs")
        && let Some(list) = as_array(v, "spec.targetRefs", d)
    {
        items.extend(
            list.iter()
                .enumerate()
                .map(|(i, v)| (index("spec.targetRefs", i), v)),
        );
    }
    let mut out = Vec::new();
    for (path, v) in items {
        let Some(m) = as_object(v, &path, d) else {
            continue;
        };
        check_known_fields(m, &path, &["group", "kind", "name", "namespace"], d);
        let group = string_field(m, "group", &path, d).unwrap_or_default();
        let kind = string_field(m, "kind", &path, d).unwrap_or_default();
        let name = string_field(m, "name", &path, d).unwrap_or_default();
        if string_field(m, "namespace", &path, d).is_some_and(|ns| ns != d.namespace) {
            d.error(
                &format!("{path}.namespace"),
                "cross namespace referencing is not currently supported",
            );
        }
        if name.is_empty() {
            d.error(&format!("{path}.name"), "name must be set");
            continue;
        }
        let group = if group == "core" {
            String::new()
        } else {
            group
        };
        match (group.as_str(), kind.as_str()) {
            (GATEWAY_GROUP, "Gateway" | "GatewayClass") | ("", "Service") => {}
            ("networking.istio.io", "ServiceEntry") => d.warn(
                &path,
                "ServiceEntry targets are not supported by this mesh: this reference selects nothing",
            ),
            _ => {
                d.error(
                    &path,
                    format!(
                        "targetRef must be to one of Gateway or GatewayClass \
                         ({GATEWAY_GROUP}), Service (core) or ServiceEntry; got kind {kind:?} \
                         group {group:?}"
                    ),
                );
                continue;
            }
        }
        out.push(TargetRef { group, kind, name });
    }
    out
}

/// An AuthorizationPolicy attached with `targetRefs`, as the waypoint enforces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L7Authorization {
    /// `ns/name`.
    pub key: String,
    pub namespace: String,
    pub targets: Vec<TargetRef>,
    pub action: Action,
    pub rules: Vec<Rule>,
}

impl PolicySet {
    /// The AuthorizationPolicies (`targetRefs`) that apply at `at`, in `ns/name` order.
    pub fn waypoint_authorizations<'s>(
        &'s self,
        at: &WaypointTarget<'_>,
    ) -> impl Iterator<Item = &'s L7Authorization> {
        let root = self.root_namespace.as_str();
        let at = *at;
        self.waypoint_authz
            .iter()
            .filter(move |a| a.targets.iter().any(|t| t.selects(&a.namespace, root, &at)))
    }

    /// Every AuthorizationPolicy attached with `targetRefs` (to any waypoint).
    pub fn waypoint_policies(&self) -> &[L7Authorization] {
        &self.waypoint_authz
    }

    /// The JWT rules of every RequestAuthentication (`targetRefs`) that applies at `at`.
    pub fn jwt_rules(&self, at: &WaypointTarget<'_>) -> Vec<&JwtRule> {
        self.jwt
            .iter()
            .filter(|p| {
                p.targets
                    .iter()
                    .any(|t| t.selects(&p.namespace, &self.root_namespace, at))
            })
            .flat_map(|p| p.rules.iter())
            .collect()
    }

    /// Every compiled RequestAuthentication (attached or not).
    pub fn jwt_policies(&self) -> &[JwtPolicy] {
        &self.jwt
    }

    /// Every `jwksUri` some RequestAuthentication names: what the waypoint must fetch.
    pub fn jwks_uris(&self) -> std::collections::BTreeSet<String> {
        self.jwt
            .iter()
            .flat_map(|p| p.rules.iter())
            .filter_map(|r| match &r.keys {
                Keys::Uri(u) => Some(u.clone()),
                _ => None,
            })
            .collect()
    }

    /// The L7 decision for one request at a waypoint: any matching DENY → deny; no ALLOW
    /// policy applies → allow; any matching ALLOW → allow; else deny. AUDIT is only listed.
    /// CUSTOM policies are not enforced (reported at compile).
    pub fn authorize_request(
        &self,
        at: &WaypointTarget<'_>,
        conn: &Connection,
        req: &Request<'_>,
    ) -> Verdict {
        let peer = Peer::of(conn, Some(req));
        let mut tally = Tally::default();
        for a in self.waypoint_authorizations(at) {
            tally.add(a.action, &a.key, || {
                a.rules.iter().any(|r| r.matches(&peer))
            });
        }
        tally.verdict(None)
    }

    /// The decision for a TCP connection through the waypoint, which has no HTTP request to
    /// look at: the same policies, an ALLOW rule needing the request never matches and a DENY
    /// rule matches on its connection fields alone (Istio's waypoint does the same for TCP), so
    /// policy cannot be stepped around by speaking something other than HTTP.
    pub fn authorize_connection(&self, at: &WaypointTarget<'_>, conn: &Connection) -> Verdict {
        let peer = Peer::of(conn, None);
        let mut tally = Tally::default();
        for a in self.waypoint_authorizations(at) {
            let deny = a.action == Action::Deny;
            tally.add(a.action, &a.key, || {
                a.rules
                    .iter()
                    .any(|r| r.matches_without_request(&peer, deny))
            });
        }
        tally.verdict(None)
    }
}
