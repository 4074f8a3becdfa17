//! Parsing manifest text into [`Resource`]s: YAML/JSON documents, validation of the fields
//! meshd acts on, and warnings for what it does not act on.
//!
//! Owns turning text into typed resources or an error naming the file, document, object and
//! field, applying the limits ([`meshcore::manifest`]) that keep hostile text (alias bombs, deep
//! nesting, huge files) from costing more than a bounded amount of time and memory. Does not
//! know where text comes from, nor how resources are merged or translated.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

use crate::resources::{
    IntOrString, ObjectMeta, Passive, Policy, PolicyKind, Resource, Route, is_tcp,
};
use crate::{route_check, schema, waypoints};

/// The largest manifest file meshd reads (shared with local mode, as are the parser's budgets).
pub const MAX_FILE_BYTES: u64 = meshcore::manifest::MAX_FILE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("{file}: document {doc}: {source}")]
    Syntax {
        file: String,
        doc: usize,
        /// Boxed: the parser's error is large and files rarely fail.
        source: Box<serde_saphyr::Error>,
    },
    #[error("{file}: {size} bytes is over the {} MiB limit for a manifest file", MAX_FILE_BYTES >> 20)]
    TooLarge { file: String, size: u64 },
    /// `at` is where the object came from: `"<file>: document <n>"`, or the API's name.
    #[error("{at} ({what}): {message}")]
    Invalid {
        at: String,
        what: String,
        message: String,
    },
}

/// What one file holds, plus what in it meshd does not act on.
#[derive(Debug, Default)]
pub struct ParsedFile {
    pub resources: Vec<Resource>,
    /// Human-readable, each naming the document, the object and the field.
    pub warnings: Vec<String>,
    /// Route resources refused on their own (the rest of the file applies; the source keeps
    /// each one's last good version).
    pub rejected: Vec<Rejected>,
}

/// A route resource that failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// `"Kind/ns/name"`, as [`Route::key`].
    pub key: String,
    /// Names the file, the document, the resource and the field.
    pub error: String,
}

/// The 1-based number of the document that `line` (1-based) is in, counted the way a YAML
/// stream is: each `---` starts a document, and content before the first `---` is one too.
/// The parser reports lines, and empty documents produce no value, so numbers are recovered
/// from the text to keep naming documents the way a reader of the file counts them.
fn document_at_line(text: &str, line: u64) -> usize {
    let mut doc = 0;
    let mut content_in_doc = false;
    for l in text
        .lines()
        .take(usize::try_from(line).unwrap_or(usize::MAX))
    {
        let marker = l
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t'));
        if marker {
            doc += 1;
            content_in_doc = true;
        } else if doc == 0 && !content_in_doc {
            let t = l.trim_start();
            if !t.is_empty() && !t.starts_with('#') && !t.starts_with('%') {
                doc = 1;
                content_in_doc = true;
            }
        }
    }
    doc.max(1)
}

/// Parses a YAML (or JSON) file of one or more `---`-separated documents. `file` only names the
/// file in errors and warnings. Any error rejects the whole file, so a half-valid edit never
/// applies partially.
pub fn parse_file(file: &str, text: &str) -> Result<ParsedFile, ParseError> {
    let size = u64::try_from(text.len()).unwrap_or(u64::MAX);
    if size > MAX_FILE_BYTES {
        return Err(ParseError::TooLarge {
            file: file.to_string(),
            size,
        });
    }
    let docs: Vec<Spanned<Value>> =
        serde_saphyr::from_multiple_with_options(text, meshcore::manifest::yaml_options())
            .map_err(|source| ParseError::Syntax {
                file: file.to_string(),
                doc: source
                    .location()
                    .map_or(1, |l| document_at_line(text, l.line())),
                source: Box::new(source),
            })?;
    let mut out = ParsedFile::default();
    for doc in docs {
        let n = document_at_line(text, doc.referenced.line());
        parse_value(&format!("{file}: document {n}"), doc.value, &mut out)?;
    }
    Ok(out)
}

/// Parses one object as read from the Kubernetes API (already JSON): the same checks, the same
/// warnings and the same errors as a file's document, with `origin` (e.g. `"Kubernetes API"`)
/// where a file would name itself and the document.
pub fn parse_object(origin: &str, value: Value) -> Result<ParsedFile, ParseError> {
    let mut out = ParsedFile::default();
    parse_value(origin, value, &mut out)?;
    Ok(out)
}

