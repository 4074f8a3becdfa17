//! Outbound: connections an enrolled pod's app makes, captured into the pod's 15001 listener.
//!
//! Decides where each goes — a VIP or pod IP bound to a waypoint goes over HBONE to a waypoint
//! pod's 15008 asking for the dialled address; a mesh pod or a Service VIP with mesh endpoints
//! goes over HBONE to `<pod ip>:15008` with the source pod's identity; anything else goes out as
//! plain TCP — and then copies bytes. An unusable waypoint is bypassed (counted, logged) or
//! refused, per `--missing-waypoint`. Owns the routing decision ([`route`], a pure function)
//! and the copy; the tunnel itself is `meshcore::hbone`, the bindings are meshd's.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use meshcore::proto::config::{WaypointBinding, Workload};
use meshcore::store::{ConfigStore, canonical, workload_identity};
use meshcore::{HBONE_PORT, Identity};
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::capture::ListenerInfo;
use crate::copy;
use crate::limits::{LOG_PERIOD, Throttle};
use crate::metrics::{FLAG_CONNECT, FLAG_DENY, Metrics};
use crate::outbound_stream;
use crate::proxy::{Ctx, Pod, accept_loop, is_mesh_port};
use crate::telemetry::{AccessLog, ConnResult, End, Outcome, tcp_labels};

/// Where a captured outbound connection goes.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// Over HBONE to `hbone` (a pod's 15008), asking for `target`, expecting `identity`.
    /// `waypoint` names the Gateway ("ns/name") when `hbone` is one of its pods; `target` is
    /// then the address the app dialled (a VIP or pod IP), for the waypoint to route.
    Hbone {
        target: SocketAddr,
        hbone: SocketAddr,
        identity: Identity,
        workload: String,
        waypoint: Option<String>,
    },
    /// Plain TCP to the given address (destination not in the mesh).
    Passthrough(SocketAddr),
    /// Nowhere: the reason is logged.
    Refuse(String),
    /// Nowhere, by this node's setting (`--missing-waypoint refuse`): counted as denied.
    Deny(String),
}

/// What ztunnel does with traffic whose waypoint cannot be used (`--missing-waypoint`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingWaypoint {
    /// Send it direct, as Istio does (fail open): the waypoint's routing and policy are skipped.
    /// Each such connection is counted in mesh_waypoint_bypass_total and logged (throttled).
    #[default]
    Bypass,
    /// Refuse the connection (fail closed): it is closed and counted as denied.
    Refuse,
}

impl std::fmt::Display for MissingWaypoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MissingWaypoint::Bypass => "bypass",
            MissingWaypoint::Refuse => "refuse",
        })
    }
}

/// A destination bound to a waypoint that cannot be used, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Unavailable {
    /// The service's hostname (VIP dialled) or the pod's "ns/name" (pod IP dialled).
    pub destination: String,
    /// The Gateway ("ns/name") the destination is bound to.
    pub waypoint: String,
    pub reason: String,
}

/// A route, and the unusable waypoint it went around or was refused for.
#[derive(Debug, PartialEq)]
pub struct Decision {
    pub route: Route,
    pub unavailable: Option<Unavailable>,
}

/// The pod label every waypoint pod carries (the Gateway's name).
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Chooses the route for a connection `src` originally sent to `dst`. A dialled VIP whose
/// Service is bound to a waypoint, or a dialled pod IP whose Workload is, goes to a waypoint pod
/// with the dialled address as target (a VIP never falls back to its pods' workload binding);
/// a binding that cannot be used is bypassed or refused as `missing` says.
pub fn route(
    store: &ConfigStore,
    src: &Workload,
    dst: SocketAddr,
    missing: MissingWaypoint,
) -> Decision {
    route_avoiding(store, src, dst, missing, None)
}

