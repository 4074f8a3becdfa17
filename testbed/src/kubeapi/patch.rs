//! PATCH bodies the double accepts, applied to a stored object: JSON merge patch (RFC 7386),
//! JSON patch (RFC 6902) and strategic merge patch.
//!
//! Owns only the arithmetic on `serde_json::Value`s; which object, which endpoint and what the
//! server does with metadata afterwards is the caller's.
//!
//! Strategic merge is an approximation (the real one reads Go struct tags, the double has no
//! schemas): a merge patch, except that
//! - lists of objects named in [`list_map_key`] merge item by item on their key (containers,
//!   initContainers, ephemeralContainers, env, volumes, volumeMounts, imagePullSecrets by
//!   `name`; ports by `containerPort` or `port`, with `protocol` (default TCP); conditions by
//!   `type`; ownerReferences by `uid`); an item absent from the live list is appended;
//! - `finalizers` (a list of strings) is a set union, as ObjectMeta declares it;
//! - directives: `$patch: delete` on a list item removes that item, on a map removes the map;
//!   `$patch: replace` on a list item replaces the whole list, on a map replaces the map;
//!   `$retainKeys` keeps only the keys it lists; `$deleteFromPrimitiveList/<f>` removes values
//!   from list `<f>`; `$setElementOrder/<f>` (order hints kubectl sends) is ignored;
//! - every other list replaces.

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PatchError {
    /// 422 Invalid / 400 BadRequest material: what in the patch is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A JSON patch `test` operation failed (422, as the API server answers).
    #[error("test operation failed: {0}")]
    TestFailed(String),
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RFC 6902

/// RFC 6902 operations (`add`, `remove`, `replace`, `move`, `copy`, `test`), all or nothing.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| invalid("a JSON patch must be an array of operations"))?;
    let mut doc = target.clone();
    for (i, op) in ops.iter().enumerate() {
        apply_op(&mut doc, op).map_err(|e| match e {
            PatchError::Invalid(m) => PatchError::Invalid(format!("operation {i}: {m}")),
            PatchError::TestFailed(m) => PatchError::TestFailed(format!("operation {i}: {m}")),
        })?;
    }
    *target = doc;
    Ok(())
}

fn invalid(m: impl Into<String>) -> PatchError {
    PatchError::Invalid(m.into())
}

fn str_field<'a>(op: &'a Value, name: &str) -> Result<&'a str, PatchError> {
    op.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("missing string field {name:?}")))
}

fn apply_op(doc: &mut Value, op: &Value) -> Result<(), PatchError> {
    let path = pointer(str_field(op, "path")?)?;
    let value = || {
        op.get("value")
            .cloned()
            .ok_or_else(|| invalid("missing field \"value\""))
    };
    match str_field(op, "op")? {
        "add" => add(doc, &path, value()?),
        "remove" => remove(doc, &path).map(drop),
        "replace" => {
            let v = value()?;
            *resolve(doc, &path)? = v;
            Ok(())
        }
        "move" => {
            let from = pointer(str_field(op, "from")?)?;
            if path.len() > from.len() && path[..from.len()] == from[..] {
                return Err(invalid("cannot move a value into itself"));
            }
            let v = remove(doc, &from)?;
            add(doc, &path, v)
        }
        "copy" => {
            let from = pointer(str_field(op, "from")?)?;
            let v = resolve(doc, &from)?.clone();
            add(doc, &path, v)
        }
        "test" => {
            let want = value()?;
            let have = resolve(doc, &path)?;
            if *have == want {
                Ok(())
            } else {
                Err(PatchError::TestFailed(format!(
                    "{} is {have}, not {want}",
                    render(&path)
                )))
            }
        }
        other => Err(invalid(format!("unknown op {other:?}"))),
    }
}

/// Splits a JSON pointer (RFC 6901) into unescaped tokens.
fn pointer(p: &str) -> Result<Vec<String>, PatchError> {
    if p.is_empty() {
        return Ok(Vec::new());
    }
    let rest = p
        .strip_prefix('/')
        .ok_or_else(|| invalid(format!("path {p:?} must start with '/'")))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn render(path: &[String]) -> String {
    path.iter()
        .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
        .collect()
}

/// An array index token: digits, no leading zero, below `limit` (inclusive when `append_ok`).
fn index(token: &str, len: usize, append_ok: bool) -> Result<usize, PatchError> {
    if append_ok && token == "-" {
        return Ok(len);
    }
    let ok_shape = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    let i: usize = match ok_shape.then(|| token.parse().ok()).flatten() {
        Some(i) => i,
        None => return Err(invalid(format!("{token:?} is not an array index"))),
    };
    if i > len || (i == len && !append_ok) {
        return Err(invalid(format!(
            "index {i} is out of bounds (length {len})"
        )));
    }
    Ok(i)
}

fn resolve<'a>(doc: &'a mut Value, path: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for t in path {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| invalid(format!("{} does not exist", render(path))))?,
            Value::Array(a) => {
                let i = index(t, a.len(), false)?;
                &mut a[i]
            }
            _ => return Err(invalid(format!("{} does not exist", render(path)))),
        };
    }
    Ok(cur)
}

