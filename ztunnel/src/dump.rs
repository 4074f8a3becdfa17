//! What the admin endpoints report: readiness and the JSON config dump.
//!
//! Reads the node's state; changes nothing.

use meshcore::proto::config::WaypointBinding;
use meshcore::store::{ConfigStore, workload_identity};
use serde_json::{Value, json};

use crate::outbound::{MissingWaypoint, binding, waypoint_pods};
use crate::pods::SourceStatus;
use crate::proxy::Ctx;

/// Ready once config has arrived and every enrolled pod's certificate is in hand; with
/// `--enrollment zds` also connected to the CNI agent, its snapshot processed, nothing pending.
pub fn ready(ctx: &Ctx) -> Result<(), String> {
    let Some(store) = ctx.config.borrow().clone() else {
        return Err("no config from meshd yet".to_string());
    };
    let missing: Vec<String> = match &ctx.enrollment {
        SourceStatus::Config => store
            .local_workloads(&ctx.node)
            .filter(|w| w.captured && !w.netns.is_empty())
            .map(|w| workload_identity(w))
            .filter(|id| !ctx.certs.is_ready(id))
            .map(|id| id.to_string())
            .collect(),
        SourceStatus::Zds(zds) => {
            zds.ready()?;
            let mut ids: Vec<String> = ctx
                .local_pods
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|p| !ctx.certs.is_ready(&p.identity))
                .map(|p| p.identity.to_string())
                .collect();
            ids.sort();
            ids.dedup();
            ids
        }
    };
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("waiting for certificates: {}", missing.join(", ")))
    }
}

/// Workloads, services (each with its waypoint binding), policies (with their effective L4
/// form), certificates and pods.
pub fn config_dump(ctx: &Ctx) -> Value {
    let store = ctx.config.borrow().clone();
    let policies = ctx.policies.borrow().clone();
    let (workloads, services, version, bundle) = match &store {
        Some(s) => {
            let mut ws: Vec<Value> = s
                .workloads()
                .map(|w| json!({
                    "uid": w.uid, "namespace": w.namespace, "name": w.name, "serviceAccount": w.service_account,
                    "identity": workload_identity(w).to_string(), "node": w.node, "ips": w.ips,
                    "captured": w.captured, "labels": w.labels,
                    "waypoint": binding_json(s, &w.waypoint, ctx.waypoints.missing),
                }))
                .collect();
            ws.sort_by_key(|v| v["uid"].as_str().unwrap_or_default().to_string());
            let mut ss: Vec<Value> = s
                .services()
                .map(|svc| json!({
                    "key": svc.key, "hostname": svc.hostname, "vips": svc.vips,
                    "ports": svc.ports.iter().map(|p| json!({"port": p.port, "targetPort": p.target_port, "name": p.name})).collect::<Vec<_>>(),
                    "endpoints": svc.endpoints.iter().map(|e| json!({"workload": e.workload_uid, "ports": e.ports})).collect::<Vec<_>>(),
                    "waypoint": binding_json(s, &svc.waypoint, ctx.waypoints.missing),
                }))
                .collect();
            ss.sort_by_key(|v| v["key"].as_str().unwrap_or_default().to_string());
            let bundle = s
                .trust_bundle()
                .map(|t| json!({"trustDomain": t.trust_domain, "roots": t.roots_pem.len()}));
            (ws, ss, s.version, bundle)
        }
        None => (vec![], vec![], 0, None),
    };
    let pods: Vec<Value> = ctx
        .enrolled
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    json!({
        "node": ctx.node,
        "configVersion": version,
        "captureMode": ctx.capture.mode().to_string(),
        "captureFallbackReason": ctx.capture.fallback_reason(),
        "hboneRecordEncryption": ctx.kernel_tls.dump(),
        "enrollment": match &ctx.enrollment {
            SourceStatus::Config => json!({"source": "config"}),
            SourceStatus::Zds(zds) => zds.dump(),
        },
        "missingWaypoint": ctx.waypoints.missing.to_string(),
        "trustBundle": bundle,
        "pods": pods,
        "workloads": workloads,
        "services": services,
        "policies": policies.reports(),
        "policyErrors": policies.errors(),
        "certificates": ctx.certs.status(),
        // Destination pod uid → connections routed to it and not yet ended.
        "routed": ctx.routed.snapshot(),
    })
}

/// An object's waypoint binding as outbound traffic sees it: `null` when unbound, else the
/// Gateway, its Service, and `state` — `ready` (with the waypoint pods), or `bypassed` /
/// `refused` (what `--missing-waypoint` does with its traffic) with the reason.
fn binding_json(
    store: &ConfigStore,
    b: &Option<WaypointBinding>,
    missing: MissingWaypoint,
) -> Value {
    let Some(b) = binding(b) else {
        return Value::Null;
    };
    match waypoint_pods(store, b) {
        Ok(pods) => json!({
            "gateway": b.gateway, "service": b.service, "state": "ready",
            "pods": pods.iter().map(|w| w.uid.as_str()).collect::<Vec<_>>(),
        }),
        Err(reason) => json!({
            "gateway": b.gateway, "service": b.service,
            "state": match missing { MissingWaypoint::Bypass => "bypassed", MissingWaypoint::Refuse => "refused" },
            "reason": reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcore::proto::config::{ConfigUpdate, Endpoint, Service, Workload};

    fn binding(gateway: &str, unavailable: &str) -> Option<WaypointBinding> {
        Some(WaypointBinding {
            gateway: gateway.into(),
            service: gateway.into(),
            unavailable: unavailable.into(),
        })
    }

    #[test]
    fn bindings_show_their_state() {
        let mut store = ConfigStore::default();
        store.apply(ConfigUpdate {
            snapshot: true,
            workloads: vec![Workload {
                uid: "a/wp-0".into(),
                ips: vec!["10.1.0.9".into()],
                ..Default::default()
            }],
            services: vec![Service {
                key: "a/wp".into(),
                endpoints: vec![Endpoint {
                    workload_uid: "a/wp-0".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        let bypass = MissingWaypoint::Bypass;
        assert_eq!(binding_json(&store, &None, bypass), Value::Null);
        assert_eq!(
            binding_json(&store, &binding("a/wp", ""), bypass),
            json!({"gateway": "a/wp", "service": "a/wp", "state": "ready", "pods": ["a/wp-0"]})
        );
        assert_eq!(
            binding_json(&store, &binding("a/gone", "no Gateway a/gone"), bypass),
            json!({"gateway": "a/gone", "service": "a/gone", "state": "bypassed", "reason": "no Gateway a/gone"})
        );
        assert_eq!(
            binding_json(&store, &binding("a/idle", ""), MissingWaypoint::Refuse),
            json!({"gateway": "a/idle", "service": "a/idle", "state": "refused",
                "reason": "waypoint service a/idle is not known"})
        );
    }
}
