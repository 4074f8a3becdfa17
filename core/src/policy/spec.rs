//! Reading a policy's `spec` JSON field by field, so that every problem names the resource and
//! the exact field it is about (`spec.rules[0].from[1].source.ipBlocks[2]`).
//!
//! Owns the diagnostics collector, the error type, and the shared pieces of Istio syntax
//! (string lists, workload selectors, ports, IP blocks). Knows nothing about what a policy means.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use serde_json::{Map, Value};

/// A hard error: the policy is rejected (Istio would have refused it at admission), so it is not
/// applied at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{kind} {namespace}/{name}: {field}: {message}")]
pub struct PolicyError {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The JSON path of the offending field, e.g. `spec.action`.
    pub field: String,
    pub message: String,
}

/// Collects errors and warnings for one resource while it is compiled.
pub(crate) struct Diag {
    kind: String,
    pub(crate) namespace: String,
    name: String,
    pub errors: Vec<PolicyError>,
    pub warnings: Vec<String>,
}

impl Diag {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Diag {
        Diag {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub fn error(&mut self, field: &str, message: impl fmt::Display) {
        self.errors.push(PolicyError {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            field: field.to_string(),
            message: message.to_string(),
        });
    }

    /// A warning in the same `Kind ns/name: field: message` shape as errors.
    pub fn warn(&mut self, field: &str, message: impl fmt::Display) {
        self.warnings.push(format!(
            "{} {}/{}: {}: {}",
            self.kind, self.namespace, self.name, field, message
        ));
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Logs what was collected (at debug: the config dump carries it) and turns it into the
    /// policy's report.
    pub fn into_report(
        self,
        key: &str,
        status: super::PolicyStatus,
        effective: Option<super::Effective>,
    ) -> super::PolicyReport {
        let policy = format!("{}/{}", self.namespace, self.name);
        for w in &self.warnings {
            tracing::debug!(%policy, "{w}");
        }
        for e in &self.errors {
            tracing::debug!(%policy, "policy rejected: {e}");
        }
        super::PolicyReport {
            key: key.to_string(),
            kind: self.kind,
            namespace: self.namespace,
            name: self.name,
            status,
            effective,
            warnings: self.warnings,
            errors: self.errors.iter().map(|e| e.to_string()).collect(),
        }
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn join(path: &str, key: &str) -> String {
    format!("{path}.{key}")
}

pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Parses the whole `spec_json` into an object.
pub(crate) fn parse_spec(spec_json: &str, d: &mut Diag) -> Option<Map<String, Value>> {
    // An absent spec is an empty spec.
    if spec_json.trim().is_empty() {
        return Some(Map::new());
    }
    match serde_json::from_str::<Value>(spec_json) {
        Ok(Value::Object(m)) => Some(m),
        Ok(Value::Null) => Some(Map::new()),
        Ok(other) => {
            d.error(
                "spec",
                format!("expected an object, found {}", describe(&other)),
            );
            None
        }
        Err(e) => {
            d.error("spec", format!("invalid JSON: {e}"));
            None
        }
    }
}

pub(crate) fn as_object<'a>(
    v: &'a Value,
    path: &str,
    d: &mut Diag,
) -> Option<&'a Map<String, Value>> {
    match v {
        Value::Object(m) => Some(m),
        other => {
            d.error(
                path,
                format!("expected an object, found {}", describe(other)),
            );
            None
        }
    }
}

pub(crate) fn as_array<'a>(v: &'a Value, path: &str, d: &mut Diag) -> Option<&'a Vec<Value>> {
    match v {
        Value::Array(a) => Some(a),
        other => {
            d.error(path, format!("expected a list, found {}", describe(other)));
            None
        }
    }
}

/// Unknown fields are errors: the API server (strict field validation) would refuse them, and a
/// typo such as `principal` must never be silently ignored.
pub(crate) fn check_known_fields(m: &Map<String, Value>, path: &str, known: &[&str], d: &mut Diag) {
    for k in m.keys() {
        if !known.contains(&k.as_str()) {
            d.error(
                &join(path, k),
                format!("unknown field (expected one of: {})", known.join(", ")),
            );
        }
    }
}

/// A field's value; absent and `null` are the same, as in protobuf JSON.
pub(crate) fn field<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

pub(crate) fn string_field(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    d: &mut Diag,
) -> Option<String> {
    match field(m, key)? {
        Value::String(s) => Some(s.clone()),
        other => {
            d.error(
                &join(path, key),
                format!("expected a string, found {}", describe(other)),
            );
            None
        }
    }
}

/// A list of non-empty strings (Istio rejects empty values in every list of a rule). Absent or
/// `null` gives an empty list; invalid entries are reported and skipped.
pub(crate) fn string_list(
    m: &Map<String, Value>,
    key: &str,
    path: &str,
    d: &mut Diag,
) -> Vec<String> {
    let Some(v) = field(m, key) else {
        return Vec::new();
    };
    let path = join(path, key);
    let Some(items) = as_array(v, &path, d) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(s) if s.is_empty() => {
                d.error(&index(&path, i), "empty value not allowed")
            }
            Value::String(s) => out.push(s.clone()),
            other => d.error(
                &index(&path, i),
                format!("expected a string, found {}", describe(other)),
            ),
        }
    }
    out
}