/// [`route`], choosing among a Service's endpoints (or a waypoint's pods) any but the workload
/// `avoid` when there is another: where a connection goes when `avoid` could not take it.
pub fn route_avoiding(
    store: &ConfigStore,
    src: &Workload,
    dst: SocketAddr,
    missing: MissingWaypoint,
    avoid: Option<&str>,
) -> Decision {
    let dialled = SocketAddr::new(canonical(dst.ip()), dst.port());
    let waypoint = bound(store, dialled).and_then(|(b, destination)| {
        Some(match waypoint_pods(store, b) {
            Ok(pods) => {
                // A waypoint's own traffic never goes to a waypoint (it would loop).
                if src.labels.contains_key(GATEWAY_NAME_LABEL)
                    || pods.iter().any(|w| w.uid == src.uid)
                {
                    return None;
                }
                Ok(to_waypoint(&pods, &b.gateway, dialled, avoid))
            }
            Err(reason) => Err(Unavailable {
                destination,
                waypoint: b.gateway.clone(),
                reason,
            }),
        })
    });
    match (waypoint, missing) {
        (None, _) => Decision {
            route: direct(store, dialled, avoid),
            unavailable: None,
        },
        (Some(Ok(route)), _) => Decision {
            route,
            unavailable: None,
        },
        (Some(Err(u)), MissingWaypoint::Refuse) => Decision {
            route: Route::Deny(format!(
                "waypoint unavailable: {} is bound to waypoint {} ({}); refused by --missing-waypoint refuse",
                u.destination, u.waypoint, u.reason
            )),
            unavailable: Some(u),
        },
        (Some(Err(u)), MissingWaypoint::Bypass) => Decision {
            route: direct(store, dialled, avoid),
            unavailable: Some(u),
        },
    }
}

/// The waypoint binding that applies to traffic dialled to `dst`, with the destination's name
/// for metrics: the Service's for a VIP, the Workload's for a pod IP. None for what [`direct`]
/// refuses anyway (a mesh port, a port the Service does not have).
fn bound(store: &ConfigStore, dst: SocketAddr) -> Option<(&WaypointBinding, String)> {
    if let Some(svc) = store.service_by_vip(dst.ip()) {
        if !svc.ports.iter().any(|p| p.port == u32::from(dst.port())) {
            return None;
        }
        return binding(&svc.waypoint).map(|b| (b, svc.hostname.clone()));
    }
    let w = store.workload_by_ip(dst.ip())?;
    if is_mesh_port(dst.port()) {
        return None;
    }
    binding(&w.waypoint).map(|b| (b, w.uid.clone()))
}

/// A binding that names something (meshd sends none, or an empty one, for unbound objects).
pub fn binding(b: &Option<WaypointBinding>) -> Option<&WaypointBinding> {
    b.as_ref()
        .filter(|b| !(b.gateway.is_empty() && b.service.is_empty() && b.unavailable.is_empty()))
}

/// The waypoint pods a binding sends traffic to, or why it cannot be used.
pub fn waypoint_pods<'a>(
    store: &'a ConfigStore,
    b: &WaypointBinding,
) -> Result<Vec<&'a Workload>, String> {
    if !b.unavailable.is_empty() {
        return Err(b.unavailable.clone());
    }
    let Some(svc) = store.service(&b.service) else {
        return Err(format!("waypoint service {} is not known", b.service));
    };
    let pods: Vec<&Workload> = svc
        .endpoints
        .iter()
        .filter_map(|ep| store.workload(&ep.workload_uid))
        .filter(|w| w.ips.iter().any(|ip| ip.parse::<IpAddr>().is_ok()))
        .map(|w| w.as_ref())
        .collect();
    if pods.is_empty() {
        return Err(format!("waypoint service {} has no endpoints", b.service));
    }
    Ok(pods)
}

/// HBONE to one of the waypoint's pods (chosen as [`direct`] chooses endpoints), asking for the
/// dialled address and expecting that pod's identity.
fn to_waypoint(
    pods: &[&Workload],
    gateway: &str,
    dialled: SocketAddr,
    avoid: Option<&str>,
) -> Route {
    let w = *pick(pods, |w| Some(w.uid.as_str()) == avoid);
    match pick_ip(w, dialled.ip()) {
        Some(ip) => Route::Hbone {
            target: dialled,
            hbone: SocketAddr::new(ip, HBONE_PORT),
            identity: workload_identity(w),
            workload: w.uid.clone(),
            waypoint: Some(gateway.to_string()),
        },
        // waypoint_pods kept only pods with a parseable IP.
        None => Route::Refuse(format!("waypoint pod {} has no usable IP", w.uid)),
    }
}

