//! Status meshd reports on the resources it acts on: a waypoint Gateway's `Accepted` and
//! `Programmed` conditions (Gateway API's meaning and reasons), and route resources' findings.
//!
//! Pure: computes conditions from a [`MeshView`] and shapes status objects. When a condition
//! last changed, and where status goes, is the caller's (`outputs`).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::translate::{MeshView, RouteFindings, RouteRefs};
use crate::waypoints::Waypoint;

/// One status condition, without its transition time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// `Accepted` then `Programmed` for a waypoint Gateway. Programmed is True once the
/// waypoint's Service has a ready endpoint pod in `view`. A refused edit of an accepted
/// Gateway is Accepted=False while its last accepted version stays programmed.
pub fn gateway_conditions(w: &Waypoint, view: &MeshView) -> [Condition; 2] {
    let accepted = match (&w.refusal, &w.refused_edit) {
        (None, Some(r)) => Condition {
            kind: "Accepted",
            status: false,
            reason: r.reason,
            message: format!(
                "{}; the last accepted version stays in force until this is fixed",
                r.message
            ),
        },
        (None, None) => Condition {
            kind: "Accepted",
            status: true,
            reason: "Accepted",
            message: format!("waypoint for {} traffic", w.waypoint_for.as_str()),
        },
        (Some(r), _) => Condition {
            kind: "Accepted",
            status: false,
            reason: r.reason,
            message: r.message.clone(),
        },
    };
    let programmed = |status, reason, message| Condition {
        kind: "Programmed",
        status,
        reason,
        message,
    };
    let service = w.service_key();
    let programmed = if !w.accepted() {
        programmed(false, "Invalid", "the Gateway is not accepted".into())
    } else {
        match view.services.get(&service) {
            None => programmed(
                false,
                "Pending",
                format!("waiting for the waypoint's Service {service} and pods to be created"),
            ),
            Some(s) if s.endpoints.is_empty() => programmed(
                false,
                "NoResources",
                format!("no ready waypoint pod behind Service {service} yet"),
            ),
            Some(s) => programmed(
                true,
                "Programmed",
                format!(
                    "{} waypoint pod(s) ready behind Service {service}",
                    s.endpoints.len()
                ),
            ),
        }
    };
    [accepted, programmed]
}

/// A condition as Kubernetes writes it.
pub fn condition_json(c: &Condition, since: &str, generation: Option<i64>) -> Value {
    let mut v = json!({
        "type": c.kind,
        "status": if c.status { "True" } else { "False" },
        "reason": c.reason,
        "message": c.message,
        "lastTransitionTime": since,
    });
    if let Some(g) = generation {
        v["observedGeneration"] = json!(g);
    }
    v
}

/// The Gateway's status document: its addresses (the waypoint Service's VIPs) and conditions
/// (already rendered with [`condition_json`]).
pub fn gateway_status(w: &Waypoint, view: &MeshView, conditions: Vec<Value>) -> Value {
    let addresses: Vec<Value> = view
        .services
        .get(&w.service_key())
        .map(|s| {
            s.vips
                .iter()
                .map(|ip| json!({"type": "IPAddress", "value": ip}))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": w.name, "namespace": w.namespace},
        "status": {"addresses": addresses, "conditions": conditions},
    })
}

/// A route resource's status: whether its newest version is in force, and what was found.
pub fn route_status(r: &RouteFindings, since: &str) -> Value {
    let accepted = match &r.rejected {
        None => Condition {
            kind: "Accepted",
            status: true,
            reason: "Accepted",
            message: "in force".into(),
        },
        Some(why) => Condition {
            kind: "Accepted",
            status: false,
            reason: "Invalid",
            message: format!("{why}; the last good version stays in force"),
        },
    };
    json!({
        "kind": r.kind,
        "metadata": {"name": r.name, "namespace": r.namespace},
        "status": {
            "conditions": [condition_json(&accepted, since, None)],
            "diagnostics": r.notes,
        },
    })
}

/// The AuthorizationPolicy conditions istiod writes in ambient mode: whether ztunnel enforces
/// the policy (attached by namespace or `selector`), and whether a waypoint does (`targetRefs`).
pub const ZTUNNEL_ACCEPTED: &str = "ZtunnelAccepted";
pub const WAYPOINT_ACCEPTED: &str = "WaypointAccepted";

