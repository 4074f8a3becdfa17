//! The local controller-manager's model of a `Deployment` (apps/v1): reading and validating the
//! document, the pod-template hash, pod names, and the Pod documents a Deployment stands for.
//!
//! Pure: no processes, files or network. Scheduling, rollouts and the config directory belong
//! to `workloads`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Map, Value, json};

/// Kubernetes' "safe" alphabet (no vowels, no 0/1/3): pod-template hashes and name suffixes.
const SAFE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The label carrying the template hash on every pod (and in the ReplicaSet's name).
pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// What a Deployment asks for, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Deployment {
    pub namespace: String,
    pub name: String,
    pub replicas: usize,
    /// `spec.template`, as written (metadata.labels/annotations and spec).
    pub template: Value,
    /// Stable hash of the template: a template edit changes it, a scale does not.
    pub hash: String,
}

impl Deployment {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The Pod document for a new pod named `pod`: the template's metadata and spec, the hash
    /// label, and an owner reference to the ReplicaSet Kubernetes would have made.
    pub fn pod_doc(&self, pod: &str) -> Value {
        let meta = self.template.get("metadata");
        let mut labels = meta
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        labels.insert(TEMPLATE_HASH_LABEL.into(), self.hash.clone().into());
        let mut metadata = Map::new();
        metadata.insert("name".into(), pod.into());
        metadata.insert("namespace".into(), self.namespace.clone().into());
        metadata.insert("labels".into(), Value::Object(labels));
        if let Some(a) = meta
            .and_then(|m| m.get("annotations"))
            .filter(|a| a.is_object())
        {
            metadata.insert("annotations".into(), a.clone());
        }
        metadata.insert(
            "ownerReferences".into(),
            json!([{
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{}-{}", self.name, self.hash), "controller": true,
            }]),
        );
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": self.template.get("spec").cloned().unwrap_or_else(|| json!({})),
        })
    }
}

/// Reads and validates Deployment document number `index` of `file`. Errors name the file,
/// the document and the field, as `kubectl apply` would refuse them.
pub fn parse(file: &str, index: usize, doc: &Value) -> anyhow::Result<Deployment> {
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let fail = |field: &str, msg: String| -> anyhow::Error {
        anyhow::anyhow!("{file}: document {index} (Deployment {namespace}/{name}): {field}: {msg}")
    };
    if !is_dns_label(name) {
        return Err(fail(
            "metadata.name",
            format!(
                "{name:?} is not a DNS-1123 label (lower-case letters, digits and '-', at most 63)"
            ),
        ));
    }
    let replicas = match doc.pointer("/spec/replicas") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_i64() {
            Some(n) if n < 0 => {
                return Err(fail("spec.replicas", format!("must be >= 0, got {n}")));
            }
            Some(n) => usize::try_from(n)
                .map_err(|_| fail("spec.replicas", format!("{n} is too large")))?,
            None => {
                return Err(fail(
                    "spec.replicas",
                    format!("must be an integer, got {v}"),
                ));
            }
        },
    };
    if replicas > 200 {
        return Err(fail(
            "spec.replicas",
            format!("{replicas} is more than local mode runs (200)"),
        ));
    }
    let selector = selector(doc).map_err(|(field, msg)| fail(field, msg))?;
    let template = doc
        .pointer("/spec/template")
        .filter(|t| t.is_object())
        .ok_or_else(|| fail("spec.template", "required".into()))?;
    let labels = string_map(template.pointer("/metadata/labels"))
        .map_err(|msg| fail("spec.template.metadata.labels", msg))?;
    if let Some((k, v)) = selector.iter().find(|(k, v)| labels.get(*k) != Some(*v)) {
        return Err(fail(
            "spec.template.metadata.labels",
            format!(
                "`selector` does not match template `labels`: the selector needs {k}={v}, the template has {}",
                labels
                    .get(k)
                    .map_or("no such label".to_string(), |t| format!("{k}={t}"))
            ),
        ));
    }
    check_containers(template).map_err(|(field, msg)| fail(&field, msg))?;
    Ok(Deployment {
        namespace: namespace.to_string(),
        name: name.to_string(),
        replicas,
        template: template.clone(),
        hash: template_hash(template),
    })
}

fn selector(doc: &Value) -> Result<BTreeMap<String, String>, (&'static str, String)> {
    let Some(sel) = doc.pointer("/spec/selector").filter(|s| !s.is_null()) else {
        return Err(("spec.selector", "required (apps/v1)".into()));
    };
    if sel.get("matchExpressions").is_some_and(|e| !e.is_null()) {
        return Err((
            "spec.selector.matchExpressions",
            "not supported in local mode: use matchLabels".into(),
        ));
    }
    let labels =
        string_map(sel.get("matchLabels")).map_err(|m| ("spec.selector.matchLabels", m))?;
    if labels.is_empty() {
        return Err((
            "spec.selector",
            "empty selector is invalid for a Deployment".into(),
        ));
    }
    Ok(labels)
}

