//! [`Backend`] on a cluster, for the waypoint commands: Gateways and Namespaces are the API's
//! objects, and a waypoint's status is the Gateway's own `status` (Accepted / Programmed, which
//! meshd's leader writes with server-side apply on `/status`). A new object is created, an
//! existing one replaced with the resourceVersion it was read at (a concurrent change is a
//! conflict to retry, never overwritten); a namespace label is a merge patch. Owns only this
//! mapping.

use serde_json::{Value, json};

use super::{Cluster, ClusterError};
use crate::backend::{Applied, Backend, BackendError, Kind, kind_and_name, namespace_of};

impl Backend for Cluster {
    fn describe(&self) -> String {
        Cluster::describe(self)
    }

    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Option<Value>, BackendError> {
        let ns = kind.namespaced().then_some(namespace);
        Cluster::get(self, kind.api_version(), kind.name(), ns, name).map_err(source)
    }

    fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Value>, BackendError> {
        let ns = namespace.filter(|_| kind.namespaced());
        Cluster::list(self, kind.api_version(), kind.name(), ns, None).map_err(source)
    }

    fn apply(&self, object: &Value) -> Result<Applied, BackendError> {
        let (kind, name) = kind_and_name(object)?;
        let ns = kind.namespaced().then(|| namespace_of(object));
        let live = Cluster::get(self, kind.api_version(), kind.name(), ns, name).map_err(source)?;
        match live {
            None => {
                let mut new = object.clone();
                if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("resourceVersion");
                }
                self.create(&new).map_err(source)?;
                Ok(Applied::Created)
            }
            Some(live) if same_intent(&live, object) => Ok(Applied::Unchanged),
            Some(live) => {
                let mut new = object.clone();
                if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                    // Left out, the API keeps them (and moves changed fields to meshctl).
                    m.remove("managedFields");
                }
                // Optimistic: replace what was read, or fail with 409 if it changed since.
                new["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"].clone();
                self.replace(&new).map_err(source)?;
                Ok(Applied::Updated)
            }
        }
    }

    fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<bool, BackendError> {
        let ns = kind.namespaced().then_some(namespace);
        Cluster::delete(self, kind.api_version(), kind.name(), ns, name).map_err(source)
    }

    fn set_namespace_label(
        &self,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<(), BackendError> {
        let patch = json!({"metadata": {"labels": {key: value}}});
        match self.merge_patch("v1", "Namespace", None, namespace, &patch) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Err(BackendError::NoNamespace {
                namespace: namespace.to_string(),
                place: Cluster::describe(self),
            }),
            Err(e) => Err(source(e)),
        }
    }

    fn status(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, BackendError> {
        let Some(obj) = Backend::get(self, kind, namespace, name)? else {
            return Ok(None);
        };
        // An object nobody reported on has no status, or an empty one.
        match obj.get("status") {
            Some(s) if s.as_object().is_some_and(|o| !o.is_empty()) => {
                Ok(Some(json!({"status": s})))
            }
            _ => Ok(None),
        }
    }

    fn origin(&self, _kind: Kind, _namespace: &str, _name: &str) -> Option<String> {
        None
    }
}

/// Whether applying `wanted` over `live` would change what the user declared (labels,
/// annotations, spec); server-owned metadata and status do not count.
fn same_intent(live: &Value, wanted: &Value) -> bool {
    ["/metadata/labels", "/metadata/annotations", "/spec"]
        .iter()
        .all(|p| {
            let norm = |v: Option<&Value>| match v {
                None | Some(Value::Null) => json!({}),
                Some(v) => v.clone(),
            };
            norm(live.pointer(p)) == norm(wanted.pointer(p))
        })
}

fn source(e: ClusterError) -> BackendError {
    BackendError::Source {
        path: "the Kubernetes API".to_string(),
        message: e.to_string(),
    }
}
