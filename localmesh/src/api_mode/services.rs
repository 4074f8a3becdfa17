//! A Service's cluster IPs between local mode and the API: local mode proposes VIPs for user
//! Services (an explicit clusterIP is legal), the API has the last word and they are
//! immutable once set. Owns only these field copies.

use serde_json::{Value, json};

/// Service IP fields the API owns once set.
const SERVICE_IP_FIELDS: [&str; 4] = ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"];

/// A Service about to be written: an existing one keeps the IPs the API gave it (they are
/// immutable); a new one asking for two cluster IPs asks for dual stack, as the API's
/// defaulting would.
pub(super) fn service_ips_for_put(svc: &mut Value, held: Option<&Value>) {
    let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    match held {
        Some(h) => {
            for f in SERVICE_IP_FIELDS {
                match h["spec"].get(f) {
                    Some(v) => spec.insert(f.into(), v.clone()),
                    None => spec.remove(f),
                };
            }
        }
        None => {
            let two = spec
                .get("clusterIPs")
                .and_then(Value::as_array)
                .is_some_and(|ips| ips.len() == 2);
            if two && !spec.contains_key("ipFamilyPolicy") {
                spec.insert("ipFamilyPolicy".into(), json!("RequireDualStack"));
            }
        }
    }
}

/// Copies the IPs the API holds for a Service into local mode's rendering of it (what its
/// record in `config/` shows, and what the demo and tests read back).
pub(super) fn adopt_service_ips(rendered: &mut Value, held: Option<&Value>) {
    let (Some(spec), Some(held)) = (
        rendered.get_mut("spec").and_then(Value::as_object_mut),
        held.and_then(|h| h["spec"].as_object()),
    ) else {
        return;
    };
    for f in SERVICE_IP_FIELDS {
        if let Some(v) = held.get(f) {
            spec.insert(f.into(), v.clone());
        }
    }
}
