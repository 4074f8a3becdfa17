//! What meshctl needs from where the mesh's objects live: get, list, apply and delete objects
//! by kind, label a namespace, and read the status the control plane reports. Owns only this
//! interface and its error type; local mode implements it in [`crate::local`], a Kubernetes
//! backend can implement it against the API server (objects are plain JSON, as kubectl sees
//! them). Commands never touch files or APIs themselves.

use serde_json::Value;

/// The kinds meshctl handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gateway,
    Namespace,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Gateway => "Gateway",
            Kind::Namespace => "Namespace",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway.networking.k8s.io/v1",
            Kind::Namespace => "v1",
        }
    }

    /// Cluster-scoped kinds ignore the `namespace` argument of [`Backend`]'s methods.
    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Gateway)
    }

    /// Whether `doc` is an object of this kind (any version of its API group).
    pub fn matches(self, doc: &Value) -> bool {
        let group = |v: &str| v.rsplit_once('/').map_or("", |(g, _)| g).to_string();
        doc.get("kind").and_then(Value::as_str) == Some(self.name())
            && doc
                .get("apiVersion")
                .and_then(Value::as_str)
                .is_some_and(|v| group(v) == group(self.api_version()))
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        [Kind::Gateway, Kind::Namespace]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// What [`Backend::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A file (or API object) that could not be read, parsed or written; `path` names it.
    #[error("{path}: {message}")]
    Source { path: String, message: String },
    #[error(
        "namespace {namespace} not found in {place}: create it first (a `kind: Namespace` document with `metadata.name: {namespace}`)"
    )]
    NoNamespace { namespace: String, place: String },
    #[error(
        "no status to read: pass --status-dir DIR (the status/ directory under meshd's --write-dir) or set MESH_STATUS_DIR"
    )]
    NoStatusSource,
    #[error("cannot apply this object: {0}")]
    Invalid(String),
}

/// Where the mesh's objects live. Objects are whole Kubernetes objects as JSON.
pub trait Backend {
    /// Where objects live, for messages ("config directory /x", "cluster c").
    fn describe(&self) -> String;
    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Option<Value>, BackendError>;
    /// Objects of `kind` in `namespace`, or in all namespaces.
    fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Value>, BackendError>;
    /// Creates or replaces the object named by its own kind, namespace and name.
    fn apply(&self, object: &Value) -> Result<Applied, BackendError>;
    /// Deletes the object; false when there was none.
    fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<bool, BackendError>;
    /// Sets one label on an existing Namespace ([`BackendError::NoNamespace`] if none).
    fn set_namespace_label(
        &self,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<(), BackendError>;
    /// The object's status as the control plane reported it (`{"status": {...}}`), None when
    /// nothing was reported yet.
    fn status(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, BackendError>;
    /// Where the object is declared, for messages that say what to edit (a file, locally).
    fn origin(&self, kind: Kind, namespace: &str, name: &str) -> Option<String>;
}

/// `metadata.namespace` of a namespaced object, Kubernetes' default when absent.
pub fn namespace_of(doc: &Value) -> &str {
    str_at(doc, &["metadata", "namespace"]).unwrap_or("default")
}

pub fn name_of(doc: &Value) -> Option<&str> {
    str_at(doc, &["metadata", "name"])
}

/// The kind and name of an object to apply: [`BackendError::Invalid`] when meshctl does not
/// handle its kind or it has no name.
pub fn kind_and_name(object: &Value) -> Result<(Kind, &str), BackendError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .and_then(Kind::from_name)
        .ok_or_else(|| BackendError::Invalid("unknown kind".into()))?;
    let name = name_of(object).ok_or_else(|| BackendError::Invalid("no name".into()))?;
    Ok((kind, name))
}

pub fn str_at<'a>(doc: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(doc, |v, p| v.get(*p))
        .and_then(Value::as_str)
}
