//! The kinds the double serves: the built-in table and those registered by
//! CustomResourceDefinition objects. Owns lookup (by URL group/version/plural and by
//! apiVersion/kind); knows nothing of objects or HTTP.

use std::collections::BTreeMap;

use serde_json::Value;

/// One servable resource.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Kind {
    pub group: String,
    /// Served versions, preferred (storage) first.
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    /// Has a `/status` subresource (main endpoint ignores status, generation rules differ).
    pub status: bool,
    pub short_names: Vec<String>,
    /// Stored objects (false: TokenReview, create-only and forgotten).
    pub stored: bool,
    /// Registered by a CRD (deleted with it).
    pub from_crd: bool,
}

/// (group, plural): where objects of a kind live, whatever version they were written in.
pub(crate) type ResKey = (String, String);

impl Kind {
    pub fn key(&self) -> ResKey {
        (self.group.clone(), self.plural.clone())
    }
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }
    /// `pods`, `leases.coordination.k8s.io`: how error messages name the resource.
    pub fn resource_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
    pub fn verbs(&self) -> Vec<&'static str> {
        if !self.stored {
            return vec!["create"];
        }
        vec![
            "create", "delete", "get", "list", "patch", "update", "watch",
        ]
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    status: bool,
    short: &[&str],
) -> Kind {
    Kind {
        group: group.into(),
        versions: vec![version.into()],
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        namespaced,
        status,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        stored: true,
        from_crd: false,
    }
}

/// Every kind, keyed by (group, plural).
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    kinds: BTreeMap<ResKey, Kind>,
}

impl Registry {
    pub fn new() -> Self {
        let mut kinds = vec![
            builtin("", "v1", "namespaces", "Namespace", false, false, &["ns"]),
            builtin("", "v1", "pods", "Pod", true, true, &["po"]),
            builtin("", "v1", "services", "Service", true, true, &["svc"]),
            builtin(
                "",
                "v1",
                "serviceaccounts",
                "ServiceAccount",
                true,
                false,
                &["sa"],
            ),
            builtin("", "v1", "configmaps", "ConfigMap", true, false, &["cm"]),
            builtin("", "v1", "secrets", "Secret", true, false, &[]),
            builtin("", "v1", "nodes", "Node", false, true, &["no"]),
            builtin("", "v1", "events", "Event", true, false, &["ev"]),
            // kube's event Recorder writes these.
            builtin(
                "events.k8s.io",
                "v1",
                "events",
                "Event",
                true,
                false,
                &["ev"],
            ),
            builtin(
                "discovery.k8s.io",
                "v1",
                "endpointslices",
                "EndpointSlice",
                true,
                false,
                &[],
            ),
            builtin(
                "apps",
                "v1",
                "deployments",
                "Deployment",
                true,
                true,
                &["deploy"],
            ),
            builtin("apps", "v1", "daemonsets", "DaemonSet", true, true, &["ds"]),
            builtin(
                "policy",
                "v1",
                "poddisruptionbudgets",
                "PodDisruptionBudget",
                true,
                true,
                &["pdb"],
            ),
            builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "roles",
                "Role",
                true,
                false,
                &[],
            ),
            builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "rolebindings",
                "RoleBinding",
                true,
                false,
                &[],
            ),
            builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                "ClusterRole",
                false,
                false,
                &[],
            ),
            builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterrolebindings",
                "ClusterRoleBinding",
                false,
                false,
                &[],
            ),
            builtin(
                "coordination.k8s.io",
                "v1",
                "leases",
                "Lease",
                true,
                false,
                &[],
            ),
            builtin(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                true,
                &["crd", "crds"],
            ),
            builtin(
                "authentication.k8s.io",
                "v1",
                "tokenreviews",
                "TokenReview",
                false,
                false,
                &[],
            ),
        ];
        if let Some(tr) = kinds.last_mut() {
            tr.stored = false;
        }
        Registry {
            kinds: kinds.into_iter().map(|k| (k.key(), k)).collect(),
        }
    }

    /// The kind served at `/apis/{group}/{version}/{plural}` (group "" for `/api/v1`).
    pub fn by_url(&self, group: &str, version: &str, plural: &str) -> Option<&Kind> {
        self.kinds
            .get(&(group.to_string(), plural.to_string()))
            .filter(|k| k.versions.iter().any(|v| v == version))
    }

    pub fn by_key(&self, key: &ResKey) -> Option<&Kind> {
        self.kinds.get(key)
    }

    /// The kind an object's `apiVersion` + `kind` name, and the version it names.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<(&Kind, String)> {
        let (group, version) = split_api_version(api_version);
        self.kinds
            .values()
            .find(|k| k.group == group && k.kind == kind && k.versions.iter().any(|v| v == version))
            .map(|k| (k, version.to_string()))
    }

    /// Every (group, version) served, with its kinds; core ("") first.
    pub fn group_versions(&self) -> BTreeMap<String, BTreeMap<String, Vec<&Kind>>> {
        let mut out: BTreeMap<String, BTreeMap<String, Vec<&Kind>>> = BTreeMap::new();
        for k in self.kinds.values() {
            for v in &k.versions {
                out.entry(k.group.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default()
                    .push(k);
            }
        }
        out
    }

    /// The preferred version of a group: the first version of its first kind (CRDs list
    /// their storage version first).
    pub fn preferred_version(&self, group: &str) -> Option<String> {
        self.kinds
            .values()
            .find(|k| k.group == group)
            .and_then(|k| k.versions.first().cloned())
    }

    /// Registers (or re-registers) what a CRD object declares. An error says what is wrong.
    pub fn register_crd(&mut self, crd: &Value) -> Result<ResKey, String> {
        let kind = crd_kind(crd)?;
        if let Some(existing) = self.kinds.get(&kind.key())
            && !existing.from_crd
        {
            return Err(format!(
                "{}.{} is a built-in resource",
                kind.plural, kind.group
            ));
        }
        let key = kind.key();
        self.kinds.insert(key.clone(), kind);
        Ok(key)
    }

    pub fn unregister_crd(&mut self, key: &ResKey) {
        if self.kinds.get(key).is_some_and(|k| k.from_crd) {
            self.kinds.remove(key);
        }
    }
}

