//! The objects `meshctl install` applies and `meshctl uninstall` removes.
//!
//! By default they are the kustomize overlays of `manifests/` (`overlays/dev`, `overlays/ha`)
//! and its CRDs (`crds/`) as rendered at build time: the rendered YAML is checked in under
//! `src/rendered/` and compiled into the binary, so a user
//! who has only the meshctl binary (no kubectl, no checkout) installs exactly what the
//! manifests say; the test `rendered.rs` fails when a checked-in file differs from `kubectl
//! kustomize` of its overlay (and says how to refresh it). `--manifests PATH` takes a rendered
//! file, or a kustomize directory rendered at run time with `kubectl kustomize` (a customized
//! install; needs kubectl). Owns only where the objects come from and their order; applying
//! them is `install`'s.

use std::path::Path;

use serde_json::Value;

use crate::backend::str_at;

pub const DEV: &str = include_str!("rendered/dev.yaml");
pub const HA: &str = include_str!("rendered/ha.yaml");

pub const CRDS: &str = include_str!("rendered/crds.yaml");

/// The label every component of ours carries (set by the base kustomization's `labels:`).
pub const PART_OF: &str = "app.kubernetes.io/part-of";
/// The label our CRDs carry (the crds kustomization's).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const MARKERS: [&str; 2] = [PART_OF, MANAGED_BY];

#[derive(Debug, thiserror::Error)]
pub enum ManifestsError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error(
        "rendering {path} needs kubectl (`kubectl kustomize`): {message}; install kubectl, or render the directory yourself and pass the file to --manifests"
    )]
    Kubectl { path: String, message: String },
    #[error("{path}: `kubectl kustomize` failed: {message}")]
    Render { path: String, message: String },
    #[error("{what}: {message}")]
    Parse { what: String, message: String },
    #[error(
        "{what}: object {index} has no apiVersion, kind or metadata.name; every document must be a whole Kubernetes object"
    )]
    Incomplete { what: String, index: usize },
    #[error("{what}: no Namespace object: the manifests must declare the mesh's namespace")]
    NoNamespace { what: String },
}

/// The objects to install, in apply order, and the mesh's namespace.
#[derive(Debug, Clone)]
pub struct Manifests {
    /// Where they came from, for messages.
    pub what: String,
    pub objects: Vec<Value>,
    pub namespace: String,
}

impl Manifests {
    /// The embedded overlay `name` (dev, ha) and the embedded CRDs.
    pub fn embedded(overlay: &str, text: &str) -> Result<Manifests, ManifestsError> {
        Manifests::parse(
            format!("the built-in {overlay} manifests"),
            &format!("{text}\n---\n{CRDS}"),
        )
    }

    /// A rendered file, or a kustomize directory rendered with `kubectl kustomize`.
    pub fn from_path(path: &Path) -> Result<Manifests, ManifestsError> {
        let shown = path.display().to_string();
        let read = |message: String| ManifestsError::Read {
            path: shown.clone(),
            message,
        };
        let md = std::fs::metadata(path).map_err(|e| read(e.to_string()))?;
        let text = if md.is_dir() {
            render(path)?
        } else {
            if md.len() > meshcore::manifest::MAX_FILE_BYTES {
                return Err(read(format!(
                    "larger than {} bytes",
                    meshcore::manifest::MAX_FILE_BYTES
                )));
            }
            std::fs::read_to_string(path).map_err(|e| read(e.to_string()))?
        };
        Manifests::parse(shown, &text)
    }

    fn parse(what: String, text: &str) -> Result<Manifests, ManifestsError> {
        let docs = meshcore::manifest::parse_docs(text).map_err(|e| ManifestsError::Parse {
            what: what.clone(),
            message: e.to_string(),
        })?;
        let mut objects = Vec::new();
        for (index, doc) in docs.into_iter().enumerate() {
            // kustomize never writes empty documents, but a hand-written file may.
            if doc.is_null() {
                continue;
            }
            let whole = ["apiVersion", "kind"]
                .iter()
                .all(|k| doc.get(*k).and_then(Value::as_str).is_some())
                && str_at(&doc, &["metadata", "name"]).is_some();
            if !whole {
                return Err(ManifestsError::Incomplete { what, index });
            }
            objects.push(doc);
        }
        objects.sort_by_key(|o| rank(kind(o)));
        let namespace = objects
            .iter()
            .find(|o| kind(o) == "Namespace")
            .and_then(|o| str_at(o, &["metadata", "name"]))
            .map(str::to_string)
            .ok_or_else(|| ManifestsError::NoNamespace { what: what.clone() })?;
        Ok(Manifests {
            what,
            objects,
            namespace,
        })
    }

    /// The CustomResourceDefinitions.
    pub fn crds(&self) -> impl Iterator<Item = &Value> {
        self.objects.iter().filter(|o| is_crd(o))
    }

    /// Everything but the CRDs, in apply order.
    pub fn others(&self) -> impl Iterator<Item = &Value> {
        self.objects.iter().filter(|o| !is_crd(o))
    }

    /// The workloads whose readiness `install` waits for and `check` reports (Deployments and
    /// DaemonSets).
    pub fn workloads(&self) -> impl Iterator<Item = &Value> {
        self.objects
            .iter()
            .filter(|o| matches!(kind(o), "Deployment" | "DaemonSet"))
    }
}

pub fn kind(o: &Value) -> &str {
    o.get("kind").and_then(Value::as_str).unwrap_or("")
}

pub fn api_version(o: &Value) -> &str {
    o.get("apiVersion").and_then(Value::as_str).unwrap_or("")
}

pub fn is_crd(o: &Value) -> bool {
    kind(o) == "CustomResourceDefinition" && api_version(o).starts_with("apiextensions.k8s.io/")
}

/// Whether a live object is ours: it carries one of our marker labels with our value (the
/// kustomizations label everything they render: `part-of` the components, `managed-by` the
/// CRDs), or meshctl applied it. A CRD Istio or the Gateway API installed has neither, even
/// when its other labels are the same (ours are verbatim copies).
pub fn is_ours(live: &Value, rendered: &Value) -> bool {
    let label = |o: &Value, k: &str| {
        o.pointer("/metadata/labels")
            .and_then(|l| l.get(k))
            .cloned()
    };
    let labelled = MARKERS
        .iter()
        .any(|k| label(rendered, k).is_some_and(|v| label(live, k) == Some(v)));
    let applied = live
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .is_some_and(|m| {
            m.iter().any(|e| {
                e.get("manager").and_then(Value::as_str) == Some(crate::cluster::FIELD_MANAGER)
            })
        });
    labelled || applied
}

/// Apply order (as Helm installs): what others refer to first, workloads late, custom
/// resources (GatewayClass) last. Uninstall deletes in reverse.
fn rank(kind: &str) -> usize {
    const ORDER: &[&str] = &[
        "CustomResourceDefinition",
        "Namespace",
        "ResourceQuota",
        "LimitRange",
        "PriorityClass",
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "PodDisruptionBudget",
        "DaemonSet",
        "Deployment",
    ];
    ORDER.iter().position(|k| *k == kind).unwrap_or(ORDER.len())
}

/// `kubectl kustomize DIR`.
fn render(dir: &Path) -> Result<String, ManifestsError> {
    let path = dir.display().to_string();
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| ManifestsError::Kubectl {
            path: path.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ManifestsError::Render {
            path,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    String::from_utf8(out.stdout).map_err(|e| ManifestsError::Render {
        path,
        message: e.to_string(),
    })
}
