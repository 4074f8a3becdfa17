//! The verbs on a resource path: get, list (selectors, pagination), watch (hands off to
//! `watch`), create, replace, patch (by content type, including server-side apply), delete,
//! and the two authentication endpoints (TokenReview, TokenRequest). Translates HTTP to
//! store calls; the store owns the rules.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Response};
use serde_json::{Value, json};

use super::errors::ApiErr;
use super::kinds::Kind;
use super::routing::Target;
use super::selector::Selector;
use super::server::{Body, Req, Shared, json as reply, streaming};
use super::store::{Part, Propagation};
use super::{apply, meta, patch, watch};

mod auth;
mod list;

pub(crate) fn handle(
    shared: &Arc<Shared>,
    req: &Req,
    kind: &Kind,
    version: &str,
    target: Target,
) -> Result<Response<Body>, ApiErr> {
    if req.q("dryRun").is_some_and(|d| !d.is_empty()) {
        // Honest refusal: a dry run here would write.
        return Err(ApiErr::bad_request(
            "dryRun is not supported by the API server double",
        ));
    }
    if !kind.stored {
        return match (&req.method, &target) {
            (&Method::POST, Target::Collection { ns: None }) => {
                auth::token_review(shared, req, kind, version)
            }
            _ => Err(ApiErr::method_not_allowed(format!(
                "{} only supports create",
                kind.resource_name()
            ))),
        };
    }
    match (req.method.clone(), target) {
        (Method::GET, Target::Collection { ns }) if req.flag("watch") => {
            start_watch(shared, req, kind, version, ns)
        }
        (Method::GET, Target::Collection { ns }) => list::list(shared, req, kind, version, ns),
        (Method::POST, Target::Collection { ns }) => {
            if kind.namespaced && ns.is_none() {
                return Err(ApiErr::method_not_allowed(
                    "create needs a namespace in the path for a namespaced resource",
                ));
            }
            let obj = parse_body(req)?;
            let created = shared.lock_state().create(
                kind,
                version,
                ns.as_deref(),
                obj,
                Some(&req.manager()),
            )?;
            Ok(reply(201, &created))
        }
        (Method::GET, Target::Object { ns, name, sub }) => {
            check_sub(kind, sub.as_deref())?;
            let st = shared.lock_state();
            let obj = st
                .get(kind, ns.as_deref().unwrap_or_default(), &name)
                .ok_or_else(|| ApiErr::not_found(&kind.resource_name(), &name))?;
            Ok(reply(200, &in_version(obj.clone(), kind, version)))
        }
        (Method::PUT, Target::Object { ns, name, sub }) => {
            let part = check_sub(kind, sub.as_deref())?;
            let obj = parse_body(req)?;
            let ns = ns.unwrap_or_default();
            let updated = shared.lock_state().update(
                kind,
                version,
                &ns,
                &name,
                obj,
                part,
                Some(&req.manager()),
            )?;
            Ok(reply(200, &updated))
        }
        (Method::PATCH, Target::Object { ns, name, sub }) => {
            let part = check_sub(kind, sub.as_deref())?;
            patch_object(
                shared,
                req,
                kind,
                version,
                ns.unwrap_or_default(),
                &name,
                part,
            )
        }
        (
            Method::DELETE,
            Target::Object {
                ns,
                name,
                sub: None,
            },
        ) => delete(shared, req, kind, ns.unwrap_or_default(), &name),
        (
            Method::POST,
            Target::Object {
                ns: Some(ns),
                name,
                sub: Some(sub),
            },
        ) if sub == "token" && kind.group.is_empty() && kind.plural == "serviceaccounts" => {
            auth::token_request(shared, req, &ns, &name)
        }
        (m, _) => Err(ApiErr::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({m})"
        ))),
    }
}

/// The part of the object a subresource path writes.
fn check_sub(kind: &Kind, sub: Option<&str>) -> Result<Part, ApiErr> {
    match sub {
        None => Ok(Part::Main),
        Some("status") if kind.status => Ok(Part::Status),
        Some(_) => Err(super::routing::not_found_path()),
    }
}

pub(super) fn in_version(mut obj: Value, kind: &Kind, version: &str) -> Value {
    obj["apiVersion"] = json!(kind.api_version(version));
    obj
}

/// A JSON body, or YAML when the client says so (`application/yaml`).
pub(super) fn parse_body(req: &Req) -> Result<Value, ApiErr> {
    let text = std::str::from_utf8(&req.body)
        .map_err(|_| ApiErr::bad_request("the request body is not UTF-8"))?;
    let yaml = req.content_type.contains("yaml");
    let v: Value = if yaml {
        serde_saphyr::from_str(text)
            .map_err(|e| ApiErr::bad_request(format!("invalid YAML body: {e}")))?
    } else {
        serde_json::from_str(text)
            .map_err(|e| ApiErr::bad_request(format!("invalid JSON body: {e}")))?
    };
    if !v.is_object() {
        return Err(ApiErr::bad_request("the request body must be an object"));
    }
    object_parts(&v, &["metadata"])?;
    Ok(v)
}

