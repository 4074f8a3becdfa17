//! Status meshd writes to the API, as Istio writes it: a waypoint Gateway's `Accepted` and
//! `Programmed` (server-side apply on `/status`: its conditions are a list-map keyed by type),
//! the entries of Gateway API routes' `status.parents` that are meshd's (read-modify-write
//! with resourceVersion: the list is atomic, and other controllers' entries must stay), and
//! AuthorizationPolicies' `ZtunnelAccepted` / `WaypointAccepted` (read-modify-write: Istio's
//! conditions list is atomic too).
//!
//! Conditions come from `crate::status` (shared with local mode). Owns when they are written:
//! only when they differ from the object's, `observedGeneration` = the object's
//! `metadata.generation`, `lastTransitionTime` kept unless the condition's status flips. A 404
//! (deleted meanwhile) is no error; a 409 is read again and retried.

use kube::api::{Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject};
use serde_json::{Value, json};
use tracing::info;

use super::objects::CONTROLLER_NAME;
use super::{Ctx, Memory, WriteError, is_conflict, is_not_found, now_rfc3339, resource};
use crate::kube::FIELD_MANAGER;
use crate::status::{self, Condition, WAYPOINT_ACCEPTED, ZTUNNEL_ACCEPTED};
use crate::translate::MeshView;
use crate::waypoints::Waypoint;

/// Read-modify-write attempts before giving up until the next pass.
const CONFLICT_RETRIES: usize = 5;

/// Writes every status of `view` that changed. `Err(NotLeader)` stops at once.
pub(super) async fn write_all(
    ctx: &Ctx,
    memory: &mut Memory,
    view: &MeshView,
) -> Result<Vec<Result<bool, WriteError>>, WriteError> {
    let mut out = Vec::new();
    for w in view.waypoints.values() {
        out.push(gateway(ctx, memory, w, view).await);
        stop_if_not_leader(&out)?;
    }
    for (key, r) in &view.routes {
        if !matches!(r.kind.as_str(), "HTTPRoute" | "GRPCRoute") {
            continue;
        }
        out.push(route(ctx, memory, key, r, view).await);
        stop_if_not_leader(&out)?;
    }
    for (key, c) in status::policy_conditions(view, &ctx.root_namespace) {
        let Some(p) = view.policies.get(&key) else {
            continue;
        };
        let fingerprint = format!("{}|{:?}", p.spec_json, c);
        out.push(policy(ctx, memory, &key, &p.namespace, &p.name, &c, fingerprint).await);
        stop_if_not_leader(&out)?;
    }
    Ok(out)
}

fn stop_if_not_leader(out: &[Result<bool, WriteError>]) -> Result<(), WriteError> {
    match out.last() {
        Some(Err(WriteError::NotLeader)) => Err(WriteError::NotLeader),
        _ => Ok(()),
    }
}

/// `c` as written, keeping the `lastTransitionTime` of `live`'s condition of that type when its
/// status is unchanged.
fn rendered(c: &Condition, live: &[Value], generation: Option<i64>, now: &str) -> Value {
    let status = if c.status { "True" } else { "False" };
    let since = live
        .iter()
        .find(|l| l["type"] == c.kind && l["status"] == status)
        .and_then(|l| l["lastTransitionTime"].as_str())
        .unwrap_or(now);
    status::condition_json(c, since, generation)
}

fn conditions_of(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

async fn gateway(
    ctx: &Ctx,
    memory: &mut Memory,
    w: &Waypoint,
    view: &MeshView,
) -> Result<bool, WriteError> {
    let conds = status::gateway_conditions(w, view);
    let addresses = status::gateway_status(w, view, Vec::new())["status"]["addresses"].clone();
    let key = format!("Gateway/{}", w.key());
    let fingerprint = format!("{:?}|{conds:?}|{addresses}", w.generation);
    if memory.unchanged(&key, &fingerprint) {
        return Ok(false);
    }
    let ar = resource("gateway.networking.k8s.io/v1", "Gateway", "gateways");
    let api = ctx.api(&ar, Some(&w.namespace));
    let what = format!("status of Gateway {}", w.key());
    let Some(live) = api
        .get_opt(&w.name)
        .await
        .map_err(WriteError::api(format!("reading {what}")))?
    else {
        memory.forget(&key);
        return Ok(false);
    };
    let generation = live.metadata.generation;
    let live_status = live.data.get("status").cloned().unwrap_or(Value::Null);
    let live_conds = conditions_of(&live_status["conditions"]);
    let now = now_rfc3339();
    let want: Vec<Value> = conds
        .iter()
        .map(|c| rendered(c, &live_conds, generation, &now))
        .collect();
    let same = want.iter().all(|c| live_conds.contains(c)) && live_status["addresses"] == addresses;
    if !same {
        let doc = status::gateway_status(w, view, want);
        ctx.check()?;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&w.name, &params, &Patch::Apply(&doc))
            .await
        {
            Ok(_) => info!(gateway = %w.key(), "wrote Gateway status"),
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) => return Err(WriteError::api(format!("writing {what}"))(e)),
        }
    }
    memory.remember(key, fingerprint);
    Ok(!same)
}

