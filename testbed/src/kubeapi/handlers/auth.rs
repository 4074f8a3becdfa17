//! The authentication endpoints: TokenReview (answered from the token table, not stored) and
//! TokenRequest (mints a token for a service account, optionally bound to a pod and its
//! node). The token table itself is `tokens`.

use std::sync::Arc;

use http::Response;
use serde_json::json;

use super::super::errors::ApiErr;
use super::super::kinds::Kind;
use super::super::server::{Body, Req, Shared, json as reply};
use super::super::{TokenSpec, meta};
use super::{object_parts, parse_body};

pub(super) fn token_review(
    shared: &Arc<Shared>,
    req: &Req,
    kind: &Kind,
    version: &str,
) -> Result<Response<Body>, ApiErr> {
    let mut body = parse_body(req)?;
    object_parts(&body, &["spec", "status"])?;
    let token = body["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let audiences: Vec<String> = body["spec"]["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let status = shared
        .lock_state()
        .tokens
        .review(&token, &audiences, meta::now_unix());
    body["apiVersion"] = json!(kind.api_version(version));
    body["kind"] = json!("TokenReview");
    body["status"] = status;
    Ok(reply(201, &body))
}

pub(super) fn token_request(
    shared: &Arc<Shared>,
    req: &Req,
    ns: &str,
    sa: &str,
) -> Result<Response<Body>, ApiErr> {
    let mut body = parse_body(req)?;
    object_parts(&body, &["spec", "status"])?;
    let expiration = body["spec"]["expirationSeconds"].as_u64().unwrap_or(3600);
    if expiration < 600 {
        return Err(ApiErr::invalid(
            "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
        ));
    }
    if expiration > 1 << 32 {
        return Err(ApiErr::invalid(
            "spec.expirationSeconds: Invalid value: may not specify a duration larger than 2^32 seconds",
        ));
    }
    let audiences: Vec<String> = body["spec"]["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let mut st = shared.lock_state();
    let sa_kind = st
        .kinds
        .by_url("", "v1", "serviceaccounts")
        .cloned()
        .ok_or_else(super::super::routing::not_found_path)?;
    if st.get(&sa_kind, ns, sa).is_none() {
        return Err(ApiErr::not_found("serviceaccounts", sa));
    }
    let bound = &body["spec"]["boundObjectRef"];
    let (pod, node) = match bound["kind"].as_str() {
        None => (None, None),
        Some("Pod") => {
            let pod_name = bound["name"].as_str().unwrap_or_default();
            let pod_kind = st
                .kinds
                .by_url("", "v1", "pods")
                .cloned()
                .ok_or_else(super::super::routing::not_found_path)?;
            let p = st
                .get(&pod_kind, ns, pod_name)
                .ok_or_else(|| ApiErr::not_found("pods", pod_name))?;
            let uid = p["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if let Some(want) = bound["uid"].as_str()
                && !want.is_empty()
                && want != uid
            {
                return Err(ApiErr::conflict(
                    "pods",
                    pod_name,
                    &format!(
                        "the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated"
                    ),
                ));
            }
            let node = p["spec"]["nodeName"].as_str().map(str::to_string);
            (Some((pod_name.to_string(), uid)), node)
        }
        Some(other) => {
            return Err(ApiErr::bad_request(format!(
                "cannot bind token to object of kind {other:?} (only Pod is supported by this server)"
            )));
        }
    };
    let now = meta::now_unix();
    let token = st.tokens.issue(TokenSpec {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
        audiences: audiences.clone(),
        pod: pod.clone(),
        node,
        expires_at: now + expiration,
    });
    drop(st);
    body["apiVersion"] = json!("authentication.k8s.io/v1");
    body["kind"] = json!("TokenRequest");
    body["metadata"] =
        json!({"name": sa, "namespace": ns, "creationTimestamp": meta::rfc3339(now)});
    body["spec"]["expirationSeconds"] = json!(expiration);
    if let Some((_, uid)) = &pod {
        body["spec"]["boundObjectRef"]["uid"] = json!(uid);
    }
    body["status"] =
        json!({"token": token, "expirationTimestamp": meta::rfc3339(now + expiration)});
    Ok(reply(201, &body))
}