pub(crate) fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// The kind a CRD declares (`spec.group`, `spec.names`, `spec.scope`, served versions).
pub(crate) fn crd_kind(crd: &Value) -> Result<Kind, String> {
    let spec = &crd["spec"];
    let text = |v: &Value, what: &str| -> Result<String, String> {
        v.as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| format!("spec.{what}: Required value"))
    };
    let group = text(&spec["group"], "group")?;
    let names = &spec["names"];
    let plural = text(&names["plural"], "names.plural")?;
    let kind = text(&names["kind"], "names.kind")?;
    let singular = names["singular"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_lowercase());
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    if name != format!("{plural}.{group}") {
        return Err(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        ));
    }
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Err("spec.scope: Unsupported value: must be Namespaced or Cluster".into()),
    };
    let mut versions = Vec::new();
    let mut status = false;
    for v in spec["versions"].as_array().into_iter().flatten() {
        let Some(vn) = v["name"].as_str() else {
            return Err("spec.versions[].name: Required value".into());
        };
        if v["served"].as_bool() != Some(true) {
            continue;
        }
        if v["subresources"]["status"].is_object() {
            status = true;
        }
        if v["storage"].as_bool() == Some(true) {
            versions.insert(0, vn.to_string());
        } else {
            versions.push(vn.to_string());
        }
    }
    if versions.is_empty() {
        return Err("spec.versions: Invalid value: must have at least one served version".into());
    }
    let short_names = names["shortNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    Ok(Kind {
        group,
        versions,
        plural,
        singular,
        kind,
        namespaced,
        status,
        short_names,
        stored: true,
        from_crd: true,
    })
}

/// The CRDs Istio's base chart and the Gateway API install, for the kinds meshd reads
/// (no schema: `x-kubernetes-preserve-unknown-fields`).
pub(crate) fn mesh_crds() -> Vec<Value> {
    let sec = ["v1", "v1beta1"];
    let net = ["v1", "v1beta1", "v1alpha3"];
    let gw = ["v1", "v1beta1"];
    let mut out = Vec::new();
    for kind in [
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
    ] {
        out.push(crd("security.istio.io", kind, true, &sec));
    }
    for kind in [
        "VirtualService",
        "DestinationRule",
        "Gateway",
        "ServiceEntry",
        "WorkloadEntry",
    ] {
        out.push(crd("networking.istio.io", kind, true, &net));
    }
    out.push(crd("gateway.networking.k8s.io", "GatewayClass", false, &gw));
    for kind in ["Gateway", "HTTPRoute", "GRPCRoute", "ReferenceGrant"] {
        out.push(crd("gateway.networking.k8s.io", kind, true, &gw));
    }
    out
}

fn plural_of(kind: &str) -> String {
    let lower = kind.to_lowercase();
    if lower.ends_with('y') && !lower.ends_with("ay") && !lower.ends_with("ey") {
        format!("{}ies", &lower[..lower.len() - 1])
    } else if lower.ends_with("ss") {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

fn crd(group: &str, kind: &str, namespaced: bool, versions: &[&str]) -> Value {
    let plural = plural_of(kind);
    let versions: Vec<Value> = versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::json!({
                "name": v,
                "served": true,
                "storage": i == 0,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {"status": {}},
            })
        })
        .collect();
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "names": {
                "plural": plural,
                "singular": kind.to_lowercase(),
                "kind": kind,
                "listKind": format!("{kind}List"),
            },
            "scope": if namespaced { "Namespaced" } else { "Cluster" },
            "versions": versions,
        }
    })
}
