//! LIST: selectors, `limit` with opaque `continue` tokens (the first page's RV carried
//! through, 410 once it is older than the event history), and the `XList` envelope.

use std::sync::Arc;

use http::Response;
use serde_json::{Value, json};

use super::super::errors::ApiErr;
use super::super::kinds::Kind;
use super::super::selector::Selector;
use super::super::server::{Body, Req, Shared, json as reply};
use super::in_version;

/// Opaque continue token: the list's RV and the last key served, hex-encoded.
fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let raw = json!([rv, ns, name]).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    if !token.len().is_multiple_of(2) || token.len() > 2048 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let v: Value = serde_json::from_slice(&bytes?).ok()?;
    Some((v[0].as_u64()?, v[1].as_str()?.into(), v[2].as_str()?.into()))
}

pub(super) fn list(
    shared: &Arc<Shared>,
    req: &Req,
    kind: &Kind,
    version: &str,
    ns: Option<String>,
) -> Result<Response<Body>, ApiErr> {
    let sel = Selector::parse(req.q("labelSelector"), req.q("fieldSelector"), &kind.kind)?;
    let limit: usize = match req.q("limit") {
        None | Some("") => 0,
        Some(l) => l
            .parse()
            .map_err(|_| ApiErr::bad_request(format!("invalid limit {l:?}")))?,
    };
    let st = shared.lock_state();
    let (list_rv, after) = match req.q("continue").filter(|c| !c.is_empty()) {
        None => (st.rv, None),
        Some(c) => {
            let (rv, cns, cname) = decode_continue(c)
                .ok_or_else(|| ApiErr::bad_request("continue key is not valid"))?;
            if rv < st.horizon {
                return Err(ApiErr::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some((cns, cname)))
        }
    };
    let key = |o: &Value| {
        (
            o["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let matching: Vec<&Value> = st
        .list(kind, ns.as_deref())
        .into_iter()
        .filter(|o| after.as_ref().is_none_or(|a| key(o) > *a))
        .filter(|o| sel.matches(o))
        .collect();
    let take = if limit == 0 {
        matching.len()
    } else {
        limit.min(matching.len())
    };
    let items: Vec<Value> = matching[..take]
        .iter()
        .map(|o| in_version((*o).clone(), kind, version))
        .collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if take < matching.len()
        && let Some(last) = matching.get(take.wrapping_sub(1))
    {
        let (lns, lname) = key(last);
        metadata["continue"] = json!(encode_continue(list_rv, &lns, &lname));
        metadata["remainingItemCount"] = json!(matching.len() - take);
    }
    Ok(reply(
        200,
        &json!({
            "kind": format!("{}List", kind.kind),
            "apiVersion": kind.api_version(version),
            "metadata": metadata,
            "items": items,
        }),
    ))
}
