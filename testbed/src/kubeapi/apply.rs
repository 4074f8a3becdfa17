//! Server-side apply, a documented subset of structured-merge-diff, and the `managedFields`
//! bookkeeping of other writes.
//!
//! Owns the arithmetic of field ownership on `serde_json::Value`s; the store, the HTTP
//! handling and server-owned metadata (uid, resourceVersion, generation, timestamps) are the
//! caller's.
//!
//! The subset, precisely:
//! - A field set is a set of paths. Path elements are a field name (`f:name`) or a list-map
//!   item (`k:{"name":"app"}`). Lists of objects are list-maps when [`super::patch::list_map_key`]
//!   names their key (containers, env, volumes, ... by `name`, ports by `containerPort` or `port`
//!   plus `protocol` (default TCP), conditions by `type`, ownerReferences by `uid`); every other
//!   list is atomic (one leaf, owned whole). The set holds leaves, list-map items, and the maps
//!   `labels`, `annotations`, ... (granular maps, listed in [`GRANULAR_MAPS`]) themselves: the
//!   members the API writes as `.` in `fieldsV1`. Empty objects are leaves too.
//! - Not tracked: apiVersion, kind, metadata name/namespace and server-owned metadata
//!   ([`UNTRACKED_METADATA`]).
//! - `metadata.managedFields` entries are as the API writes them: `manager`, `operation`
//!   (`Apply` | `Update`), `apiVersion`, `time`, `fieldsType: FieldsV1`, `fieldsV1`.
//! - apply: the manager's `Apply` entry becomes exactly the applied configuration's set.
//!   Fields in its previous set and not in the new one are removed from the object unless
//!   another entry owns them (or something under them). The configuration is merged in: maps
//!   by key, list-maps by item key, atomic lists and scalars replaced. `null`s in the
//!   configuration are ignored.
//! - Conflicts: a leaf the configuration sets to a value different from the live one, owned by
//!   an entry of another manager (the applier's own `Update` entry never conflicts) at the
//!   same path (or an atomic ancestor/descendant) → [`ApplyError::Conflict`] with
//!   `(.spec.containers[name="app"].image, manager)` pairs, unless `force`, which takes those
//!   paths away from their owners. Two managers applying the same value share the field.
//! - record_update (create/update/patch): the manager's `Update` entry gains every leaf whose
//!   value changed or appeared; other entries lose those leaves; every entry loses paths no
//!   longer in the object. Entries left empty are dropped, as the API does.
//!   `subresource` is not recorded.

mod fields;
#[cfg(test)]
mod tests;

use serde_json::{Map, Value, json};

use super::patch::list_map_key;
use fields::{
    Entry, FieldSet, Path, at, entries, field_set, is_leaf, is_list_map, is_prefix, key_step,
    remove, render, store_entries,
};
pub use fields::{GRANULAR_MAPS, UNTRACKED_METADATA};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApplyError {
    /// 409 Conflict: `(field path, manager)` pairs.
    #[error("apply failed with {} conflict(s)", .0.len())]
    Conflict(Vec<(String, String)>),
    /// 422/400: the applied configuration is not an object, or lacks apiVersion/kind/name.
    #[error("{0}")]
    Invalid(String),
}

// ---------------------------------------------------------------------------------------------
// apply

