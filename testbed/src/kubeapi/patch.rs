//! PATCH bodies the double accepts, applied to a stored object: JSON merge patch (RFC 7386),
//! JSON patch (RFC 6902) and strategic merge patch (an approximation: merge patch, plus lists
//! of objects merged by their key, e.g. containers by `name`, ports by `port`, conditions by
//! `type`, and `$patch: delete|replace` directives).
//!
//! (Stub: the signatures are the contract; see /work/helpers/s5/design.md.)

use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PatchError {
    /// 422 Invalid / 400 BadRequest material: what in the patch is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A JSON patch `test` operation failed (409 Conflict? no: 422, as the API server).
    #[error("test operation failed: {0}")]
    TestFailed(String),
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let _ = (target, patch);
    unimplemented!()
}

/// RFC 6902 operations (`add`, `remove`, `replace`, `move`, `copy`, `test`), all or nothing.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let _ = (target, ops);
    unimplemented!()
}

/// Strategic merge patch, approximated as documented at the top of this module.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let _ = (target, patch);
    unimplemented!()
}