/// The route without waypoints: a mesh pod or a Service VIP with mesh endpoints over HBONE to
/// the pod's 15008, anything else plain TCP.
fn direct(store: &ConfigStore, dst: SocketAddr, avoid: Option<&str>) -> Route {
    let ip = dst.ip();
    if is_mesh_port(dst.port()) && store.workload_by_ip(ip).is_some() {
        return Route::Refuse(format!("{dst} is a mesh port of a mesh pod"));
    }
    if let Some(svc) = store.service_by_vip(ip) {
        if !svc.ports.iter().any(|p| p.port == u32::from(dst.port())) {
            return Route::Refuse(format!("service {} has no port {}", svc.key, dst.port()));
        }
        let candidates: Vec<(&Workload, u16)> = svc
            .endpoints
            .iter()
            .filter_map(|ep| {
                let w = store.workload(&ep.workload_uid)?;
                let port = ep
                    .ports
                    .get(&u32::from(dst.port()))
                    .and_then(|p| u16::try_from(*p).ok())?;
                Some((w.as_ref(), port))
            })
            .collect();
        if candidates.is_empty() {
            return Route::Refuse(format!(
                "service {} has no endpoints for port {}",
                svc.key,
                dst.port()
            ));
        }
        let (w, port) = *pick(&candidates, |(w, _)| Some(w.uid.as_str()) == avoid);
        let Some(ep_ip) = pick_ip(w, ip) else {
            return Route::Refuse(format!("endpoint {} has no usable IP", w.uid));
        };
        return to_workload(w, SocketAddr::new(ep_ip, port));
    }
    if let Some(w) = store.workload_by_ip(ip) {
        return to_workload(w, SocketAddr::new(ip, dst.port()));
    }
    Route::Passthrough(SocketAddr::new(ip, dst.port()))
}

/// Whether `route`, chosen for a connection dialled to `dst`, still leads where the config
/// `store` would send it: its pod is still in the config and, for a Service VIP reached
/// directly, still one of the Service's endpoints (a pod that is going, or no longer ready).
pub fn still_routed(store: &ConfigStore, dst: SocketAddr, route: &Route) -> bool {
    let Route::Hbone {
        workload, waypoint, ..
    } = route
    else {
        return true;
    };
    if store.workload(workload).is_none() {
        return false;
    }
    match (waypoint, store.service_by_vip(canonical(dst.ip()))) {
        (None, Some(svc)) => svc.endpoints.iter().any(|ep| ep.workload_uid == *workload),
        _ => true,
    }
}

/// One of `items` (not empty) at random, any but those `avoided` when there are others.
fn pick<T>(items: &[T], avoided: impl Fn(&T) -> bool) -> &T {
    let mut rng = rand::rng();
    let others = items.iter().filter(|i| !avoided(i)).count();
    if others == 0 {
        return &items[rng.random_range(0..items.len())];
    }
    let n = rng.random_range(0..others);
    items
        .iter()
        .filter(|i| !avoided(i))
        .nth(n)
        .unwrap_or(&items[0])
}

fn to_workload(w: &Workload, target: SocketAddr) -> Route {
    if w.captured {
        Route::Hbone {
            target,
            hbone: SocketAddr::new(target.ip(), HBONE_PORT),
            identity: workload_identity(w),
            workload: w.uid.clone(),
            waypoint: None,
        }
    } else {
        Route::Passthrough(target)
    }
}

/// An endpoint IP of the same family as the address dialled, else any.
fn pick_ip(w: &Workload, dialled: IpAddr) -> Option<IpAddr> {
    let ips: Vec<IpAddr> = w.ips.iter().filter_map(|s| s.parse().ok()).collect();
    ips.iter()
        .find(|ip| ip.is_ipv4() == dialled.is_ipv4())
        .or(ips.first())
        .copied()
}

/// The node's waypoint setting and the log throttle for bypassed waypoints.
pub struct Waypoints {
    pub missing: MissingWaypoint,
    /// One throttle per destination, so a busy bypassed service does not hide another.
    warned: std::sync::Mutex<HashMap<String, Throttle>>,
}

/// How many destinations' throttles are kept before starting over (bounds memory under churn).
const MAX_THROTTLED_DESTINATIONS: usize = 4096;

impl Waypoints {
    pub fn new(missing: MissingWaypoint) -> Waypoints {
        Waypoints {
            missing,
            warned: Default::default(),
        }
    }