/// The object after `manager` applies `applied` to `live` (absent: created). `now` is the
/// RFC 3339 time written in managedFields. Metadata the server owns (uid, resourceVersion,
/// generation, creationTimestamp) is the caller's to set afterwards.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now: &str,
) -> Result<Value, ApplyError> {
    let cfg = applied
        .as_object()
        .ok_or_else(|| ApplyError::Invalid("the applied configuration must be an object".into()))?;
    let api_version = required(applied, "/apiVersion")?;
    required(applied, "/kind")?;
    required(applied, "/metadata/name")?;
    if manager.is_empty() {
        return Err(ApplyError::Invalid(
            "fieldManager is required for apply requests".into(),
        ));
    }
    let mut obj = match live {
        Some(l) => l.clone(),
        None => json!({"metadata": {}}),
    };
    let mut all = entries(live);
    let new_set = field_set(applied);
    let mine = |e: &Entry| e.manager == manager && e.operation == "Apply";
    let theirs = |e: &Entry| e.manager != manager;

    // Conflicts: leaves set to another value than a different manager's.
    let mut conflicts: Vec<(Path, usize, Path)> = Vec::new();
    for p in new_set.iter().filter(|p| is_leaf(applied, p)) {
        for (i, e) in all.iter().enumerate().filter(|(_, e)| theirs(e)) {
            for q in &e.fields {
                let shorter = match (is_prefix(q, p), is_prefix(p, q)) {
                    (true, _) => q,
                    (_, true) => p,
                    _ => continue,
                };
                let (Some(have), want) = (at(&obj, shorter), at(applied, shorter)) else {
                    continue;
                };
                let atomic = !matches!(have, Value::Object(_)) || shorter == p;
                if atomic && Some(have) != want {
                    conflicts.push((p.clone(), i, q.clone()));
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let mut named: Vec<(String, String)> = conflicts
            .iter()
            .map(|(p, i, _)| (render(p), all[*i].manager.clone()))
            .collect();
        named.dedup();
        return Err(ApplyError::Conflict(named));
    }
    for (_, i, q) in &conflicts {
        all[*i].fields.remove(q);
    }

    // Fields this manager applied before and no longer does, owned by nobody else.
    let before: FieldSet = all
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    for p in before.difference(&new_set) {
        let kept = all
            .iter()
            .filter(|e| !mine(e))
            .any(|e| e.fields.iter().any(|q| is_prefix(p, q)));
        if !kept {
            remove(&mut obj, p);
        }
    }

    merge_applied(&mut obj, &without_server_metadata(cfg));
    match all.iter_mut().find(|e| mine(e)) {
        Some(e) => {
            e.fields = new_set;
            e.time = now.to_string();
            e.api_version = api_version;
        }
        None => all.push(Entry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version,
            time: now.to_string(),
            fields: new_set,
        }),
    }
    store_entries(&mut obj, all);
    Ok(obj)
}

fn required(v: &Value, ptr: &str) -> Result<String, ApplyError> {
    match v.pointer(ptr).and_then(Value::as_str) {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err(ApplyError::Invalid(format!(
            "the applied configuration lacks {}",
            ptr.trim_start_matches('/').replace('/', ".")
        ))),
    }
}

/// Merges an applied configuration into the object: maps by key, list-maps by item key, the
/// rest replaced; `null`s skipped.
fn merge_applied(target: &mut Value, cfg: &Map<String, Value>) {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in cfg {
        match v {
            Value::Null => {}
            Value::Object(sub) if !sub.is_empty() => {
                merge_applied(t.entry(k.clone()).or_insert(Value::Null), sub);
            }
            Value::Array(items) if is_list_map(k, items) => {
                let keys = items
                    .first()
                    .and_then(|i| list_map_key(k, i))
                    .unwrap_or(&[]);
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                if !slot.is_array() {
                    *slot = Value::Array(Vec::new());
                }
                let Value::Array(live) = slot else { continue };
                for item in items {
                    let id = key_step(keys, item);
                    let pos = live.iter().position(|x| key_step(keys, x) == id);
                    match (pos, item.as_object()) {
                        (Some(i), Some(m)) => merge_applied(&mut live[i], m),
                        _ => live.push(item.clone()),
                    }
                }
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The configuration without the metadata the server owns (name and namespace stay: they
/// name the object, and a create takes them).
fn without_server_metadata(cfg: &Map<String, Value>) -> Map<String, Value> {
    let mut out = cfg.clone();
    if let Some(Value::Object(meta)) = out.get_mut("metadata") {
        meta.retain(|k, _| {
            !UNTRACKED_METADATA.contains(&k.as_str()) || k == "name" || k == "namespace"
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Update

/// Records a non-apply write (create, update, patch) by `manager` in `new`'s managedFields
/// (operation `Update`), given the object before it (`old`, absent on create).
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &str, now: &str) {
    let mut all = entries(old);
    let null = Value::Null;
    let old_obj = old.unwrap_or(&null);
    let new_set = field_set(new);
    let old_set = field_set(old_obj);
    let changed: FieldSet = new_set
        .iter()
        .filter(|p| !old_set.contains(*p) || (is_leaf(new, p) && at(old_obj, p) != at(new, p)))
        .cloned()
        .collect();
    let gone: FieldSet = old_set.difference(&new_set).cloned().collect();
    let mine = |e: &Entry| e.manager == manager && e.operation == "Update";
    for e in all.iter_mut() {
        e.fields
            .retain(|p| at(new, p).is_some() && !gone.contains(p));
        if !mine(e) {
            e.fields
                .retain(|p| !changed.contains(p) || !is_leaf(new, p));
        }
    }
    if !changed.is_empty() {
        let api_version = new
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match all.iter_mut().find(|e| mine(e)) {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now.to_string();
                e.api_version = api_version;
            }
            None => all.push(Entry {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version,
                time: now.to_string(),
                fields: changed,
            }),
        }
    }
    store_entries(new, all);
}