/// Checks one document (`at` says where it came from in every message) and adds it to `out`.
fn parse_value(at: &str, value: Value, out: &mut ParsedFile) -> Result<(), ParseError> {
    if value.is_null() {
        return Ok(()); // empty document, e.g. a trailing `---`
    }
    let invalid = |what: &str, message: String| ParseError::Invalid {
        at: at.to_string(),
        what: what.to_string(),
        message,
    };
    let Some(obj) = value.as_object() else {
        return Err(invalid(
            "document",
            "is not a Kubernetes object (expected a mapping)".into(),
        ));
    };
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let Some(kind) = obj.get("kind").and_then(Value::as_str) else {
        return Err(invalid("document", "has no `kind`".into()));
    };
    let Some(schema) = schema::for_kind(api_version, kind) else {
        out.warnings.push(format!(
            "{at}: kind {kind} (apiVersion {api_version:?}) is not supported by meshd; ignored"
        ));
        return Ok(());
    };
    let resource = typed(kind, value.clone()).map_err(|e| invalid(kind, e))?;
    let what = resource.describe();
    if resource.metadata().name.is_empty() {
        return Err(invalid(&what, "metadata.name is required".into()));
    }
    validate(&resource).map_err(|e| invalid(&what, e))?;
    for field in schema::unsupported_fields(schema, &value) {
        out.warnings.push(format!(
            "{at}: {what}: field {field} is not supported by meshd; ignored"
        ));
    }
    let mut resource = resource;
    if let Resource::Route(route) = &mut resource {
        // A bad route is refused on its own: the file's other resources still apply.
        let checked = route_check::check(route);
        for note in &checked.notes {
            out.warnings.push(format!("{at}: {note}"));
        }
        route.notes = checked.notes;
        if !checked.errors.is_empty() {
            out.rejected.push(Rejected {
                key: route.key(),
                error: format!("{at} ({what}): {}", checked.errors.join("; ")),
            });
            return Ok(());
        }
    }
    if let Resource::Gateway(g) = &resource
        && !waypoints::is_waypoint_class(g)
    {
        out.warnings.push(format!(
            "{at}: {what}: gatewayClassName {:?} is not handled by meshd (only {}); ignored",
            g.spec.gateway_class_name,
            waypoints::WAYPOINT_CLASS
        ));
    }
    if let Resource::Service(s) = &resource {
        for (i, p) in s
            .spec
            .ports
            .iter()
            .enumerate()
            .filter(|(_, p)| !is_tcp(p.protocol.as_deref()))
        {
            let proto = p.protocol.as_deref().unwrap_or_default();
            out.warnings.push(format!(
                "{at}: {what}: spec.ports[{i}].protocol {proto}: the mesh carries TCP only; port left out"
            ));
        }
    }
    if matches!(resource, Resource::Namespace(_))
        && obj
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .is_some()
    {
        out.warnings.push(format!(
            "{at}: {what}: metadata.namespace on a Namespace; ignored"
        ));
    }
    out.resources.push(resource);
    Ok(())
}

fn typed(kind: &str, value: Value) -> Result<Resource, String> {
    let policy = |kind: PolicyKind, value: Value| -> Result<Resource, String> {
        let metadata =
            ObjectMeta::deserialize(value.get("metadata").cloned().unwrap_or(Value::Null))
                .map_err(|e| format!("metadata: {e}"))?;
        // An absent spec is `{}`: for AuthorizationPolicy that means "allow nothing", as in Istio.
        let spec = match value.get("spec") {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(s) => s.clone(),
        };
        Ok(Resource::Policy(Policy {
            kind,
            metadata,
            spec,
        }))
    };
    let mut r = match kind {
        "Namespace" => {
            Resource::Namespace(serde_json::from_value(value).map_err(|e| e.to_string())?)
        }
        "Pod" => Resource::Pod(serde_json::from_value(value).map_err(|e| e.to_string())?),
        "Service" => Resource::Service(serde_json::from_value(value).map_err(|e| e.to_string())?),
        "AuthorizationPolicy" => policy(PolicyKind::AuthorizationPolicy, value)?,
        "PeerAuthentication" => policy(PolicyKind::PeerAuthentication, value)?,
        "RequestAuthentication" => policy(PolicyKind::RequestAuthentication, value)?,
        "Gateway" => Resource::Gateway(serde_json::from_value(value).map_err(|e| e.to_string())?),
        "Deployment" | "ServiceAccount" => Resource::Passive(Passive {
            kind: kind.to_string(),
            metadata: metadata(&value)?,
        }),
        k if crate::resources::ROUTE_KINDS.contains(&k) => Resource::Route(Route {
            kind: kind.to_string(),
            metadata: metadata(&value)?,
            spec: value.get("spec").cloned().unwrap_or(Value::Null),
            notes: Vec::new(),
            rejected: None,
        }),
        other => return Err(format!("kind {other} has no typed form")),
    };
    match &mut r {
        Resource::Namespace(_) => {}
        Resource::Pod(p) => p.metadata.default_namespace(),
        Resource::Service(s) => s.metadata.default_namespace(),
        Resource::Policy(p) => p.metadata.default_namespace(),
        Resource::Gateway(g) => g.metadata.default_namespace(),
        Resource::Route(r) => r.metadata.default_namespace(),
        Resource::Passive(p) => p.metadata.default_namespace(),
    }
    Ok(r)
}

