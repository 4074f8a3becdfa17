//! Field sets for server-side apply: paths into an object, the `fieldsV1` notation the API
//! writes in `metadata.managedFields`, and reading/writing those entries. Pure; the rules of
//! which paths an object has are documented at the top of `apply.rs`.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::kubeapi::patch::{key_values, list_map_key};

/// Metadata fields the server owns or that name the object: never in a field set.
pub const UNTRACKED_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// Maps whose own path is a member of the set (written `.`), besides their keys.
pub const GRANULAR_MAPS: &[&str] = &[
    "labels",
    "annotations",
    "matchLabels",
    "nodeSelector",
    "selector",
    "data",
    "stringData",
    "binaryData",
];

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Step {
    Field(String),
    /// A list-map item: its key fields and their values (JSON text), sorted by field.
    Key(Vec<(String, String)>),
}

pub(super) type Path = Vec<Step>;
pub(super) type FieldSet = BTreeSet<Path>;

pub(super) fn key_step(keys: &[&str], item: &Value) -> Step {
    let mut kv: Vec<(String, String)> = key_values(keys, item)
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    kv.sort();
    Step::Key(kv)
}

pub(super) fn render(path: &Path) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Step::Key(kv) => {
                let inner: Vec<String> = kv.iter().map(|(k, v)| format!("{k}={v}")).collect();
                s.push_str(&format!("[{}]", inner.join(",")));
            }
        }
    }
    s
}

/// The value at `path` in `obj`.
pub(super) fn at<'a>(obj: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut cur = obj;
    for step in path {
        cur = match step {
            Step::Field(f) => cur.get(f)?,
            Step::Key(kv) => {
                let names: Vec<&str> = kv.iter().map(|(k, _)| k.as_str()).collect();
                cur.as_array()?
                    .iter()
                    .find(|item| key_step(&names, item) == *step)?
            }
        };
    }
    Some(cur)
}

/// The set of `obj` (an object's top level), per the rules at the top of this module.
pub(super) fn field_set(obj: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(m) = obj.as_object() else {
        return out;
    };
    for (k, v) in m {
        match (k.as_str(), v) {
            ("apiVersion" | "kind", _) => {}
            ("metadata", Value::Object(meta)) => {
                for (mk, mv) in meta {
                    if !UNTRACKED_METADATA.contains(&mk.as_str()) {
                        collect(mk, mv, &mut vec![Step::Field("metadata".into())], &mut out);
                    }
                }
            }
            _ => collect(k, v, &mut Vec::new(), &mut out),
        }
    }
    out
}