/// `ZtunnelAccepted` or `WaypointAccepted` for every AuthorizationPolicy of `view`, by its
/// view key (`AuthorizationPolicy/ns/name`), computed from the same compilation ztunnel and
/// the waypoints run: a policy ztunnel enforces only in part (an ALLOW rule with HTTP fields,
/// which it drops; a DENY rule it widens) is `UnsupportedValue` with the engine's warnings; a
/// `targetRefs` policy is accepted when a waypoint takes one of its targets.
pub fn policy_conditions(view: &MeshView, root_namespace: &str) -> BTreeMap<String, Condition> {
    use meshcore::policy::{PolicySet, PolicyStatus};
    let authz: Vec<_> = view
        .policies
        .values()
        .filter(|p| p.kind == "AuthorizationPolicy")
        .collect();
    let set = PolicySet::compile(authz.iter().copied(), root_namespace);
    let waypoint_forms: BTreeMap<&str, &meshcore::policy::L7Authorization> = set
        .waypoint_policies()
        .iter()
        .map(|a| (a.key.as_str(), a))
        .collect();
    let reports: BTreeMap<&str, _> = set.reports().iter().map(|r| (r.key.as_str(), r)).collect();
    let mut out = BTreeMap::new();
    for p in &authz {
        let Some(report) = reports.get(p.key.as_str()) else {
            continue;
        };
        let attached = serde_json::from_str::<Value>(&p.spec_json)
            .ok()
            .is_some_and(|s| s.get("targetRefs").is_some() || s.get("targetRef").is_some());
        let kind = if attached {
            WAYPOINT_ACCEPTED
        } else {
            ZTUNNEL_ACCEPTED
        };
        let cond = |status, reason, message| Condition {
            kind,
            status,
            reason,
            message,
        };
        let key = format!("{}/{}", p.namespace, p.name);
        let c = match (report.status, waypoint_forms.get(key.as_str())) {
            (PolicyStatus::Rejected, _) => cond(false, "Invalid", report.errors.join("; ")),
            (_, Some(form)) => {
                let bound = bound_waypoints(view, &p.namespace, &form.targets, root_namespace);
                if bound.is_empty() {
                    cond(
                        false,
                        "TargetNotFound",
                        "no waypoint takes any of spec.targetRefs: not enforced".into(),
                    )
                } else {
                    cond(true, "Accepted", format!("bound to {}", bound.join(", ")))
                }
            }
            (PolicyStatus::Enforced, None) if report.warnings.is_empty() => {
                cond(true, "Accepted", "attached to ztunnel".into())
            }
            (_, None) => cond(false, "UnsupportedValue", report.warnings.join("; ")),
        };
        out.insert(p.key.clone(), c);
    }
    out
}

/// The accepted waypoints (`ns/name`) that take a policy attached to `targets` in `ns`.
fn bound_waypoints(
    view: &MeshView,
    ns: &str,
    targets: &[meshcore::policy::TargetRef],
    root_namespace: &str,
) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    for t in targets {
        for (key, w) in view.waypoints.iter().filter(|(_, w)| w.accepted()) {
            let takes = match (t.group.as_str(), t.kind.as_str()) {
                ("gateway.networking.k8s.io", "Gateway") => w.namespace == ns && w.name == t.name,
                ("gateway.networking.k8s.io", "GatewayClass") => {
                    ns == root_namespace && t.name == crate::waypoints::WAYPOINT_CLASS
                }
                ("", "Service") => view
                    .waypoint_members
                    .get(key)
                    .is_some_and(|m| m.services.contains(&format!("{ns}/{}", t.name))),
                _ => false,
            };
            if takes {
                out.insert(key.clone());
            }
        }
    }
    out.into_iter().collect()
}

/// `Accepted` and `ResolvedRefs` of a Gateway API route for one parent meshd answers for:
/// refused (its last good version stays in force) or not, and whether every Service it sends
/// to exists.
pub fn route_parent_conditions(
    findings: Option<&RouteFindings>,
    refs: Option<&RouteRefs>,
    view: &MeshView,
) -> [Condition; 2] {
    let accepted = match findings.and_then(|f| f.rejected.as_ref()) {
        Some(why) => Condition {
            kind: "Accepted",
            status: false,
            reason: "UnsupportedValue",
            message: format!("{why}; the last good version stays in force"),
        },
        None => {
            let notes = findings.map(|f| f.notes.join("; ")).unwrap_or_default();
            Condition {
                kind: "Accepted",
                status: true,
                reason: "Accepted",
                message: if notes.is_empty() {
                    "Route was valid".into()
                } else {
                    format!("Route was valid; {notes}")
                },
            }
        }
    };
    let missing: Vec<&str> = refs
        .map(|r| r.sends_to.iter())
        .into_iter()
        .flatten()
        .filter(|s| !view.services.contains_key(*s))
        .map(String::as_str)
        .collect();
    let resolved = if missing.is_empty() {
        Condition {
            kind: "ResolvedRefs",
            status: true,
            reason: "ResolvedRefs",
            message: "All references resolved".into(),
        }
    } else {
        Condition {
            kind: "ResolvedRefs",
            status: false,
            reason: "BackendNotFound",
            message: format!("backend Service(s) not found: {}", missing.join(", ")),
        }
    };
    [accepted, resolved]
}

/// `unix_secs` as RFC 3339 UTC (`2026-11-30T01:02:03Z`), as Kubernetes writes times; past year
/// 9999, which RFC 3339 cannot write, the last second of 9999.
pub fn rfc3339(unix_secs: u64) -> String {
    const LAST: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = i64::try_from(unix_secs).map_or(LAST, |s| s.min(LAST));
    let t = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    t.format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_998_723), "2026-11-30T00:32:03Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(1 << 40), "9999-12-31T23:59:59Z");
    }
}