fn start_watch(
    shared: &Arc<Shared>,
    req: &Req,
    kind: &Kind,
    version: &str,
    ns: Option<String>,
) -> Result<Response<Body>, ApiErr> {
    let selector = Selector::parse(req.q("labelSelector"), req.q("fieldSelector"), &kind.kind)?;
    let rv = match req.q("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(r) => Some(r.parse::<u64>().map_err(|_| {
            ApiErr::bad_request(format!(
                "invalid resourceVersion {r:?}: not a number this server issued"
            ))
        })?),
    };
    let send_initial = req.flag("sendInitialEvents");
    if send_initial && req.q("resourceVersionMatch") != Some("NotOlderThan") {
        return Err(ApiErr::invalid(
            "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }
    let timeout = match req.q("timeoutSeconds") {
        None | Some("") => None,
        Some(t) => Some(Duration::from_secs(t.parse().map_err(|_| {
            ApiErr::bad_request(format!("invalid timeoutSeconds {t:?}"))
        })?)),
    };
    let w = watch::WatchReq {
        kind: kind.clone(),
        version: version.to_string(),
        namespace: ns,
        selector,
        rv,
        send_initial,
        bookmarks: req.flag("allowWatchBookmarks"),
        timeout,
    };
    Ok(streaming(watch::start(shared.clone(), w)?))
}

fn patch_object(
    shared: &Arc<Shared>,
    req: &Req,
    kind: &Kind,
    version: &str,
    ns: String,
    name: &str,
    part: Part,
) -> Result<Response<Body>, ApiErr> {
    let ctype = req
        .content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    let mut st = shared.lock_state();
    let live = st.get(kind, &ns, name).cloned();
    if ctype == "application/apply-patch+yaml" {
        let manager = req
            .q("fieldManager")
            .filter(|m| !m.is_empty())
            .ok_or_else(|| {
                ApiErr::bad_request(
                    "PATCH, application/apply-patch+yaml requests must have fieldManager",
                )
            })?;
        let mut applied = parse_apply_body(req)?;
        match applied["metadata"]["name"].as_str() {
            Some(n) if n != name => {
                return Err(ApiErr::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => applied["metadata"]["name"] = json!(name),
        }
        if kind.namespaced && applied["metadata"]["namespace"].is_null() {
            applied["metadata"]["namespace"] = json!(ns);
        }
        let now = meta::now_rfc3339();
        let result = apply::apply(live.as_ref(), &applied, manager, req.flag("force"), &now)
            .map_err(|e| match e {
                apply::ApplyError::Conflict(c) => {
                    let list: Vec<String> = c
                        .iter()
                        .map(|(f, m)| format!("conflict with \"{m}\": {f}"))
                        .collect();
                    ApiErr::conflict(
                        &kind.resource_name(),
                        name,
                        &format!(
                            "Apply failed with {} conflict(s): {}",
                            c.len(),
                            list.join("; ")
                        ),
                    )
                }
                apply::ApplyError::Invalid(m) => ApiErr::invalid(m),
            })?;
        let out = match live {
            None if part == Part::Status => {
                return Err(ApiErr::not_found(&kind.resource_name(), name));
            }
            None => {
                let nsopt = kind.namespaced.then_some(ns.as_str());
                let created = st.create(kind, version, nsopt, result, None)?;
                return Ok(reply(201, &created));
            }
            Some(_) => st.update(kind, version, &ns, name, result, part, None)?,
        };
        return Ok(reply(200, &out));
    }
    let Some(mut target) = live else {
        return Err(ApiErr::not_found(&kind.resource_name(), name));
    };
    let body: Value = serde_json::from_slice(&req.body)
        .map_err(|e| ApiErr::bad_request(format!("invalid JSON patch body: {e}")))?;
    let result = match ctype {
        "application/merge-patch+json" => {
            patch::merge(&mut target, &body);
            Ok(())
        }
        "application/json-patch+json" => patch::json_patch(&mut target, &body),
        "application/strategic-merge-patch+json" => patch::strategic_merge(&mut target, &body),
        other => {
            return Err(ApiErr::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"
                ),
            ));
        }
    };
    result.map_err(|e| ApiErr::invalid(e.to_string()))?;
    let out = st.update(kind, version, &ns, name, target, part, Some(&req.manager()))?;
    Ok(reply(200, &out))
}

/// An apply body: YAML (which JSON is a subset of).
fn parse_apply_body(req: &Req) -> Result<Value, ApiErr> {
    let text = std::str::from_utf8(&req.body)
        .map_err(|_| ApiErr::bad_request("the request body is not UTF-8"))?;
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => serde_saphyr::from_str(text)
            .map_err(|e| ApiErr::bad_request(format!("invalid apply body: {e}")))?,
    };
    if !v.is_object() {
        return Err(ApiErr::bad_request("the apply body must be an object"));
    }
    object_parts(&v, &["metadata"])?;
    Ok(v)
}

fn delete(
    shared: &Arc<Shared>,
    req: &Req,
    kind: &Kind,
    ns: String,
    name: &str,
) -> Result<Response<Body>, ApiErr> {
    let opts: Value = if req.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&req.body)
            .map_err(|e| ApiErr::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let policy = req
        .q("propagationPolicy")
        .or(opts["propagationPolicy"].as_str())
        .unwrap_or("Background");
    let propagation = match policy {
        "Orphan" => Propagation::Orphan,
        // Foreground is served as Background: the owner goes first, dependents right after.
        "Background" | "Foreground" => Propagation::Background,
        other => {
            return Err(ApiErr::invalid(format!(
                "propagationPolicy: Unsupported value: \"{other}\""
            )));
        }
    };
    let obj = shared
        .lock_state()
        .delete(kind, &ns, name, propagation, &opts["preconditions"])?;
    Ok(reply(200, &obj))
}

/// Refuses a body whose named parts are present but not objects (the server writes into
/// them; the real one refuses such a body when decoding it).
pub(super) fn object_parts(v: &Value, parts: &[&str]) -> Result<(), ApiErr> {
    for part in parts {
        let p = &v[*part];
        if !p.is_null() && !p.is_object() {
            return Err(ApiErr::bad_request(format!(
                "{part} must be an object, not {p}"
            )));
        }
    }
    Ok(())
}