fn metadata(value: &Value) -> Result<ObjectMeta, String> {
    ObjectMeta::deserialize(value.get("metadata").cloned().unwrap_or(Value::Null))
        .map_err(|e| format!("metadata: {e}"))
}

fn validate(r: &Resource) -> Result<(), String> {
    let ip = |field: &str, s: &str| -> Result<(), String> {
        s.parse::<IpAddr>()
            .map(|_| ())
            .map_err(|_| format!("{field}: {s:?} is not an IP address"))
    };
    match r {
        Resource::Namespace(_) => Ok(()),
        Resource::Pod(p) => {
            if let Some(s) = p.status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
                ip("status.podIP", s)?;
            }
            for (i, a) in p.status.pod_ips.iter().enumerate() {
                ip(&format!("status.podIPs[{i}].ip"), &a.ip)?;
            }
            Ok(())
        }
        Resource::Service(s) => {
            if let Some(c) = s
                .spec
                .cluster_ip
                .as_deref()
                .filter(|c| !c.is_empty() && *c != "None")
            {
                ip("spec.clusterIP", c)?;
            }
            for (i, c) in s
                .spec
                .cluster_ips
                .iter()
                .enumerate()
                .filter(|(_, c)| c.as_str() != "None")
            {
                ip(&format!("spec.clusterIPs[{i}]"), c)?;
            }
            for (i, p) in s.spec.ports.iter().enumerate() {
                if let Some(IntOrString::Str(name)) = &p.target_port
                    && name.is_empty()
                {
                    return Err(format!("spec.ports[{i}].targetPort: empty port name"));
                }
            }
            Ok(())
        }
        Resource::Policy(p) => validate_policy(p),
        Resource::Gateway(g) => {
            for (i, l) in g.spec.listeners.iter().enumerate() {
                if l.name.is_empty() {
                    return Err(format!("spec.listeners[{i}].name: required"));
                }
                if l.port == 0 {
                    return Err(format!("spec.listeners[{i}].port: must be 1-65535"));
                }
            }
            Ok(())
        }
        Resource::Route(_) | Resource::Passive(_) => Ok(()),
    }
}

fn one_of(field: &str, v: Option<&Value>, allowed: &[&str]) -> Result<(), String> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
        Some(other) => Err(format!(
            "{field}: {other} is not one of {}",
            allowed.join(", ")
        )),
    }
}