/// `selector: {matchLabels: {..}}`. Returns `None` when there is no selector or it has no labels
/// (Istio treats both as "no selector"; the latter with a warning).
pub(crate) fn parse_selector(
    spec: &Map<String, Value>,
    d: &mut Diag,
) -> Option<BTreeMap<String, String>> {
    let v = field(spec, "selector")?;
    let sel = as_object(v, "spec.selector", d)?;
    check_known_fields(sel, "spec.selector", &["matchLabels"], d);
    let mut labels = BTreeMap::new();
    if let Some(ml) = field(sel, "matchLabels") {
        let path = "spec.selector.matchLabels";
        if let Some(ml) = as_object(ml, path, d) {
            for (k, v) in ml {
                let kpath = join(path, k);
                let Value::String(v) = v else {
                    d.error(
                        &kpath,
                        format!("expected a string label value, found {}", describe(v)),
                    );
                    continue;
                };
                if k.is_empty() {
                    d.error(&kpath, "empty key is not supported in selector");
                } else if k.contains('*') || v.contains('*') {
                    d.error(
                        &kpath,
                        format!("wildcard is not supported in selector: \"{k}={v}\""),
                    );
                } else {
                    labels.insert(k.clone(), v.clone());
                }
            }
        }
    }
    if labels.is_empty() {
        if !d.has_errors() {
            d.warn(
                "spec.selector",
                "workload selector specified without labels: it selects every workload in scope",
            );
        }
        return None;
    }
    Some(labels)
}

/// Does a workload with `labels` satisfy `selector` (every selector label present and equal)?
pub(crate) fn labels_match<S: std::hash::BuildHasher>(
    selector: &BTreeMap<String, String>,
    labels: &std::collections::HashMap<String, String, S>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A port written as a decimal string, as Istio does (`ValidatePorts`: 0..=65535).
pub(crate) fn parse_port(s: &str) -> Result<u16, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad port ({s:?}): not a decimal number"));
    }
    s.parse::<u16>()
        .map_err(|_| format!("bad port ({s:?}): must be in range 0..65535"))
}

/// A single IP or a CIDR, IPv4 or IPv6. A v4-mapped IPv6 block is stored in its IPv4 form, since
/// connection addresses are compared in canonical form.
pub(crate) fn parse_ip_block(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|e| format!("bad CIDR range ({s:?}): {e}"))?
    } else {
        s.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("bad IP address ({s:?})"))?
    };
    Ok(canonical_net(net))
}

fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}
