//! The update path of the store: PUT semantics (and the last step of PATCH and apply) —
//! optimistic concurrency, what the status subresource lets each endpoint change, server-set
//! metadata kept, generation, no-op writes, and a finalized object going on its last update.

use serde_json::{Value, json};

use super::super::apply;
use super::super::defaults;
use super::super::errors::ApiErr;
use super::super::kinds::Kind;
use super::super::meta;
use super::{EventType, Part, State, finalizable, kind_key_of_crd};

impl State {
    /// PUT semantics (and the last step of PATCH and apply). `precondition`: a non-empty
    /// `metadata.resourceVersion` in `new` must be the current one.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        kind: &Kind,
        version: &str,
        ns: &str,
        name: &str,
        mut new: Value,
        part: Part,
        manager: Option<&str>,
    ) -> Result<Value, ApiErr> {
        let Some(old) = self.get(kind, ns, name).cloned() else {
            return Err(ApiErr::not_found(&kind.resource_name(), name));
        };
        if !new.is_object() {
            return Err(ApiErr::bad_request("the body must be a JSON object"));
        }
        if let Some(given) = new["metadata"]["resourceVersion"].as_str()
            && !given.is_empty()
            && Some(given) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiErr::stale(&kind.resource_name(), name));
        }
        match new["metadata"]["name"].as_str() {
            Some(n) if n != name => {
                return Err(ApiErr::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        if kind.namespaced
            && let Some(n) = new["metadata"]["namespace"].as_str()
            && !n.is_empty()
            && n != ns
        {
            return Err(ApiErr::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut merged = match part {
            Part::Status => {
                let mut m = old.clone();
                m["status"] = new["status"].take();
                // Kubernetes' pod status strategy resets spec and ownerReferences only: node
                // agents (Istio's CNI, mesh-cni) annotate pods through pods/status.
                if kind.kind == "Pod" && kind.group.is_empty() {
                    for key in ["labels", "annotations"] {
                        match new["metadata"][key].take() {
                            Value::Null => {
                                if let Some(meta) = m["metadata"].as_object_mut() {
                                    meta.remove(key);
                                }
                            }
                            v => m["metadata"][key] = v,
                        }
                    }
                }
                m
            }
            Part::Main if kind.status => {
                new["status"] = old["status"].clone();
                new
            }
            _ => new,
        };
        if merged["status"].is_null()
            && let Some(o) = merged.as_object_mut()
        {
            o.remove("status");
        }
        merged["apiVersion"] = json!(kind.api_version(version));
        merged["kind"] = json!(kind.kind);
        if !merged["metadata"].is_object() {
            merged["metadata"] = json!({});
        }
        let om = &old["metadata"];
        let m = &mut merged["metadata"];
        m["name"] = json!(name);
        if kind.namespaced {
            m["namespace"] = json!(ns);
        }
        for kept in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match om.get(kept) {
                Some(v) => m[kept] = v.clone(),
                None => {
                    if let Some(o) = m.as_object_mut() {
                        o.remove(kept);
                    }
                }
            }
        }
        if kind.kind == "Service" && kind.group.is_empty() {
            defaults::service_on_update(&old, &mut merged)?;
        }
        if meta::spec_changed(&old, &merged, kind.status) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            merged["metadata"]["generation"] = json!(g);
        }
        if kind.kind == "CustomResourceDefinition" && part != Part::Status {
            let crd = super::super::kinds::crd_kind(&merged).map_err(ApiErr::invalid)?;
            if crd.key() != kind_key_of_crd(&old) {
                return Err(ApiErr::invalid("spec.names and spec.group are immutable"));
            }
        }
        if meta::same_object(&old, &merged) {
            return Ok(old);
        }
        let now = meta::now_rfc3339();
        if let Some(mgr) = manager {
            apply::record_update(Some(&old), &mut merged, mgr, &now);
        }
        if kind.kind == "CustomResourceDefinition" {
            self.kinds.register_crd(&merged).map_err(ApiErr::invalid)?;
        }
        let rv = self.next_rv();
        merged["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.insert(kind, ns, name, merged.clone());
        if finalizable(&merged) {
            // The write that drops the last finalizer deletes the object (one DELETED event,
            // as the real server does it in the same transaction).
            return Ok(self.remove(kind, ns, name).unwrap_or(merged));
        }
        self.emit(&kind.key(), EventType::Modified, merged.clone(), Some(old));
        Ok(merged)
    }
}