    /// Records one connection that went around `u`'s waypoint: counted, and logged at most
    /// once per [`LOG_PERIOD`] per destination.
    fn bypassed(&self, metrics: &Metrics, u: &Unavailable, src: &str, dst: SocketAddr) {
        metrics.waypoint_bypassed(&u.destination, &u.waypoint, &u.reason);
        let line = {
            let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
            if warned.len() >= MAX_THROTTLED_DESTINATIONS && !warned.contains_key(&u.destination) {
                warned.clear();
            }
            warned
                .entry(u.destination.clone())
                .or_insert_with(|| Throttle::new(LOG_PERIOD))
                .hit()
        };
        if let Some(suppressed) = line {
            warn!(src.workload = %src, %dst, destination = %u.destination, waypoint = %u.waypoint, reason = %u.reason,
                bypassed_since_last_line = suppressed,
                "waypoint unavailable: sending direct, its L7 routing and policy are skipped (--missing-waypoint refuse to refuse instead)");
        }
    }
}

/// Accepts on one of the pod's outbound listeners until the task is aborted.
pub async fn serve(ctx: Arc<Ctx>, pod: Arc<Pod>, listener: TcpListener) {
    let at = ctx.capture.listener_info(&listener);
    let handle = move |ctx, pod, tcp, peer| handle(ctx, pod, tcp, peer, at);
    accept_loop(ctx, pod, listener, "outbound", handle).await
}

