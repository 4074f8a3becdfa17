//! What the server fills in on create and keeps on update for particular kinds: Service
//! cluster IPs (allocated from the configured ranges, never one still taken), Pod and
//! Namespace phases, CRD status. Pure functions over the object and the set of taken IPs.

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::{Value, json};

use super::errors::ApiErr;

/// An address range to allocate from: `[first, last]` as integers, and whether it is IPv6.
#[derive(Debug, Clone)]
pub(crate) struct Range {
    first: u128,
    last: u128,
    v6: bool,
}

impl Range {
    /// `10.97.0.0/16` → hosts `10.97.0.1`..`10.97.255.254`. `None` if it does not parse.
    pub fn parse(cidr: &str) -> Option<Range> {
        let (ip, len) = cidr.split_once('/')?;
        let ip: IpAddr = ip.parse().ok()?;
        let len: u32 = len.parse().ok()?;
        let (base, bits, v6) = match ip {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32, false),
            IpAddr::V6(a) => (u128::from(a), 128, true),
        };
        if len > bits || bits - len < 2 {
            return None;
        }
        let size = 1u128.checked_shl(bits - len).unwrap_or(u128::MAX);
        let net = base & !(size - 1);
        Some(Range {
            first: net + 1,
            last: net + size - 2,
            v6,
        })
    }

    fn ip(&self, n: u128) -> IpAddr {
        if self.v6 {
            IpAddr::V6(n.into())
        } else {
            IpAddr::V4((n as u32).into())
        }
    }

    fn contains(&self, ip: &IpAddr) -> bool {
        let n = match ip {
            IpAddr::V4(a) if !self.v6 => u128::from(u32::from(*a)),
            IpAddr::V6(a) if self.v6 => u128::from(*a),
            _ => return false,
        };
        (self.first..=self.last).contains(&n)
    }

    /// The next free address after `cursor` (wrapping), so a just-freed address is not
    /// handed out again at once.
    fn allocate(&self, taken: &HashSet<IpAddr>, cursor: &mut u128) -> Option<IpAddr> {
        let span = self.last - self.first + 1;
        // Bounded scan: a range with more taken addresses than this is a test gone wrong.
        for i in 0..span.min(1 << 20) {
            let n = self.first + (*cursor + i) % span;
            let ip = self.ip(n);
            if !taken.contains(&ip) {
                *cursor = (*cursor + i + 1) % span;
                return Some(ip);
            }
        }
        None
    }
}

/// Allocation state for Service cluster IPs.
#[derive(Debug, Clone)]
pub(crate) struct ServiceIps {
    pub v4: Option<Range>,
    pub v6: Option<Range>,
    cursor4: u128,
    cursor6: u128,
}

impl ServiceIps {
    pub fn new(v4: &str, v6: Option<&str>) -> Self {
        ServiceIps {
            v4: Range::parse(v4),
            v6: v6.and_then(Range::parse),
            cursor4: 0,
            cursor6: 0,
        }
    }

    /// Fills in `spec.clusterIP(s)`, `ipFamilies`, `ipFamilyPolicy`, `type` and port defaults
    /// on a new Service. `taken`: every cluster IP other Services hold.
    pub fn on_create(&mut self, svc: &mut Value, taken: &HashSet<IpAddr>) -> Result<(), ApiErr> {
        let spec = ensure_object(svc, "spec");
        if spec.get("type").and_then(Value::as_str).is_none() {
            spec.insert("type".into(), json!("ClusterIP"));
        }
        if spec.get("sessionAffinity").is_none() {
            spec.insert("sessionAffinity".into(), json!("None"));
        }
        default_ports(spec);
        if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
            return Ok(());
        }
        let asked = spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if asked == "None" {
            spec.insert("clusterIPs".into(), json!(["None"]));
            spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
            spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
            return Ok(());
        }
        let policy = spec
            .get("ipFamilyPolicy")
            .and_then(Value::as_str)
            .unwrap_or("SingleStack")
            .to_string();
        if policy == "RequireDualStack" && self.v6.is_none() {
            return Err(ApiErr::invalid(
                "spec.ipFamilyPolicy: Invalid value: \"RequireDualStack\": this cluster is not configured for dual-stack services",
            ));
        }
        let mut ips = Vec::new();
        if asked.is_empty() {
            let range = self
                .v4
                .as_ref()
                .ok_or_else(|| ApiErr::invalid("spec.clusterIP: no service IP range configured"))?;
            let ip = range
                .allocate(taken, &mut self.cursor4)
                .ok_or_else(|| ApiErr::new(500, "InternalError", "range is full"))?;
            ips.push(ip);
        } else {
            let ip: IpAddr = asked.parse().map_err(|_| {
                ApiErr::invalid(format!(
                    "spec.clusterIP: Invalid value: \"{asked}\": must be a valid IP address or None"
                ))
            })?;
            let in_range = [&self.v4, &self.v6]
                .into_iter()
                .flatten()
                .any(|r| r.contains(&ip));
            if !in_range {
                return Err(ApiErr::invalid(format!(
                    "spec.clusterIP: Invalid value: \"{asked}\": provided IP is not in the valid range"
                )));
            }
            if taken.contains(&ip) {
                return Err(ApiErr::invalid(format!(
                    "spec.clusterIP: Invalid value: \"{asked}\": provided IP is already allocated"
                )));
            }
            ips.push(ip);
        }
        if policy != "SingleStack"
            && let Some(r6) = &self.v6
            && ips[0].is_ipv4()
            && let Some(ip6) = r6.allocate(taken, &mut self.cursor6)
        {
            ips.push(ip6);
        }
        let families: Vec<&str> = ips
            .iter()
            .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
            .collect();
        let texts: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
        spec.insert("clusterIP".into(), json!(texts[0]));
        spec.insert("clusterIPs".into(), json!(texts));
        spec.insert("ipFamilies".into(), json!(families));
        spec.insert("ipFamilyPolicy".into(), json!(policy));
        Ok(())
    }
}