fn validate_policy(p: &Policy) -> Result<(), String> {
    let Some(spec) = p.spec.as_object() else {
        return Err(format!("spec: expected a mapping, got {}", p.spec));
    };
    if let Some(sel) = spec.get("selector").filter(|s| !s.is_null()) {
        let labels = sel.get("matchLabels").unwrap_or(&Value::Null);
        let ok = sel.is_object()
            && (labels.is_null()
                || labels
                    .as_object()
                    .is_some_and(|m| m.values().all(Value::is_string)));
        if !ok {
            return Err("spec.selector: expected {matchLabels: {label: value}}".into());
        }
    }
    match p.kind {
        PolicyKind::AuthorizationPolicy => {
            one_of(
                "spec.action",
                spec.get("action"),
                &["ALLOW", "DENY", "AUDIT", "CUSTOM"],
            )?;
            if let Some(rules) = spec.get("rules").filter(|r| !r.is_null())
                && !rules.is_array()
            {
                return Err(format!("spec.rules: expected a list, got {rules}"));
            }
            if spec.get("action").and_then(Value::as_str) == Some("CUSTOM")
                && spec
                    .get("provider")
                    .and_then(|p| p.get("name"))
                    .and_then(Value::as_str)
                    .is_none()
            {
                return Err("spec.provider.name: required when action is CUSTOM".into());
            }
            Ok(())
        }
        // Shape only here; meshcore's policy engine validates the rules field by field.
        PolicyKind::RequestAuthentication => match spec.get("jwtRules").filter(|r| !r.is_null()) {
            Some(rules) if !rules.is_array() => {
                Err(format!("spec.jwtRules: expected a list, got {rules}"))
            }
            _ => Ok(()),
        },
        PolicyKind::PeerAuthentication => {
            const MODES: &[&str] = &["UNSET", "STRICT", "PERMISSIVE", "DISABLE"];
            one_of(
                "spec.mtls.mode",
                spec.get("mtls").and_then(|m| m.get("mode")),
                MODES,
            )?;
            if let Some(ports) = spec.get("portLevelMtls").filter(|p| !p.is_null()) {
                let Some(ports) = ports.as_object() else {
                    return Err(format!(
                        "spec.portLevelMtls: expected a mapping of port to {{mode}}, got {ports}"
                    ));
                };
                for (port, m) in ports {
                    if port.parse::<u16>().is_err() {
                        return Err(format!("spec.portLevelMtls: {port:?} is not a port number"));
                    }
                    one_of(
                        &format!("spec.portLevelMtls.{port}.mode"),
                        m.get("mode"),
                        MODES,
                    )?;
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::ResourceSet;
    use testbed::child::{limit_address_space, peak_rss_kib, run_child_test, yaml_alias_bomb};

    #[test]
    fn multi_document_file() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  nodeName: node-0
  containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: shop}
spec: {action: DENY, rules: [{}]}
---
";
        let parsed = parse_file("a.yaml", text).unwrap();
        assert_eq!(parsed.resources.len(), 4, "{parsed:?}");
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        let Resource::Pod(pod) = &parsed.resources[1] else {
            panic!()
        };
        assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(pod.service_account(), "default");
        assert_eq!(pod.ips(), vec!["10.0.0.1", "fd00::1"]);
        assert_eq!(pod.named_port("http"), Some(8080));
        let mut set = ResourceSet::default();
        for r in parsed.resources {
            set.insert(r);
        }
        assert!(set.pods.contains_key("default/web"));
        assert!(set.services.contains_key("shop/web"));
        assert!(set.policies.contains_key("AuthorizationPolicy/shop/deny"));
    }

    #[test]
    fn invalid_action_names_resource_and_field() {
        let text = "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns1}\nspec: {action: REJECT}\n";
        let err = parse_file("p.yaml", text).unwrap_err().to_string();
        assert!(err.contains("p.yaml"), "{err}");
        assert!(err.contains("AuthorizationPolicy ns1/p"), "{err}");
        assert!(err.contains("spec.action"), "{err}");
        assert!(err.contains("REJECT"), "{err}");
        let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: pa}\nspec: {mtls: {mode: STRICTER}}\n";
        let err = parse_file("pa.yaml", text).unwrap_err().to_string();
        assert!(
            err.contains("PeerAuthentication default/pa") && err.contains("spec.mtls.mode"),
            "{err}"
        );
    }

    #[test]
    fn malformed_yaml_names_file_and_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: [oops\n";
        let err = parse_file("broken.yaml", text).unwrap_err().to_string();
        assert!(err.contains("broken.yaml"), "{err}");
        assert!(err.contains("document 2"), "{err}");
        assert!(err.contains("line "), "{err}");
    }

    #[test]
    fn bad_field_types_and_ips_are_errors() {
        let err = parse_file(
            "f",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("status.podIP"), "{err}");
        let err = parse_file(
            "f",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: http}]}\n",
        );
        assert!(err.is_err());
        assert!(
            parse_file("f", "apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\n").is_err(),
            "name required"
        );
    }

    #[test]
    fn unknown_kinds_and_fields_are_warned() {
        let text = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se}