/// A parentRef meshd answers for: a Service (GAMMA: the route is for the mesh), or a waypoint
/// Gateway.
fn is_ours(parent: &Value, route_ns: &str, view: &MeshView) -> bool {
    let group = parent["group"]
        .as_str()
        .unwrap_or("gateway.networking.k8s.io");
    let kind = parent["kind"].as_str().unwrap_or("Gateway");
    let ns = parent["namespace"].as_str().unwrap_or(route_ns);
    let name = parent["name"].as_str().unwrap_or("");
    match (group, kind) {
        ("" | "core", "Service") => true,
        ("gateway.networking.k8s.io", "Gateway") => {
            view.waypoints.contains_key(&format!("{ns}/{name}"))
        }
        _ => false,
    }
}

async fn route(
    ctx: &Ctx,
    memory: &mut Memory,
    key: &str,
    r: &meshcore::proto::config::RouteResource,
    view: &MeshView,
) -> Result<bool, WriteError> {
    let spec: Value = serde_json::from_str(&r.spec_json).unwrap_or(Value::Null);
    let parents: Vec<Value> = conditions_of(&spec["parentRefs"])
        .into_iter()
        .filter(|p| is_ours(p, &r.namespace, view))
        .collect();
    let conds = status::route_parent_conditions(
        view.route_findings.get(key),
        view.route_refs.get(key),
        view,
    );
    let fingerprint = format!("{}|{conds:?}", r.spec_json);
    if memory.unchanged(key, &fingerprint) {
        return Ok(false);
    }
    let plural = if r.kind == "GRPCRoute" {
        "grpcroutes"
    } else {
        "httproutes"
    };
    let ar = resource("gateway.networking.k8s.io/v1", &r.kind, plural);
    let what = format!("status.parents of {} {}/{}", r.kind, r.namespace, r.name);
    let wrote = read_modify_write(ctx, &ar, &r.namespace, &r.name, &what, |obj| {
        let generation = obj.metadata.generation;
        let now = now_rfc3339();
        let live = conditions_of(&obj.data["status"]["parents"]);
        let (ours, mut others): (Vec<Value>, Vec<Value>) = live
            .into_iter()
            .partition(|p| p["controllerName"] == CONTROLLER_NAME);
        let mine: Vec<Value> = parents
            .iter()
            .map(|parent| {
                let before = ours
                    .iter()
                    .find(|p| p["parentRef"] == *parent)
                    .map(|p| conditions_of(&p["conditions"]))
                    .unwrap_or_default();
                json!({
                    "parentRef": parent,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": conds.iter().map(|c| rendered(c, &before, generation, &now)).collect::<Vec<_>>(),
                })
            })
            .collect();
        if mine == ours {
            return false;
        }
        others.extend(mine);
        // Gateway API allows 32 parents.
        others.truncate(32);
        let status = obj.data.as_object_mut().map(|o| {
            o.entry("status")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .map(|s| s.insert("parents".into(), Value::Array(others)))
        });
        status.is_some()
    })
    .await?;
    memory.remember(key.to_string(), fingerprint);
    Ok(wrote)
}

async fn policy(
    ctx: &Ctx,
    memory: &mut Memory,
    key: &str,
    namespace: &str,
    name: &str,
    c: &Condition,
    fingerprint: String,
) -> Result<bool, WriteError> {
    if memory.unchanged(key, &fingerprint) {
        return Ok(false);
    }
    let ar = resource(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    );
    let what = format!("status of AuthorizationPolicy {namespace}/{name}");
    let wrote = read_modify_write(ctx, &ar, namespace, name, &what, |obj| {
        let generation = obj.metadata.generation;
        let live = conditions_of(&obj.data["status"]["conditions"]);
        let want = rendered(c, &live, generation, &now_rfc3339());
        let (ours, mut others): (Vec<Value>, Vec<Value>) = live
            .into_iter()
            .partition(|l| l["type"] == ZTUNNEL_ACCEPTED || l["type"] == WAYPOINT_ACCEPTED);
        if ours == [want.clone()] {
            return false;
        }
        others.push(want);
        obj.data.as_object_mut().is_some_and(|o| {
            o.entry("status")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .map(|s| s.insert("conditions".into(), Value::Array(others)))
                .is_some()
        })
    })
    .await?;
    memory.remember(key.to_string(), fingerprint);
    Ok(wrote)
}

/// GET, `change` (false: nothing to write), PUT `/status` with the resourceVersion read; a
/// conflict reads again. Whether a write was made.
async fn read_modify_write(
    ctx: &Ctx,
    ar: &ApiResource,
    namespace: &str,
    name: &str,
    what: &str,
    mut change: impl FnMut(&mut DynamicObject) -> bool,
) -> Result<bool, WriteError> {
    let api = ctx.api(ar, Some(namespace));
    let mut last = None;
    for _ in 0..CONFLICT_RETRIES {
        let Some(mut obj) = api
            .get_opt(name)
            .await
            .map_err(WriteError::api(format!("reading {what}")))?
        else {
            return Ok(false);
        };
        if !change(&mut obj) {
            return Ok(false);
        }
        ctx.check()?;
        match api.replace_status(name, &PostParams::default(), &obj).await {
            Ok(_) => {
                info!("wrote {what}");
                return Ok(true);
            }
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) if is_conflict(&e) => last = Some(e),
            Err(e) => return Err(WriteError::api(format!("writing {what}"))(e)),
        }
    }
    match last {
        Some(e) => Err(WriteError::api(format!("writing {what} (conflicts)"))(e)),
        None => Ok(false),
    }
}