/// On update: an omitted cluster IP keeps the old one; a different one is refused (the field
/// is immutable).
pub(crate) fn service_on_update(old: &Value, new: &mut Value) -> Result<(), ApiErr> {
    let old_spec = &old["spec"];
    let spec = ensure_object(new, "spec");
    default_ports(spec);
    for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
        let given = spec.get(field).filter(|v| !v.is_null() && *v != "");
        match given {
            None => {
                if !old_spec[field].is_null() {
                    spec.insert(field.into(), old_spec[field].clone());
                }
            }
            Some(v) if field.starts_with("clusterIP") && *v != old_spec[field] => {
                return Err(ApiErr::invalid(format!(
                    "spec.{field}: Invalid value: {v}: field is immutable"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn default_ports(spec: &mut serde_json::Map<String, Value>) {
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            p.entry("protocol").or_insert(json!("TCP"));
            if p.get("targetPort").is_none()
                && let Some(port) = p.get("port").cloned()
            {
                p.insert("targetPort".into(), port);
            }
        }
    }
}

/// Every cluster IP a Service holds.
pub(crate) fn service_ips(svc: &Value) -> Vec<IpAddr> {
    let spec = &svc["spec"];
    let mut out: Vec<IpAddr> = spec["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect();
    if let Some(ip) = spec["clusterIP"].as_str().and_then(|s| s.parse().ok())
        && !out.contains(&ip)
    {
        out.push(ip);
    }
    out
}

/// Status a new object starts with, as the real server (or its controllers, at once) sets.
pub(crate) fn initial_status(kind: &str, obj: &mut Value) {
    let status_missing = obj.get("status").is_none_or(Value::is_null);
    match kind {
        "Namespace" => {
            ensure_object(obj, "status").insert("phase".into(), json!("Active"));
        }
        "Pod" if status_missing => {
            obj["status"] = json!({"phase": "Pending"});
        }
        "Service" if status_missing => {
            obj["status"] = json!({"loadBalancer": {}});
        }
        _ => {}
    }
}

/// A registered CRD's status: established, names accepted, the storage version stored.
pub(crate) fn crd_status(crd: &mut Value, storage_version: &str, now: &str) {
    let names = crd["spec"]["names"].clone();
    let cond = |t: &str, reason: &str, msg: &str| json!({"type": t, "status": "True", "lastTransitionTime": now, "reason": reason, "message": msg});
    crd["status"] = json!({
        "acceptedNames": names,
        "conditions": [
            cond("NamesAccepted", "NoConflicts", "no conflicts found"),
            cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": [storage_version],
    });
}

fn ensure_object<'a>(v: &'a mut Value, field: &str) -> &'a mut serde_json::Map<String, Value> {
    if !v[field].is_object() {
        v[field] = json!({});
    }
    match v[field].as_object_mut() {
        Some(o) => o,
        None => unreachable!("just made an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_without_reuse_while_taken() {
        let mut ips = ServiceIps::new("10.97.0.0/30", None);
        let mut taken = HashSet::new();
        let mut a = json!({"spec": {}});
        ips.on_create(&mut a, &taken).unwrap();
        assert_eq!(a["spec"]["clusterIP"], "10.97.0.1");
        taken.insert("10.97.0.1".parse().unwrap());
        let mut b = json!({"spec": {}});
        ips.on_create(&mut b, &taken).unwrap();
        assert_eq!(b["spec"]["clusterIPs"], json!(["10.97.0.2"]));
        taken.insert("10.97.0.2".parse().unwrap());
        assert!(ips.on_create(&mut json!({"spec": {}}), &taken).is_err());
        let mut dual = ServiceIps::new("10.97.0.0/24", Some("fd00:97::/112"));
        let mut d = json!({"spec": {"ipFamilyPolicy": "PreferDualStack"}});
        dual.on_create(&mut d, &HashSet::new()).unwrap();
        assert_eq!(d["spec"]["clusterIPs"], json!(["10.97.0.1", "fd00:97::1"]));
        assert_eq!(d["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        let mut req = json!({"spec": {"ipFamilyPolicy": "RequireDualStack"}});
        assert_eq!(ips.on_create(&mut req, &taken).unwrap_err().code, 422);
        let mut h = json!({"spec": {"clusterIP": "None"}});
        ips.on_create(&mut h, &taken).unwrap();
        assert_eq!(h["spec"]["clusterIP"], "None");
    }
}