---
apiVersion: v1
kind: Service
metadata: {name: s, uid: abc}
spec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}
";
        let parsed = parse_file("w.yaml", text).unwrap();
        assert_eq!(parsed.resources.len(), 1);
        let w = parsed.warnings.join("\n");
        assert!(w.contains("w.yaml: document 1: kind ServiceEntry"), "{w}");
        assert!(w.contains("Service default/s: field spec.type"), "{w}");
        assert!(w.contains("field spec.ports[0].nodePort"), "{w}");
        assert!(
            !w.contains("uid"),
            "bookkeeping metadata is not worth a warning: {w}"
        );
    }

    #[test]
    fn waypoint_kinds_are_accepted() {
        let text = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec: {replicas: 2, template: {metadata: {labels: {app: web}}, spec: {containers: [{name: c}]}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec: {host: web}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec: {parentRefs: [{group: '', kind: Service, name: web}], rules: [{backendRefs: [{name: web, port: 80}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: shop}
spec: {parentRefs: [{group: '', kind: Service, name: web}], rules: [{backendRefs: [{name: web, port: 80}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec: {hosts: [web], http: [{corsPolicy: {allowOrigins: [{exact: 'https://x'}]}, route: [{destination: {host: web}}]}]}
";
        let parsed = parse_file("k.yaml", text).unwrap();
        let kinds: Vec<String> = parsed.resources.iter().map(Resource::describe).collect();
        assert_eq!(
            kinds,
            [
                "Deployment shop/web",
                "ServiceAccount shop/web",
                "Gateway shop/wp",
                "DestinationRule shop/web",
                "HTTPRoute shop/web",
                "GRPCRoute shop/grpc",
                "VirtualService shop/web"
            ]
        );
        // A field the route engine does not implement is accepted and reported, by field.
        assert_eq!(parsed.warnings.len(), 1, "{:?}", parsed.warnings);
        assert!(
            parsed.warnings[0].contains("document 7")
                && parsed.warnings[0].contains("VirtualService shop/web")
                && parsed.warnings[0].contains("spec.http[0].corsPolicy"),
            "{:?}",
            parsed.warnings
        );
        let Resource::Route(vs) = &parsed.resources[6] else {
            panic!()
        };
        assert_eq!(
            vs.notes,
            parsed
                .warnings
                .iter()
                .map(|w| w.replacen("k.yaml: document 7: ", "", 1))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn documents_are_counted_as_the_reader_counts_them() {
        // Empty documents produce no value; errors still name the document by its position.
        let text = "---\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n";
        let err = parse_file("n.yaml", text).unwrap_err().to_string();
        assert!(err.contains("n.yaml: document 3 (Pod default/p)"), "{err}");
        let text = "# leading comment\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\n---\nmetadata: [oops\n";
        let err = parse_file("s.yaml", text).unwrap_err().to_string();
        assert!(err.contains("s.yaml: document 3"), "{err}");
    }

    #[test]
    fn yaml_1_1_scalars_stay_strings_as_in_kubernetes() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {on: yes, mode: 0755, n: 1_000}}\n";
        let parsed = parse_file("l.yaml", text).unwrap();
        let Resource::Namespace(ns) = &parsed.resources[0] else {
            panic!("{parsed:?}")
        };
        assert_eq!(
            ns.metadata.labels.get("on").map(String::as_str),
            Some("yes")
        );
        assert_eq!(
            ns.metadata.labels.get("mode").map(String::as_str),
            Some("0755")
        );
        assert_eq!(
            ns.metadata.labels.get("n").map(String::as_str),
            Some("1_000")
        );
    }

    #[test]
    fn json_manifests_parse() {
        let text = "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"Namespace\",\n\t\"metadata\": {\"name\": \"j\"}\n}\n";
        let parsed = parse_file("j.json", text).unwrap();
        assert_eq!(parsed.resources.len(), 1);
    }

    #[test]
    fn deep_nesting_and_huge_files_are_rejected_by_name() {
        let deep = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {}\n",
            "[".repeat(100_000)
        );
        let err = parse_file("deep.yaml", &deep).unwrap_err().to_string();
        assert!(err.starts_with("deep.yaml: document 1:"), "{err}");
        let mut huge = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n");
        while huge.len() as u64 <= MAX_FILE_BYTES {
            huge.push_str("# padding padding padding padding padding padding padding padding\n");
        }
        let err = parse_file("huge.yaml", &huge).unwrap_err().to_string();
        assert!(
            err.starts_with("huge.yaml:") && err.contains("4 MiB"),
            "{err}"
        );
    }

    /// Run by the test below, in a child whose address space is capped at 1 GiB, so that a
    /// regression fails the test instead of exhausting the shared machine's memory.
    #[test]
    #[ignore = "run by alias_bomb_fails_fast_with_bounded_memory in a memory-limited child"]
    fn alias_bomb_child() {
        limit_address_space(1 << 30);
        let text = yaml_alias_bomb("Namespace");
        assert!(text.len() < 6000, "{}", text.len());
        let before = peak_rss_kib();
        let started = std::time::Instant::now();
        let result = parse_file("bomb.yaml", &text);
        let took = started.elapsed();
        let grew_kib = peak_rss_kib().saturating_sub(before);
        println!("alias bomb: {took:?}, peak RSS +{grew_kib} KiB");
        let err = result.unwrap_err().to_string();
        assert!(
            err.starts_with("bomb.yaml: document 1:") && err.contains("alias"),
            "{err}"
        );
        assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
        assert!(grew_kib < 100 * 1024, "peak RSS grew {grew_kib} KiB");
    }

    #[test]
    fn alias_bomb_fails_fast_with_bounded_memory() {
        run_child_test("parse::tests::alias_bomb_child");
    }
}