fn add(doc: &mut Value, path: &[String], v: Value) -> Result<(), PatchError> {
    let Some((last, parent)) = path.split_last() else {
        *doc = v;
        return Ok(());
    };
    match resolve(doc, parent)? {
        Value::Object(m) => {
            m.insert(last.clone(), v);
            Ok(())
        }
        Value::Array(a) => {
            let i = index(last, a.len(), true)?;
            a.insert(i, v);
            Ok(())
        }
        _ => Err(invalid(format!("{} has no parent to add to", render(path)))),
    }
}

fn remove(doc: &mut Value, path: &[String]) -> Result<Value, PatchError> {
    let Some((last, parent)) = path.split_last() else {
        return Err(invalid("cannot remove the whole document"));
    };
    match resolve(doc, parent)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| invalid(format!("{} does not exist", render(path)))),
        Value::Array(a) => {
            let i = index(last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(invalid(format!("{} does not exist", render(path)))),
    }
}

// ---------------------------------------------------------------------------------------------
// Strategic merge

/// The key a list field's items merge on (strategic merge and server-side apply share it), or
/// `None` for a list that replaces. `item` is one of the list's items (ports need it).
pub fn list_map_key(field: &str, item: &Value) -> Option<&'static [&'static str]> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "volumeMounts"
        | "imagePullSecrets" => Some(&["name"]),
        "ports" if item.get("containerPort").is_some() => Some(&["containerPort", "protocol"]),
        "ports" if item.get("port").is_some() => Some(&["port", "protocol"]),
        "conditions" => Some(&["type"]),
        "ownerReferences" => Some(&["uid"]),
        _ => None,
    }
}

/// The values of `keys` in `item` (a port's missing `protocol` is TCP, as defaulting makes it).
pub fn key_values(keys: &[&str], item: &Value) -> Vec<(String, Value)> {
    keys.iter()
        .filter_map(|k| match item.get(*k) {
            Some(v) => Some((k.to_string(), v.clone())),
            None if *k == "protocol" => Some((k.to_string(), Value::from("TCP"))),
            None => None,
        })
        .collect()
}

/// Strategic merge patch, approximated as documented at the top of this module.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Object(p) = patch else {
        return Err(invalid("a strategic merge patch must be an object"));
    };
    let mut out = target.clone();
    merge_map(&mut out, p)?;
    *target = out;
    Ok(())
}

fn merge_map(target: &mut Value, p: &Map<String, Value>) -> Result<(), PatchError> {
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = Value::Object(strip_directives(p));
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some(other) => return Err(invalid(format!("unknown $patch directive {other:?}"))),
        None => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(live)), Some(gone)) = (t.get_mut(field), v.as_array()) {
                live.retain(|x| !gone.contains(x));
            }
            continue;
        }
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(sub) => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                merge_map(slot, sub)?;
                if slot.is_null() {
                    t.remove(k);
                }
            }
            Value::Array(items) => {
                let merged = merge_list(k, t.get(k), items)?;
                t.insert(k.clone(), merged);
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
        t.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    Ok(())
}

fn strip_directives(p: &Map<String, Value>) -> Map<String, Value> {
    p.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn merge_list(field: &str, live: Option<&Value>, items: &[Value]) -> Result<Value, PatchError> {
    let strip = |v: &Value| match v {
        Value::Object(m) => Value::Object(strip_directives(m)),
        other => other.clone(),
    };
    let directive = |v: &Value| v.get("$patch").and_then(Value::as_str).map(str::to_string);
    if items
        .iter()
        .any(|i| directive(i).as_deref() == Some("replace"))
    {
        return Ok(Value::Array(
            items
                .iter()
                .filter(|i| directive(i).is_none())
                .map(strip)
                .collect(),
        ));
    }
    let live_items: Vec<Value> = live.and_then(Value::as_array).cloned().unwrap_or_default();
    if field == "finalizers" && items.iter().all(Value::is_string) {
        let mut out = live_items;
        for i in items {
            if !out.contains(i) {
                out.push(i.clone());
            }
        }
        return Ok(Value::Array(out));
    }
    let keys = match items.first().and_then(|i| list_map_key(field, i)) {
        Some(keys) if items.iter().all(Value::is_object) => keys,
        _ => return Ok(Value::Array(items.iter().map(strip).collect())),
    };
    let mut out = live_items;
    for item in items {
        let id = key_values(keys, item);
        if id.is_empty() {
            return Err(invalid(format!(
                "an item of {field} lacks its merge key {}",
                keys[0]
            )));
        }
        let pos = out.iter().position(|x| key_values(keys, x) == id);
        match (directive(item).as_deref(), pos) {
            (Some("delete"), Some(i)) => {
                out.remove(i);
            }
            (Some("delete"), None) => {}
            (Some(other), _) => {
                return Err(invalid(format!("unknown $patch directive {other:?}")));
            }
            (None, Some(i)) => {
                if let Value::Object(m) = item {
                    merge_map(&mut out[i], m)?;
                }
            }
            (None, None) => out.push(strip(item)),
        }
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests;