async fn handle(
    ctx: Arc<Ctx>,
    pod: Arc<Pod>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    at: ListenerInfo,
) {
    let start = Instant::now();
    let dst = match ctx.capture.original_dst(&tcp, peer, &at) {
        Ok(d) => d,
        Err(e) => {
            warn!(pod = %pod.workload.uid, %peer, error = %e, "outbound: cannot recover original destination; closing");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    // Marks this snapshot seen: opening the stream watches for the endpoint leaving after it.
    let mut config = ctx.config.clone();
    let Some(mut store) = config.borrow_and_update().clone() else {
        warn!(pod = %pod.workload.uid, %dst, "outbound: no config from meshd yet; closing");
        return;
    };
    let Decision {
        mut route,
        unavailable,
    } = route(&store, &pod.workload, dst, ctx.waypoints.missing);
    debug!(pod = %pod.workload.uid, %peer, %dst, ?route, ?unavailable, "outbound route");
    if let Some(u) = &unavailable
        && !matches!(route, Route::Deny(_))
    {
        ctx.waypoints
            .bypassed(&ctx.metrics, u, &pod.workload.uid, dst);
    }
    // Counted from here until the connection ends: a pod leaving the config still owes it.
    let mut routed = match &route {
        Route::Hbone { workload, .. } => Some(ctx.routed.enter(workload)),
        _ => None,
    };
    // `--fast-path`: an enrolled pod of this node is spliced in the kernel after the same
    // policy check its inbound path would make.
    if let Route::Hbone {
        target,
        workload,
        waypoint: None,
        ..
    } = &route
        && let Some(dst_pod) = crate::fastpath::local_destination(&ctx, workload)
    {
        let target = *target;
        // Boxed: a future is as large as its largest state, so inline this one would set the
        // size of every connection's task, fast path or not.
        return Box::pin(crate::fastpath::handle(
            ctx, pod, dst_pod, tcp, peer, dst, target, start,
        ))
        .await;
    }
    // The stream is opened before the connection's labels are taken: a retry on another
    // endpoint (`outbound_stream`) is counted and logged as the endpoint that served it.
    // Boxed: opening (certificate, pool, perhaps TLS and HTTP/2 handshakes, a retry) needs
    // kilobytes of future for a moment; inline, they would stay in the connection's task for
    // its whole life.
    let opened = match &route {
        Route::Hbone { .. } => {
            let (opened, rerouted) =
                Box::pin(outbound_stream::open(&ctx, &pod, peer, dst, &route, config)).await;
            if let Some(r) = rerouted {
                if let Route::Hbone { workload, .. } = &r.route {
                    routed = Some(ctx.routed.enter(workload));
                }
                (route, store) = (r.route, r.store);
            }
            Some(opened)
        }
        _ => {
            drop(config);
            None
        }
    };
    let src = End {
        workload: Some(&pod.workload),
        principal: None,
    };
    let service = store.service_by_vip(dst.ip()).map(|s| s.as_ref());
    let (dst_workload, hbone) = match &route {
        Route::Hbone { workload, .. } => (store.workload(workload).map(|w| w.as_ref()), true),
        Route::Passthrough(addr) => (store.workload_by_ip(addr.ip()).map(|w| w.as_ref()), false),
        Route::Refuse(_) | Route::Deny(_) => (None, false),
    };
    let labels = tcp_labels(
        "source",
        src,
        End {
            workload: dst_workload,
            principal: None,
        },
        service,
        hbone,
    );
    let result = ConnResult::new(
        start,
        ctx.metrics.open(labels),
        access_log(&pod, peer, dst, &route),
    )
    .traced(ctx.spans.as_ref());
    // The config snapshot is not needed past this point: a connection that outlives config
    // pushes must not keep every old snapshot alive.
    drop(store);
    let outcome = match &route {
        Route::Passthrough(addr) => match pod.netns.connect(*addr).await {
            Ok(mut up) => copied(copy::bidirectional(&mut tcp, &mut up, result.metrics()).await),
            Err(e) => Outcome::failed(Some(FLAG_CONNECT), format!("connect {addr}: {e}")),
        },
        Route::Hbone { .. } => match opened {
            Some(Ok(mut stream)) => {
                copied(copy::bidirectional(&mut tcp, &mut stream, result.metrics()).await)
            }
            Some(Err(e)) => Outcome::failed(
                Some(if e.denied { FLAG_DENY } else { FLAG_CONNECT }),
                e.message,
            ),
            None => Outcome::failed(Some(FLAG_CONNECT), "no stream was opened".to_string()),
        },
        Route::Refuse(reason) => Outcome::failed(Some("NR"), reason.clone()),
        Route::Deny(reason) => Outcome::failed(Some(FLAG_DENY), reason.clone()),
    };
    result.finish(outcome);
    drop(routed);
}

/// The access-log facts of an outbound connection taking `route`.
fn access_log(pod: &Pod, peer: SocketAddr, dst: SocketAddr, route: &Route) -> AccessLog {
    let mut log = AccessLog {
        direction: "outbound",
        src_workload: Some(pod.names.uid.clone()),
        src_namespace: Some(pod.names.namespace.clone()),
        peer: Some(peer),
        dst: Some(dst),
        ..AccessLog::default()
    };
    match route {
        Route::Hbone {
            target,
            hbone,
            identity,
            workload,
            waypoint,
        } => {
            log.src_identity = Some(pod.names.identity.clone());
            log.endpoint = Some(*target);
            log.dst_identity = Some(identity.to_string().into());
            log.protocol = Some("HBONE");
            match waypoint {
                Some(waypoint) => {
                    log.waypoint = Some(waypoint.as_str().into());
                    log.waypoint_workload = Some(workload.as_str().into());
                    log.waypoint_address = Some(*hbone);
                }
                None => log.dst_workload = Some(workload.as_str().into()),
            }
        }
        Route::Passthrough(_) => log.protocol = Some("TCP"),
        Route::Refuse(_) | Route::Deny(_) => {}
    }
    log
}

/// How a copy ended: `(sent, received)` as `copy::bidirectional` counts them.
fn copied(r: std::io::Result<(u64, u64)>) -> Outcome {
    match r {
        Ok((sent, received)) => Outcome::Complete { sent, received },
        Err(e) => Outcome::failed(None, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcore::proto::config::{ConfigUpdate, Endpoint, Service, ServicePort};

    fn wl(uid: &str, ips: &[&str], captured: bool) -> Workload {
        let (ns, name) = uid.split_once('/').unwrap();
        Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: ns.into(),
            service_account: name.into(),
            trust_domain: "td".into(),
            ips: ips.iter().map(|ip| ip.to_string()).collect(),
            captured,
            ..Default::default()
        }
    }

    fn bind(gateway: &str, unavailable: &str) -> Option<WaypointBinding> {
        Some(WaypointBinding {
            gateway: gateway.into(),
            service: gateway.into(),
            unavailable: unavailable.into(),
        })
    }

    /// A service on port 80 → 8080 with the given VIPs, endpoints and binding.
    fn svc(key: &str, vips: &[&str], eps: &[&str], waypoint: Option<WaypointBinding>) -> Service {
        let (ns, name) = key.split_once('/').unwrap();
        Service {
            key: key.into(),
            name: name.into(),
            namespace: ns.into(),
            hostname: format!("{name}.{ns}.svc.cluster.local"),
            vips: vips.iter().map(|v| v.to_string()).collect(),
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
                name: "http".into(),
                ..Default::default()
            }],
            endpoints: eps
                .iter()
                .map(|uid| Endpoint {
                    workload_uid: uid.to_string(),
                    ports: [(80, 8080), (15008, 15008)].into(),
                })
                .collect(),
            waypoint,
        }
    }

    /// Mesh pods `a/mesh` (behind a/svc, unbound, and a/bound, bound to waypoint a/wp) and
    /// `a/pod-bound` (workload binding to a/wp); a/wp's pod; a service bound to a Gateway that
    /// does not exist and one bound to a waypoint without pods; a non-mesh pod.
    fn store() -> ConfigStore {
        let mut waypoint_pod = wl("a/wp-0", &["10.1.0.9", "fd00::9"], false);
        waypoint_pod.labels = [(GATEWAY_NAME_LABEL.to_string(), "wp".to_string())].into();
        let mut pod_bound = wl("a/pod-bound", &["10.1.0.3"], true);
        pod_bound.waypoint = bind("a/wp", "");
        let mut s = ConfigStore::default();
        s.apply(ConfigUpdate {
            snapshot: true,
            workloads: vec![
                wl("a/client", &["10.1.0.1"], true),
                wl("a/mesh", &["10.1.0.2"], true),
                pod_bound,
                waypoint_pod,
                wl("b/plain", &["10.2.0.2"], false),
            ],
            services: vec![
                svc("a/svc", &["10.96.0.10"], &["a/mesh"], None),
                svc(
                    "a/bound",
                    &["10.96.0.20", "fd00:96::20"],
                    &["a/mesh"],
                    bind("a/wp", ""),
                ),
                svc("a/wp", &["10.96.0.9"], &["a/wp-0"], None),
                svc(
                    "a/down",
                    &["10.96.0.30"],
                    &["a/mesh"],
                    bind("a/gone", "no Gateway a/gone"),
                ),
                svc(
                    "a/idle",
                    &["10.96.0.40"],
                    &["a/mesh"],
                    bind("a/wp-idle", ""),
                ),
                svc("a/wp-idle", &["10.96.0.41"], &[], None),
            ],
            ..Default::default()
        });
        s
    }

    fn client(s: &ConfigStore) -> Workload {
        s.workload("a/client").unwrap().as_ref().clone()
    }

    fn go(dst: &str, missing: MissingWaypoint) -> Decision {
        let s = store();
        route(&s, &client(&s), dst.parse().unwrap(), missing)
    }

    fn direct_to_mesh(target: &str) -> Route {
        Route::Hbone {
            target: target.parse().unwrap(),
            hbone: "10.1.0.2:15008".parse().unwrap(),
            identity: Identity::new("td", "a", "mesh"),
            workload: "a/mesh".into(),
            waypoint: None,
        }
    }

    fn via_waypoint(target: &str, hbone: &str) -> Route {
        Route::Hbone {
            target: target.parse().unwrap(),
            hbone: hbone.parse().unwrap(),
            identity: Identity::new("td", "a", "wp-0"),
            workload: "a/wp-0".into(),
            waypoint: Some("a/wp".into()),
        }
    }

    fn plain(route: Route) -> Decision {
        Decision {
            route,
            unavailable: None,
        }
    }

    /// The size of the future a connection's task holds for its whole life.
    fn task_size<F, Fut>(_: F) -> usize
    where
        F: Fn(Arc<Ctx>, Arc<Pod>, TcpStream, SocketAddr, ListenerInfo) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every held connection pays for this future (1.4–1.5 KB in dev and release builds):
    /// what is needed only while the stream opens (TLS and HTTP/2 handshakes, a retry) is
    /// boxed, so it does not stay for the connection's life. Inline it would be kilobytes.
    #[test]
    fn an_outbound_connection_task_stays_small() {
        let size = task_size(handle);
        assert!(
            size <= 1536,
            "an outbound connection's future is {size} bytes: box what only the stream's opening needs"
        );
    }

    #[test]
    fn mesh_pod_goes_over_hbone_to_15008() {
        assert_eq!(
            go("10.1.0.2:9000", MissingWaypoint::Bypass),
            plain(direct_to_mesh("10.1.0.2:9000"))
        );
    }

    #[test]
    fn vip_resolves_to_endpoint_and_target_port() {
        assert_eq!(
            go("10.96.0.10:80", MissingWaypoint::Bypass),
            plain(direct_to_mesh("10.1.0.2:8080"))
        );
        assert!(matches!(
            go("10.96.0.10:81", MissingWaypoint::Bypass).route,
            Route::Refuse(_)
        ));
    }

    /// Avoiding an endpoint that could not take a connection picks any other, every time; with
    /// no other, the same one (the caller then gives up rather than retry it).
    #[test]
    fn a_retry_avoids_the_endpoint_that_failed_when_there_is_another() {
        let mut s = store();
        s.apply(ConfigUpdate {
            workloads: vec![wl("a/mesh-2", &["10.1.0.5"], true)],
            services: vec![svc("a/two", &["10.96.0.50"], &["a/mesh", "a/mesh-2"], None)],
            ..Default::default()
        });
        let src = client(&s);
        let two: SocketAddr = "10.96.0.50:80".parse().unwrap();
        let one: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let (mut seen, m) = (std::collections::BTreeSet::new(), MissingWaypoint::Bypass);
        for _ in 0..64 {
            let to = |dst, avoid| match route_avoiding(&s, &src, dst, m, avoid).route {
                Route::Hbone { workload, .. } => workload,
                other => panic!("{other:?}"),
            };
            assert_eq!(to(two, Some("a/mesh")), "a/mesh-2");
            assert_eq!(to(two, Some("a/mesh-2")), "a/mesh");
            assert_eq!(to(one, Some("a/mesh")), "a/mesh");
            seen.insert(to(two, None));
        }
        assert_eq!(seen.len(), 2, "without avoiding, both endpoints are chosen");
    }

    /// A route stops leading where the config sends traffic when its pod leaves the config or,
    /// for a VIP reached directly, the Service's endpoints; a waypoint route only with its pod.
    #[test]
    fn a_route_is_still_routed_while_its_pod_and_endpoint_remain() {
        let s = store();
        let to_vip = go("10.96.0.10:80", MissingWaypoint::Bypass).route;
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        assert!(still_routed(&s, vip, &to_vip));
        let without = |drop_workload: bool, drop_endpoint: bool| {
            let mut s = store();
            let mut u = ConfigUpdate::default();
            if drop_workload {
                u.removed_workloads.push("a/mesh".into());
            }
            if drop_endpoint {
                u.services.push(svc("a/svc", &["10.96.0.10"], &[], None));
            }
            s.apply(u);
            s
        };
        assert!(
            !still_routed(&without(true, false), vip, &to_vip),
            "pod gone"
        );
        assert!(
            !still_routed(&without(false, true), vip, &to_vip),
            "not an endpoint"
        );
        let to_pod = direct_to_mesh("10.1.0.2:8080");
        let pod_ip: SocketAddr = "10.1.0.2:8080".parse().unwrap();
        assert!(still_routed(&without(false, true), pod_ip, &to_pod));
        assert!(!still_routed(&without(true, false), pod_ip, &to_pod));
        let bound: SocketAddr = "10.96.0.20:80".parse().unwrap();
        let to_waypoint = go("10.96.0.20:80", MissingWaypoint::Bypass).route;
        assert!(matches!(
            to_waypoint,
            Route::Hbone {
                waypoint: Some(_),
                ..
            }
        ));
        assert!(still_routed(&without(true, true), bound, &to_waypoint));
        assert!(still_routed(&s, bound, &Route::Passthrough(bound)));
    }

    #[test]
    fn non_mesh_and_unknown_pass_through() {
        for dst in ["10.2.0.2:80", "192.0.2.1:80"] {
            assert_eq!(
                go(dst, MissingWaypoint::Bypass),
                plain(Route::Passthrough(dst.parse().unwrap()))
            );
        }
    }

    #[test]
    fn bound_vip_goes_to_a_waypoint_pod_of_its_family_asking_for_the_vip() {
        for missing in [MissingWaypoint::Bypass, MissingWaypoint::Refuse] {
            assert_eq!(
                go("10.96.0.20:80", missing),
                plain(via_waypoint("10.96.0.20:80", "10.1.0.9:15008"))
            );
            assert_eq!(
                go("[fd00:96::20]:80", missing),
                plain(via_waypoint("[fd00:96::20]:80", "[fd00::9]:15008"))
            );
        }
        // A port the Service does not have is refused as without a waypoint.
        assert!(matches!(
            go("10.96.0.20:81", MissingWaypoint::Bypass).route,
            Route::Refuse(_)
        ));
    }

    #[test]
    fn bound_pod_ip_goes_to_the_waypoint_asking_for_the_pod_ip() {
        assert_eq!(
            go("10.1.0.3:8080", MissingWaypoint::Bypass),
            plain(via_waypoint("10.1.0.3:8080", "10.1.0.9:15008"))
        );
        // Its mesh ports are still refused, not sent to the waypoint.
        assert!(matches!(
            go("10.1.0.3:15008", MissingWaypoint::Bypass).route,
            Route::Refuse(_)
        ));
    }

    #[test]
    fn a_service_binding_does_not_apply_to_its_pods_ips() {
        // a/mesh is behind the bound a/bound, but has no workload binding of its own.
        let s = store();
        assert!(s.workload("a/mesh").unwrap().waypoint.is_none());
        assert_eq!(
            go("10.1.0.2:8080", MissingWaypoint::Bypass),
            plain(direct_to_mesh("10.1.0.2:8080"))
        );
    }

    #[test]
    fn a_waypoints_own_traffic_never_goes_to_a_waypoint() {
        let s = store();
        let waypoint = s.workload("a/wp-0").unwrap().as_ref().clone();
        let d = route(
            &s,
            &waypoint,
            "10.96.0.20:80".parse().unwrap(),
            MissingWaypoint::Refuse,
        );
        assert_eq!(d, plain(direct_to_mesh("10.1.0.2:8080")));
        // Nor does a pod of the bound waypoint's Service that lacks the label.
        let mut unlabelled = waypoint.clone();
        unlabelled.labels.clear();
        let d = route(
            &s,
            &unlabelled,
            "10.1.0.3:8080".parse().unwrap(),
            MissingWaypoint::Bypass,
        );
        assert!(
            matches!(d.route, Route::Hbone { waypoint: None, .. }),
            "{d:?}"
        );
    }

    #[test]
    fn unavailable_waypoint_is_bypassed_by_default_and_refused_when_asked() {
        let unavailable = Unavailable {
            destination: "down.a.svc.cluster.local".into(),
            waypoint: "a/gone".into(),
            reason: "no Gateway a/gone".into(),
        };
        assert_eq!(
            go("10.96.0.30:80", MissingWaypoint::Bypass),
            Decision {
                route: direct_to_mesh("10.1.0.2:8080"),
                unavailable: Some(unavailable.clone()),
            }
        );
        let d = go("10.96.0.30:80", MissingWaypoint::Refuse);
        assert_eq!(d.unavailable, Some(unavailable));
        match d.route {
            Route::Deny(reason) => assert!(
                reason.starts_with("waypoint unavailable") && reason.contains("no Gateway a/gone"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_waypoint_without_pods_is_unavailable() {
        let d = go("10.96.0.40:80", MissingWaypoint::Bypass);
        assert_eq!(d.route, direct_to_mesh("10.1.0.2:8080"));
        let u = d.unavailable.expect("counted as bypassed");
        assert_eq!(u.waypoint, "a/wp-idle");
        assert_eq!(u.reason, "waypoint service a/wp-idle has no endpoints");
        assert!(matches!(
            go("10.96.0.40:80", MissingWaypoint::Refuse).route,
            Route::Deny(_)
        ));
        // A binding to a waypoint Service the node does not know is the same.
        let mut s = store();
        s.apply(ConfigUpdate {
            services: vec![svc(
                "a/idle",
                &["10.96.0.40"],
                &["a/mesh"],
                bind("a/nowhere", ""),
            )],
            ..Default::default()
        });
        let d = route(
            &s,
            &client(&s),
            "10.96.0.40:80".parse().unwrap(),
            MissingWaypoint::Bypass,
        );
        assert_eq!(
            d.unavailable.map(|u| u.reason).as_deref(),
            Some("waypoint service a/nowhere is not known")
        );
    }

    #[test]
    fn an_empty_binding_is_no_binding() {
        let s = store();
        assert!(binding(&Some(WaypointBinding::default())).is_none());
        assert!(binding(&s.service("a/bound").unwrap().waypoint).is_some());
    }
}
