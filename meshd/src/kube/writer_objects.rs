//! The waypoint objects in the API: each accepted waypoint Gateway's ServiceAccount, Deployment
//! and Service, exactly `waypoints::render` (local mode's rendering) owner-referenced to the
//! Gateway, applied with server-side apply (field manager `meshd`, force); objects meshd applied
//! for a Gateway that is no longer an accepted waypoint are deleted (a deleted Gateway's are
//! collected by the API through their ownerReference); and the `istio-waypoint` GatewayClass,
//! created if absent and never overwritten.
//!
//! Owns nothing but those objects; status is `writer_status`.

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{Ctx, Memory, WriteError, contains, is_not_found, resource};
use crate::kube::FIELD_MANAGER;
use crate::translate::MeshView;
use crate::waypoints::{self, GATEWAY_NAME_LABEL, MANAGED_LABEL, WAYPOINT_CLASS, Waypoint};

/// The controller of the `istio-waypoint` class (Istio's name for it, which meshd stands in for).
pub const CONTROLLER_NAME: &str = "istio.io/mesh-controller";
const MANAGED_VALUE: &str = "istio.io-mesh-controller";

/// The rendered kinds: (apiVersion, kind, plural).
const KINDS: [(&str, &str, &str); 3] = [
    ("v1", "ServiceAccount", "serviceaccounts"),
    ("apps/v1", "Deployment", "deployments"),
    ("v1", "Service", "services"),
];

/// The waypoints ("ns/name") whose objects stay: accepted, with a uid to own them.
pub(super) fn kept_waypoints(view: &MeshView) -> Vec<String> {
    view.waypoints
        .values()
        .filter(|w| w.accepted() && w.uid.is_some())
        .map(Waypoint::key)
        .collect()
}

/// `render(w)` with the owner reference a garbage collector acts on (uid, blockOwnerDeletion).
/// `None` without the Gateway's uid: an ownerReference needs it.
pub(crate) fn desired(w: &Waypoint) -> Option<Vec<Value>> {
    let uid = w.uid.as_ref()?;
    let mut objects = waypoints::render(w);
    for o in &mut objects {
        o["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "name": w.name,
            "uid": uid,
            "controller": true,
            "blockOwnerDeletion": true,
        }]);
    }
    Some(objects)
}

/// Applies the waypoint's three objects where they differ from what the API has. Each result:
/// whether a write was made.
pub(super) async fn apply_waypoint(
    ctx: &Ctx,
    memory: &mut Memory,
    w: &Waypoint,
) -> Vec<Result<bool, WriteError>> {
    let Some(objects) = desired(w) else {
        warn!(gateway = %w.key(), "the Gateway has no uid; its waypoint objects wait for one");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (obj, (api_version, kind, plural)) in objects.iter().zip(KINDS) {
        let key = format!("{kind}/{}", w.key());
        let fingerprint = obj.to_string();
        if memory.unchanged(&key, &fingerprint) {
            continue;
        }
        let api = ctx.api(&resource(api_version, kind, plural), Some(&w.namespace));
        let what = format!("{kind} {}", w.key());
        let r = async {
            let live = api
                .get_opt(&w.name)
                .await
                .map_err(WriteError::api(format!("reading {what}")))?;
            let live = live.and_then(|l| serde_json::to_value(l).ok());
            if live.is_some_and(|l| contains(&l, obj)) {
                return Ok(false);
            }
            ctx.check()?;
            let params = PatchParams::apply(FIELD_MANAGER).force();
            api.patch(&w.name, &params, &Patch::Apply(obj))
                .await
                .map_err(WriteError::api(format!("applying {what}")))?;
            info!(object = %what, "applied waypoint object");
            Ok(true)
        }
        .await;
        if r.is_ok() {
            memory.remember(key, fingerprint);
        }
        out.push(r);
    }
    out
}

/// Deletes the objects meshd applied for Gateways not in `keep` (a Gateway whose class changed,
/// or that is no longer accepted). Objects of other managers are left alone, even with our
/// labels.
pub(super) async fn sweep(ctx: &Ctx, keep: &[String]) -> Result<bool, WriteError> {
    let mut wrote = false;
    let selector = format!("{MANAGED_LABEL}={MANAGED_VALUE}");
    for (api_version, kind, plural) in KINDS {
        let ar = resource(api_version, kind, plural);
        let list = ctx
            .api(&ar, None)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(WriteError::api(format!("listing {kind}s")))?;
        for o in list.items {
            let (Some(ns), Some(name)) = (o.metadata.namespace.clone(), o.metadata.name.clone())
            else {
                continue;
            };
            let gateway = o
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(GATEWAY_NAME_LABEL));
            let Some(gateway) = gateway else { continue };
            if keep.contains(&format!("{ns}/{gateway}")) || !applied_by_us(&o) {
                continue;
            }
            ctx.check()?;
            match ctx
                .api(&ar, Some(&ns))
                .delete(&name, &DeleteParams::default())
                .await
            {
                Ok(_) => {
                    info!(object = %format!("{kind} {ns}/{name}"), "deleted: its Gateway is no longer an accepted waypoint");
                    wrote = true;
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(WriteError::api(format!("deleting {kind} {ns}/{name}"))(e)),
            }
        }
    }
    Ok(wrote)
}

fn applied_by_us(o: &DynamicObject) -> bool {
    o.metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some(FIELD_MANAGER))
}

/// Creates the `istio-waypoint` GatewayClass unless one exists (whoever made it: an existing
/// one is never overwritten).
pub(super) async fn ensure_gateway_class(ctx: &Ctx) -> Result<bool, WriteError> {
    let ar = resource(
        "gateway.networking.k8s.io/v1",
        "GatewayClass",
        "gatewayclasses",
    );
    let api = ctx.api(&ar, None);
    let what = format!("GatewayClass {WAYPOINT_CLASS}");
    if api
        .get_opt(WAYPOINT_CLASS)
        .await
        .map_err(WriteError::api(format!("reading {what}")))?
        .is_some()
    {
        return Ok(false);
    }
    let class: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GatewayClass",
        "metadata": {"name": WAYPOINT_CLASS},
        "spec": {
            "controllerName": CONTROLLER_NAME,
            "description": "The default GatewayClass for waypoints (meshd)",
        },
    }))
    .map_err(|e| WriteError::Api {
        what: format!("building {what}"),
        source: kube::Error::SerdeError(e),
    })?;
    ctx.check()?;
    match api.create(&PostParams::default(), &class).await {
        Ok(_) => {
            info!("created {what}");
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(WriteError::api(format!("creating {what}"))(e)),
    }
}
