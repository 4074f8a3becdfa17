//! Status meshd reports on the resources it acts on: a waypoint Gateway's `Accepted` and
//! `Programmed` conditions (Gateway API's meaning and reasons), and route resources' findings.
//!
//! Pure: computes conditions from a [`MeshView`] and shapes status objects. When a condition
//! last changed, and where status goes, is the caller's (`outputs`).

use serde_json::{Value, json};

use crate::translate::{MeshView, RouteFindings};
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

/// `unix_secs` as RFC 3339 UTC (`2026-11-30T01:02:03Z`), as Kubernetes writes times.
pub fn rfc3339(unix_secs: u64) -> String {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(0);
    let rem = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_998_723), "2026-11-30T00:32:03Z");
    }
}
