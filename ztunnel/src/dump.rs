//! What the admin endpoints report: readiness and the JSON config dump.
//!
//! Reads the node's state; changes nothing.

use meshcore::store::workload_identity;
use serde_json::{Value, json};

use crate::proxy::Ctx;

/// Ready once config has arrived and every enrolled pod's certificate is in hand.
pub fn ready(ctx: &Ctx) -> Result<(), String> {
    let Some(store) = ctx.config.borrow().clone() else {
        return Err("no config from meshd yet".to_string());
    };
    let missing: Vec<String> = store
        .local_workloads(&ctx.node)
        .filter(|w| w.captured && !w.netns.is_empty())
        .map(|w| workload_identity(w))
        .filter(|id| !ctx.certs.is_ready(id))
        .map(|id| id.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("waiting for certificates: {}", missing.join(", ")))
    }
}

/// Workloads, services, policies (with their effective L4 form), certificates and pods.
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
                }))
                .collect();
            ws.sort_by_key(|v| v["uid"].as_str().unwrap_or_default().to_string());
            let mut ss: Vec<Value> = s
                .services()
                .map(|svc| json!({
                    "key": svc.key, "hostname": svc.hostname, "vips": svc.vips,
                    "ports": svc.ports.iter().map(|p| json!({"port": p.port, "targetPort": p.target_port, "name": p.name})).collect::<Vec<_>>(),
                    "endpoints": svc.endpoints.iter().map(|e| json!({"workload": e.workload_uid, "ports": e.ports})).collect::<Vec<_>>(),
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
        "trustBundle": bundle,
        "pods": pods,
        "workloads": workloads,
        "services": services,
        "policies": policies.reports(),
        "policyErrors": policies.errors(),
        "certificates": ctx.certs.status(),
    })
}