pub(super) fn collect(field: &str, v: &Value, prefix: &mut Path, out: &mut FieldSet) {
    if v.is_null() {
        return;
    }
    prefix.push(Step::Field(field.to_string()));
    match v {
        Value::Object(m) if !m.is_empty() => {
            if GRANULAR_MAPS.contains(&field) {
                out.insert(prefix.clone());
            }
            for (k, sub) in m {
                collect(k, sub, prefix, out);
            }
        }
        Value::Array(items) if is_list_map(field, items) => {
            let keys = items
                .first()
                .and_then(|i| list_map_key(field, i))
                .unwrap_or(&[]);
            for item in items {
                prefix.push(key_step(keys, item));
                out.insert(prefix.clone());
                if let Some(m) = item.as_object() {
                    for (k, sub) in m {
                        collect(k, sub, prefix, out);
                    }
                }
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
    prefix.pop();
}

/// A list merged by key. An empty list of a field that is one merges as one (it owns no item).
pub(super) fn is_list_map(field: &str, items: &[Value]) -> bool {
    if items.is_empty() {
        return list_map_key(field, &json!({"port": 0})).is_some();
    }
    match items.first().and_then(|i| list_map_key(field, i)) {
        Some(keys) => items
            .iter()
            .all(|i| i.is_object() && i.get(keys[0]).is_some()),
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------
// fieldsV1

#[derive(Default)]
pub(super) struct Node {
    member: bool,
    children: std::collections::BTreeMap<Step, Node>,
}

pub(super) fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Node::default();
    for path in set {
        let mut n = &mut root;
        for step in path {
            n = n.children.entry(step.clone()).or_default();
        }
        n.member = true;
    }
    node_json(&root)
}

pub(super) fn node_json(n: &Node) -> Value {
    let mut m = Map::new();
    if n.member && !n.children.is_empty() {
        m.insert(".".into(), json!({}));
    }
    for (step, child) in &n.children {
        let name = match step {
            Step::Field(f) => format!("f:{f}"),
            Step::Key(kv) => {
                let inner: Vec<String> = kv
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
                    .collect();
                format!("k:{{{}}}", inner.join(","))
            }
        };
        m.insert(name, node_json(child));
    }
    Value::Object(m)
}

/// Reads `fieldsV1` back; anything it does not understand (`v:`/`i:` elements, malformed
/// keys) is skipped rather than trusted.
pub(super) fn from_fields_v1(v: &Value, prefix: &mut Path, out: &mut FieldSet) {
    let Some(m) = v.as_object() else { return };
    if m.is_empty() && !prefix.is_empty() {
        out.insert(prefix.clone());
    }
    for (name, sub) in m {
        let step = if name == "." {
            out.insert(prefix.clone());
            continue;
        } else if let Some(f) = name.strip_prefix("f:") {
            Step::Field(f.to_string())
        } else if let Some(k) = name.strip_prefix("k:") {
            match serde_json::from_str::<Map<String, Value>>(k) {
                Ok(kv) => {
                    let mut kv: Vec<(String, String)> =
                        kv.into_iter().map(|(k, v)| (k, v.to_string())).collect();
                    kv.sort();
                    Step::Key(kv)
                }
                Err(_) => continue,
            }
        } else {
            continue;
        };
        prefix.push(step);
        from_fields_v1(sub, prefix, out);
        prefix.pop();
    }
}

pub(super) struct Entry {
    pub(super) manager: String,
    pub(super) operation: String,
    pub(super) api_version: String,
    pub(super) time: String,
    pub(super) fields: FieldSet,
}

pub(super) fn entries(obj: Option<&Value>) -> Vec<Entry> {
    let list = obj
        .and_then(|o| o.pointer("/metadata/managedFields"))
        .and_then(Value::as_array);
    let s = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    list.into_iter()
        .flatten()
        .map(|e| {
            let mut fields = FieldSet::new();
            if let Some(f) = e.get("fieldsV1") {
                from_fields_v1(f, &mut Vec::new(), &mut fields);
            }
            Entry {
                manager: s(e, "manager"),
                operation: s(e, "operation"),
                api_version: s(e, "apiVersion"),
                time: s(e, "time"),
                fields,
            }
        })
        .collect()
}

pub(super) fn store_entries(obj: &mut Value, entries: Vec<Entry>) {
    let list: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            })
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

pub(super) fn is_prefix(a: &[Step], b: &[Step]) -> bool {
    a.len() <= b.len() && a == &b[..a.len()]
}

/// A path whose applied value is not a non-empty map or list-map item (i.e. a value to compare).
pub(super) fn is_leaf(applied: &Value, path: &Path) -> bool {
    !matches!(at(applied, path), Some(Value::Object(m)) if !m.is_empty())
}

/// Removes the field or list-map item at `path`, if there.
pub(super) fn remove(obj: &mut Value, path: &Path) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for step in parent {
        let next = match step {
            Step::Field(f) => cur.get_mut(f),
            Step::Key(kv) => {
                let names: Vec<&str> = kv.iter().map(|(k, _)| k.as_str()).collect();
                cur.as_array_mut()
                    .and_then(|a| a.iter_mut().find(|i| key_step(&names, i) == *step))
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match (last, cur) {
        (Step::Field(f), Value::Object(m)) => {
            m.remove(f);
        }
        (Step::Key(kv), Value::Array(a)) => {
            let names: Vec<&str> = kv.iter().map(|(k, _)| k.as_str()).collect();
            a.retain(|i| key_step(&names, i) != *last);
        }
        _ => {}
    }
}
