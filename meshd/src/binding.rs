//! Waypoint binding: which waypoint, if any, traffic to a Service's VIPs (service binding) or to
//! a pod's IPs (workload binding) must go through, with Istio's rules.
//!
//! - `istio.io/use-waypoint: <gateway>` on the Service or Pod beats the same label on its
//!   Namespace; the value `none` opts out. `istio.io/use-waypoint-namespace`, read from the
//!   same object, names the Gateway's namespace (default: the object's).
//! - A Service binds only to a waypoint whose `istio.io/waypoint-for` is `service` (the
//!   default) or `all`; a Pod only to `workload` or `all`. A label inherited from the
//!   Namespace that names a waypoint not taking this kind of traffic simply does not apply to
//!   it; a label on the object itself does, and is reported unavailable.
//! - A waypoint in another namespace must allow the object's namespace (its `mesh` listener's
//!   `allowedRoutes.namespaces`, `Same` by default).
//! - Waypoint pods (label `gateway.networking.k8s.io/gateway-name` of an existing waypoint, or
//!   `istio.io/dataplane-mode: none`) and a waypoint's own Service never bind.
//! - A binding that cannot be used (no such Gateway, not accepted, no ready pods, ...) is still
//!   returned, with `unavailable` saying why: ztunnel decides what to do (Istio fails open).
//!
//! Pure; owns only these rules. Translation (`translate`) calls it once the Services are known.

use std::collections::BTreeMap;

use meshcore::proto::config::{Service, WaypointBinding};

use crate::resources::ObjectMeta;
use crate::translate::DATAPLANE_MODE_LABEL;
use crate::waypoints::{GATEWAY_NAME_LABEL, Waypoint};

pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";

/// The kind of traffic a binding is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Traffic to a Service VIP.
    Service,
    /// Traffic to a pod IP.
    Workload,
}

impl Target {
    fn as_str(self) -> &'static str {
        match self {
            Target::Service => "service",
            Target::Workload => "workload",
        }
    }
}

/// What the cluster holds that bindings depend on.
pub struct Context<'a> {
    /// Waypoint Gateways by "ns/name".
    pub waypoints: &'a BTreeMap<String, Waypoint>,
    /// Translated Services by "ns/name" (for the waypoints' own Services and their endpoints).
    pub services: &'a BTreeMap<String, Service>,
}

/// A resolved binding, and whether the waypoint takes the object (the Gateway exists, is
/// accepted, takes this kind of traffic and this namespace), running or not: what decides
/// whether the waypoint is sent the object's config.
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    pub binding: WaypointBinding,
    pub admitted: bool,
}

/// A binding an object asks for.
struct Asked {
    gateway: String,
    /// On the object itself (not inherited from its namespace).
    explicit: bool,
}

fn asked(
    obj: &BTreeMap<String, String>,
    ns: &str,
    ns_labels: &BTreeMap<String, String>,
) -> Option<Asked> {
    let (labels, explicit) = if obj.contains_key(USE_WAYPOINT_LABEL) {
        (obj, true)
    } else {
        (ns_labels, false)
    };
    let name = labels.get(USE_WAYPOINT_LABEL)?;
    if name == "none" || name.is_empty() {
        return None;
    }
    let gw_ns = labels
        .get(USE_WAYPOINT_NAMESPACE_LABEL)
        .filter(|n| !n.is_empty())
        .map_or(ns, String::as_str);
    Some(Asked {
        gateway: format!("{gw_ns}/{name}"),
        explicit,
    })
}

/// Whether `meta` is one of an existing waypoint's objects (its pods, its Service).
fn is_waypoint_object(meta: &ObjectMeta, ctx: &Context) -> bool {
    meta.labels
        .get(GATEWAY_NAME_LABEL)
        .is_some_and(|gw| ctx.waypoints.contains_key(&format!("{}/{gw}", meta.ns())))
}

/// The service binding of a Service.
pub fn for_service(
    meta: &ObjectMeta,
    ns_labels: &BTreeMap<String, String>,
    ctx: &Context,
) -> Option<Bound> {
    if is_waypoint_object(meta, ctx) {
        return None;
    }
    resolve(
        asked(&meta.labels, meta.ns(), ns_labels)?,
        Target::Service,
        meta.ns(),
        ns_labels,
        ctx,
    )
}

/// The workload binding of a Pod.
pub fn for_pod(
    meta: &ObjectMeta,
    ns_labels: &BTreeMap<String, String>,
    ctx: &Context,
) -> Option<Bound> {
    let opted_out = meta
        .labels
        .get(DATAPLANE_MODE_LABEL)
        .is_some_and(|v| v == "none");
    if opted_out || is_waypoint_object(meta, ctx) {
        return None;
    }
    resolve(
        asked(&meta.labels, meta.ns(), ns_labels)?,
        Target::Workload,
        meta.ns(),
        ns_labels,
        ctx,
    )
}

fn resolve(
    asked: Asked,
    target: Target,
    ns: &str,
    ns_labels: &BTreeMap<String, String>,
    ctx: &Context,
) -> Option<Bound> {
    let key = asked.gateway;
    let Some(w) = ctx.waypoints.get(&key) else {
        // Unknown Gateway: its waypoint-for would default to service, so an inherited label
        // says nothing about pods.
        if target == Target::Workload && !asked.explicit {
            return None;
        }
        let binding = WaypointBinding {
            gateway: key.clone(),
            service: key.clone(),
            unavailable: format!("no waypoint Gateway {key} (gatewayClassName istio-waypoint)"),
        };
        return Some(Bound {
            binding,
            admitted: false,
        });
    };
    let takes = match target {
        Target::Service => w.waypoint_for.takes_services(),
        Target::Workload => w.waypoint_for.takes_workloads(),
    };
    if !takes {
        return asked.explicit.then(|| Bound {
            binding: WaypointBinding {
                gateway: key.clone(),
                service: w.service_key(),
                unavailable: format!(
                    "waypoint {key} is for {} traffic (istio.io/waypoint-for), not {} traffic",
                    w.waypoint_for.as_str(),
                    target.as_str()
                ),
            },
            admitted: false,
        });
    }
    let service = w.service_key();
    let refused = if let Some(r) = &w.refusal {
        Some(format!("Gateway {key} is not accepted: {}", r.message))
    } else if !w.allows_namespace(ns, ns_labels) {
        Some(format!(
            "Gateway {key} does not allow use from namespace {ns} (listener mesh allowedRoutes.namespaces)"
        ))
    } else {
        None
    };
    let admitted = refused.is_none();
    let unavailable = refused.unwrap_or_else(|| match ctx.services.get(&service) {
        None => format!("waypoint {key} is not running yet (no Service {service})"),
        Some(s) if s.endpoints.is_empty() => format!("waypoint {key} has no ready pods"),
        Some(_) => String::new(),
    });
    Some(Bound {
        binding: WaypointBinding {
            gateway: key,
            service,
            unavailable,
        },
        admitted,
    })
}
