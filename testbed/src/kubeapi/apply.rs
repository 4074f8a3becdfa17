//! Server-side apply, a documented subset: each field manager's applied configuration is
//! remembered in `metadata.managedFields` (operation `Apply`, `fieldsV1` as the API writes it);
//! an apply sets what the manager's configuration holds, removes what it held before and no
//! longer does (unless another manager also set it), merges list-maps by key (containers and
//! env by `name`, ports by `port`+`protocol`, conditions by `type`, ownerReferences by `uid`),
//! and without `force` refuses (409 Conflict naming the fields and their manager) to change a
//! field another manager set to a different value. Non-apply writes record an `Update` entry.
//!
//! (Stub: the signatures are the contract; see /work/helpers/s5/design.md.)

use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApplyError {
    /// 409 Conflict: `(field path, manager)` pairs.
    #[error("apply failed with {} conflict(s)", .0.len())]
    Conflict(Vec<(String, String)>),
    /// 422/400: the applied configuration is not an object, or lacks apiVersion/kind/name.
    #[error("{0}")]
    Invalid(String),
}

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
    let _ = (live, applied, manager, force, now);
    unimplemented!()
}

/// Records a non-apply write (create, update, patch) by `manager` in `new`'s managedFields
/// (operation `Update`), given the object before it (`old`, absent on create).
pub fn record_update(old: Option<&Value>, new: &mut Value, manager: &str, now: &str) {
    let _ = (old, new, manager, now);
}