fn string_map(v: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    match v {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v.as_str() {
                Some(s) => Ok((k.clone(), s.to_string())),
                None => Err(format!("{k}: label values are strings, got {v}")),
            })
            .collect(),
        Some(other) => Err(format!("must be a mapping, got {other}")),
    }
}

fn check_containers(template: &Value) -> Result<(), (String, String)> {
    let field = "spec.template.spec.containers";
    let containers = match template.pointer("/spec/containers") {
        Some(Value::Array(cs)) if !cs.is_empty() => cs,
        _ => return Err((field.into(), "required: at least one container".into())),
    };
    for (i, c) in containers.iter().enumerate() {
        if c.get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err((format!("{field}[{i}].name"), "required".into()));
        }
        for key in ["command", "args"] {
            match c.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
                Some(_) => {
                    return Err((
                        format!("{field}[{i}].{key}"),
                        "must be a list of strings".into(),
                    ));
                }
            }
        }
        let ports = c
            .get("ports")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        for (j, p) in ports.iter().enumerate() {
            let ok = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .is_some_and(|n| (1..=65535).contains(&n));
            if !ok {
                return Err((
                    format!("{field}[{i}].ports[{j}].containerPort"),
                    "must be a port number 1..65535".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Containers of a pod spec that run a process ([`crate::render::argv`]): only theirs can
/// listen or answer probes.
fn running(pod_spec: &Value) -> impl Iterator<Item = &Value> {
    pod_spec
        .get("containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| crate::render::argv(c).is_some())
}

/// The TCP ports the template's running containers declare (what readiness waits for).
pub fn container_ports(pod_spec: &Value) -> Vec<u16> {
    let mut out = Vec::new();
    for c in running(pod_spec) {
        for p in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let tcp = p
                .get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|s| s == "TCP");
            let port = p.get("containerPort").and_then(Value::as_u64);
            if let (true, Some(Ok(n))) = (tcp, port.map(u16::try_from)) {
                out.push(n);
            }
        }
    }
    out
}

/// The containers' HTTP readiness probes as (port, path); a named port is resolved against the
/// container's ports. Other probe kinds are left to the port check ([`container_ports`]).
pub fn http_probes(pod_spec: &Value) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    for c in running(pod_spec) {
        let Some(get) = c.pointer("/readinessProbe/httpGet") else {
            continue;
        };
        let port = match get.get("port") {
            Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Some(Value::String(name)) => c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
                .and_then(|p| p.get("containerPort")?.as_u64())
                .and_then(|n| u16::try_from(n).ok()),
            _ => None,
        };
        let path = get.get("path").and_then(Value::as_str).unwrap_or("/");
        if let Some(port) = port {
            out.push((port, path.to_string()));
        }
    }
    out
}

/// Kubernetes' recipe: a 32-bit FNV-1a of the template, its decimal digits mapped into the safe
/// alphabet. The template is written canonically (keys sorted), so only a real edit changes it.
pub fn template_hash(template: &Value) -> String {
    let mut text = String::new();
    canonical(template, &mut text);
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    safe_encode(&h.to_string())
}

fn safe_encode(s: &str) -> String {
    s.bytes()
        .map(|b| char::from(SAFE_ALPHABET[usize::from(b) % SAFE_ALPHABET.len()]))
        .collect()
}

fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for k in keys {
                let _ = write!(out, "{}:", Value::String(k.clone()));
                canonical(&m[k], out);
                out.push(',');
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for x in a {
                canonical(x, out);
                out.push(',');
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Five characters of the safe alphabet from `random` bytes (a pod name's suffix).
pub fn name_suffix(random: [u8; 5]) -> String {
    random
        .iter()
        .map(|b| char::from(SAFE_ALPHABET[usize::from(*b) % SAFE_ALPHABET.len()]))
        .collect()
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Labels a pod keeps while it is not ready: Istio's own (they decide capture and waypoint
/// use) and the template hash. Service selectors see the rest only once the pod is ready, the
/// way Kubernetes leaves an unready pod out of a Service's endpoints.
pub fn unready_labels(labels: &Map<String, Value>) -> Map<String, Value> {
    labels
        .iter()
        .filter(|(k, _)| {
            k.as_str() == TEMPLATE_HASH_LABEL
                || k.split_once('/').is_some_and(|(prefix, _)| {
                    prefix == "istio.io" || prefix.ends_with(".istio.io")
                })
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> Value {
        crate::render::parse_docs("t.yaml", yaml).unwrap().remove(0)
    }

    const WEB: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, version: v1}, annotations: {a: b}}
    spec:
      serviceAccountName: web
      containers: [{name: echo, command: [mesh-echo, serve], args: ['--port', '8080'], ports: [{containerPort: 8080}]}]
";

    #[test]
    fn a_deployment_becomes_pods_with_its_template_and_hash() {
        let d = parse("t.yaml", 0, &doc(WEB)).unwrap();
        assert_eq!((d.key(), d.replicas), ("shop/web".to_string(), 3));
        assert!(
            !d.hash.is_empty() && d.hash.bytes().all(|b| SAFE_ALPHABET.contains(&b)),
            "{}",
            d.hash
        );
        let pod = d.pod_doc("web-x-bcdfg");
        assert_eq!(pod["metadata"]["labels"]["version"], "v1");
        assert_eq!(
            pod["metadata"]["labels"][TEMPLATE_HASH_LABEL],
            d.hash.as_str()
        );
        assert_eq!(pod["metadata"]["annotations"]["a"], "b");
        assert_eq!(pod["spec"]["serviceAccountName"], "web");
        assert_eq!(
            pod["metadata"]["ownerReferences"][0]["name"],
            format!("web-{}", d.hash)
        );
        assert_eq!(container_ports(&pod["spec"]), vec![8080]);
    }

    #[test]
    fn http_readiness_probes_resolve_named_ports() {
        let spec = json!({"containers": [
            {"name": "a", "command": ["x"], "ports": [{"name": "status", "containerPort": 15021}],
             "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": "status"}}},
            {"name": "b", "command": ["x"], "readinessProbe": {"httpGet": {"port": 8080}}},
            {"name": "c", "command": ["x"], "readinessProbe": {"tcpSocket": {"port": 9090}}},
            {"name": "no-process", "image": "nginx", "ports": [{"containerPort": 80}],
             "readinessProbe": {"httpGet": {"port": 80}}},
        ]});
        assert_eq!(
            http_probes(&spec),
            vec![
                (15021, "/healthz/ready".to_string()),
                (8080, "/".to_string())
            ]
        );
    }

    #[test]
    fn hash_follows_template_edits_not_scale_or_key_order() {
        let base = parse("t.yaml", 0, &doc(WEB)).unwrap().hash;
        let scaled = parse(
            "t.yaml",
            0,
            &doc(&WEB.replace("replicas: 3", "replicas: 1")),
        )
        .unwrap();
        assert_eq!(scaled.hash, base);
        let reordered = WEB.replace("{app: web, version: v1}", "{version: v1, app: web}");
        assert_eq!(parse("t.yaml", 0, &doc(&reordered)).unwrap().hash, base);
        let edited = WEB.replace("version: v1", "version: v2");
        assert_ne!(parse("t.yaml", 0, &doc(&edited)).unwrap().hash, base);
        let args = WEB.replace("'8080'", "'8081'");
        assert_ne!(parse("t.yaml", 0, &doc(&args)).unwrap().hash, base);
    }

    #[test]
    fn invalid_deployments_are_refused_naming_file_document_and_field() {
        let cases = [
            (
                WEB.replace("matchLabels: {app: web}", "matchLabels: {app: shop}"),
                "spec.template.metadata.labels: `selector` does not match template `labels`",
            ),
            (
                WEB.replace("replicas: 3", "replicas: -1"),
                "spec.replicas: must be >= 0, got -1",
            ),
            (
                WEB.replace("replicas: 3", "replicas: two"),
                "spec.replicas: must be an integer",
            ),
            (
                WEB.replace("selector: {matchLabels: {app: web}}", "selector: {}"),
                "spec.selector: empty selector",
            ),
            (
                WEB.replace("  selector: {matchLabels: {app: web}}\n", ""),
                "spec.selector: required",
            ),
            (
                WEB.replace("{name: echo, ", "{"),
                "spec.template.spec.containers[0].name: required",
            ),
            (
                WEB.replace("containerPort: 8080", "containerPort: 0"),
                "containers[0].ports[0].containerPort",
            ),
            (
                WEB.replace("name: web, namespace", "name: Web, namespace"),
                "metadata.name",
            ),
        ];
        for (yaml, want) in cases {
            let err = parse("apps.yaml", 2, &doc(&yaml)).unwrap_err().to_string();
            assert!(
                err.starts_with("apps.yaml: document 2 (Deployment shop/"),
                "{err}"
            );
            assert!(err.contains(want), "want {want:?} in {err}");
        }
    }

    #[test]
    fn replicas_default_to_one() {
        let d = parse("t.yaml", 0, &doc(&WEB.replace("  replicas: 3\n", ""))).unwrap();
        assert_eq!(d.replicas, 1);
    }

    #[test]
    fn unready_pods_keep_only_istio_labels_and_the_hash() {
        let labels = json!({"app": "web", "istio.io/dataplane-mode": "none", "x.istio.io/y": "1", "pod-template-hash": "h", "gateway.networking.k8s.io/gateway-name": "gw"});
        let kept = unready_labels(labels.as_object().unwrap());
        let keys: Vec<&str> = kept.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "istio.io/dataplane-mode",
                "pod-template-hash",
                "x.istio.io/y"
            ]
        );
    }

    #[test]
    fn names_use_the_safe_alphabet() {
        assert_eq!(name_suffix([0, 1, 26, 27, 255]), "bc9bq");
        // Kubernetes' digit mapping: '0' → '4' ... '9' → 'f'.
        assert_eq!(safe_encode("0123456789"), "456789bcdf");
    }
}
