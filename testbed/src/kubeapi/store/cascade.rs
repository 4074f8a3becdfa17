//! Deletion in the store: finalizers (mark, then wait), DELETED with a new RV, and the
//! cascades a removal starts — a namespace's contents, a CRD's objects, and background
//! garbage collection of dependents whose every owner is gone (or orphaning them).

use serde_json::{Value, json};

use super::super::errors::ApiErr;
use super::super::kinds::Kind;
use super::super::meta;
use super::{EventType, ObjKey, Part, Propagation, State, kind_key_of_crd};

impl State {
    /// DELETE semantics: with finalizers, marks the object (deletionTimestamp) and returns it;
    /// otherwise removes it and collects dependents.
    pub fn delete(
        &mut self,
        kind: &Kind,
        ns: &str,
        name: &str,
        propagation: Propagation,
        precondition: &Value,
    ) -> Result<Value, ApiErr> {
        let Some(obj) = self.get(kind, ns, name).cloned() else {
            return Err(ApiErr::not_found(&kind.resource_name(), name));
        };
        for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = precondition[field].as_str()
                && Some(want) != obj["metadata"][field].as_str()
            {
                return Err(ApiErr::conflict(
                    &kind.resource_name(),
                    name,
                    &format!(
                        "Precondition failed: {what} in precondition: {want}, {what} in object meta: {}",
                        obj["metadata"][field].as_str().unwrap_or_default()
                    ),
                ));
            }
        }
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if propagation == Propagation::Orphan {
            self.orphan_dependents(&uid);
        }
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if !obj["metadata"]["deletionTimestamp"].is_null() {
                return Ok(obj);
            }
            let mut marked = obj.clone();
            marked["metadata"]["deletionTimestamp"] = json!(meta::now_rfc3339());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            let g = obj["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            marked["metadata"]["generation"] = json!(g);
            let rv = self.next_rv();
            marked["metadata"]["resourceVersion"] = json!(rv.to_string());
            self.insert(kind, ns, name, marked.clone());
            self.emit(&kind.key(), EventType::Modified, marked.clone(), Some(obj));
            return Ok(marked);
        }
        Ok(self.remove(kind, ns, name).unwrap_or(obj))
    }

    /// Takes an object out for good (DELETED with a new RV) and runs the cascades: a
    /// namespace's contents, a CRD's objects, dependents whose every owner is gone.
    pub(super) fn remove(&mut self, kind: &Kind, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self.take(kind, ns, name)?;
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit(&kind.key(), EventType::Deleted, obj.clone(), None);
        if kind.group.is_empty() && kind.plural == "namespaces" {
            self.delete_namespace_contents(name);
        }
        if kind.kind == "CustomResourceDefinition" {
            let key = kind_key_of_crd(&obj);
            if let Some(crd_kind) = self.kinds.by_key(&key).cloned() {
                let all: Vec<ObjKey> = self
                    .objects
                    .get(&key)
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                for (ons, oname) in all {
                    self.remove(&crd_kind, &ons, &oname);
                }
            }
            self.kinds.unregister_crd(&key);
        }
        self.collect_dependents(&uid);
        Some(obj)
    }

    fn delete_namespace_contents(&mut self, ns: &str) {
        let kinds: Vec<Kind> = self
            .objects
            .keys()
            .filter_map(|k| self.kinds.by_key(k).filter(|k| k.namespaced).cloned())
            .collect();
        for kind in kinds {
            let names: Vec<String> = self
                .list(&kind, Some(ns))
                .iter()
                .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
                .collect();
            for name in names {
                let _ = self.delete(&kind, ns, &name, Propagation::Background, &Value::Null);
            }
        }
    }

    /// Objects that name `uid` as an owner: (kind, namespace, name, object).
    fn dependents(&self, uid: &str) -> Vec<(Kind, String, String, Value)> {
        let Some(set) = self.dependents.get(uid) else {
            return Vec::new();
        };
        let mut out: Vec<_> = set
            .iter()
            .filter_map(|(key, (ns, name))| {
                let kind = self.kinds.by_key(key)?;
                let obj = self.objects.get(key)?.get(&(ns.clone(), name.clone()))?;
                Some((kind.clone(), ns.clone(), name.clone(), obj.clone()))
            })
            .collect();
        // Deterministic order (the index is a hash set).
        out.sort_by(|a, b| {
            (&a.0.group, &a.0.plural, &a.1, &a.2).cmp(&(&b.0.group, &b.0.plural, &b.1, &b.2))
        });
        out
    }

    /// Background garbage collection: dependents whose every owner is gone are deleted.
    fn collect_dependents(&mut self, uid: &str) {
        if uid.is_empty() {
            return;
        }
        for (kind, ns, name, obj) in self.dependents(uid) {
            let orphaned = obj["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|r| r["uid"].as_str().is_none_or(|u| !self.uids.contains_key(u)));
            if orphaned {
                let _ = self.delete(&kind, &ns, &name, Propagation::Background, &Value::Null);
            }
        }
    }

    /// Orphan propagation: dependents lose their reference to `uid` and stay.
    fn orphan_dependents(&mut self, uid: &str) {
        for (kind, ns, name, mut obj) in self.dependents(uid) {
            if let Some(refs) = obj["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| r["uid"] != uid);
            }
            let version = kind.versions[0].clone();
            let _ = self.update(&kind, &version, &ns, &name, obj, Part::All, None);
        }
    }
}
