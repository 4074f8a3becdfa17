//! Outbound: connections an enrolled pod's app makes, captured into the pod's 15001 listener.
//!
//! Decides where each goes — a mesh pod or a Service VIP with mesh endpoints goes over HBONE to
//! `<pod ip>:15008` with the source pod's identity, anything else goes out as plain TCP — and
//! then copies bytes. Owns the routing decision ([`route`], a pure function) and the copy; the
//! tunnel itself is `meshcore::hbone`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue};
use meshcore::hbone::{ConnectRequest, Dialer, H2Stream, HboneError, PoolKey};
use meshcore::proto::config::Workload;
use meshcore::store::{ConfigStore, canonical, workload_identity};
use meshcore::{HBONE_PORT, Identity};
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::copy;
use crate::metrics::{FLAG_CONNECT, FLAG_DENY};
use crate::proxy::{Ctx, Pod, accept_loop, is_mesh_port};
use crate::telemetry::{End, tcp_labels};

/// Where a captured outbound connection goes.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// Over HBONE to `hbone` (the pod's 15008), asking for `target`, expecting `identity`.
    Hbone {
        target: SocketAddr,
        hbone: SocketAddr,
        identity: Identity,
        workload: String,
    },
    /// Plain TCP to the given address (destination not in the mesh).
    Passthrough(SocketAddr),
    /// Nowhere: the reason is logged.
    Refuse(String),
}

/// Chooses the route for a connection originally sent to `dst`.
pub fn route(store: &ConfigStore, dst: SocketAddr) -> Route {
    let ip = canonical(dst.ip());
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
        let (w, port) = candidates[rand::rng().random_range(0..candidates.len())];
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

fn to_workload(w: &Workload, target: SocketAddr) -> Route {
    if w.captured {
        Route::Hbone {
            target,
            hbone: SocketAddr::new(target.ip(), HBONE_PORT),
            identity: workload_identity(w),
            workload: w.uid.clone(),
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

/// Accepts on one of the pod's outbound listeners until the task is aborted.
pub async fn serve(ctx: Arc<Ctx>, pod: Arc<Pod>, listener: TcpListener) {
    accept_loop(ctx, pod, listener, "outbound", handle).await
}

async fn handle(ctx: Arc<Ctx>, pod: Arc<Pod>, mut tcp: TcpStream, peer: SocketAddr) {
    let start = Instant::now();
    let dst = match ctx.capture.original_dst(&tcp) {
        Ok(d) => d,
        Err(e) => {
            warn!(pod = %pod.workload.uid, %peer, error = %e, "outbound: cannot recover original destination; closing");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let Some(store) = ctx.config.borrow().clone() else {
        warn!(pod = %pod.workload.uid, %dst, "outbound: no config from meshd yet; closing");
        return;
    };
    let route = route(&store, dst);
    debug!(pod = %pod.workload.uid, %peer, %dst, ?route, "outbound route");
    // `--fast-path`: an enrolled pod of this node is spliced in the kernel after the same
    // policy check its inbound path would make.
    if let Route::Hbone {
        target, workload, ..
    } = &route
        && let Some(dst_pod) = crate::fastpath::local_destination(&ctx, workload)
    {
        let target = *target;
        return crate::fastpath::handle(ctx, pod, dst_pod, tcp, peer, dst, target, start).await;
    }
    let src = End {
        workload: Some(&pod.workload),
        principal: None,
    };
    let service = store.service_by_vip(dst.ip()).map(|s| s.as_ref());
    let (dst_workload, hbone) = match &route {
        Route::Hbone { workload, .. } => (store.workload(workload).map(|w| w.as_ref()), true),
        Route::Passthrough(addr) => (store.workload_by_ip(addr.ip()).map(|w| w.as_ref()), false),
        Route::Refuse(_) => (None, false),
    };
    let mut m = ctx.metrics.open(tcp_labels(
        "source",
        src,
        End {
            workload: dst_workload,
            principal: None,
        },
        service,
        hbone,
    ));
    let result = match &route {
        Route::Passthrough(addr) => match pod.netns.connect(*addr).await {
            Ok(mut up) => copy::bidirectional(&mut tcp, &mut up, &m)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => {
                m.set_response_flags(FLAG_CONNECT);
                Err(format!("connect {addr}: {e}"))
            }
        },
        Route::Hbone {
            target,
            hbone,
            identity,
            ..
        } => match hbone_out(&ctx, &pod, peer, *target, *hbone, identity.clone()).await {
            Ok(mut stream) => copy::bidirectional(&mut tcp, &mut stream, &m)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => {
                m.set_response_flags(if e.denied { FLAG_DENY } else { FLAG_CONNECT });
                Err(e.message)
            }
        },
        Route::Refuse(reason) => {
            m.set_response_flags("NR");
            Err(reason.clone())
        }
    };
    drop(m);
    let dur_ms = start.elapsed().as_millis() as u64;
    let src_ns = &pod.workload.namespace;
    match (result, route) {
        (
            Ok((sent, received)),
            Route::Hbone {
                workload,
                identity,
                target,
                ..
            },
        ) => info!(
            direction = "outbound", src.workload = %pod.workload.uid, src.namespace = %src_ns, src.identity = %pod.identity, %peer, %dst,
            endpoint = %target, dst.workload = %workload, dst.identity = %identity, protocol = "HBONE", sent, received, dur_ms, "connection complete"),
        (Ok((sent, received)), _) => info!(
            direction = "outbound", src.workload = %pod.workload.uid, src.namespace = %src_ns, %peer, %dst, protocol = "TCP", sent, received, dur_ms, "connection complete"),
        (Err(error), _) => {
            warn!(direction = "outbound", src.workload = %pod.workload.uid, src.namespace = %src_ns, %peer, %dst, %error, dur_ms, "connection failed")
        }
    }
}

/// Opens the HBONE stream for one outbound connection (pooled).
async fn hbone_out(
    ctx: &Ctx,
    pod: &Arc<Pod>,
    peer: SocketAddr,
    target: SocketAddr,
    hbone: SocketAddr,
    dst_identity: Identity,
) -> Result<H2Stream, OutError> {
    let cert = ctx.certs.get(&pod.identity).await.map_err(|e| OutError {
        message: e.to_string(),
        denied: false,
    })?;
    let key = PoolKey {
        source: pod.workload.uid.clone(),
        src_identity: pod.identity.clone(),
        dst_identities: vec![dst_identity],
        dst: hbone,
    };
    let netns_pod = pod.clone();
    let dial: Dialer = Arc::new(move |addr| {
        let pod = netns_pod.clone();
        Box::pin(async move { pod.netns.connect(addr).await })
    });
    let req = ConnectRequest {
        authority: target.to_string(),
        headers: connect_headers(pod, peer),
    };
    ctx.pool
        .connect(key, cert.cert.clone(), dial, req)
        .await
        .map_err(|e| OutError {
            denied: matches!(e, HboneError::Status(s) if s == http::StatusCode::UNAUTHORIZED),
            message: format!("HBONE to {hbone} for {target}: {e}"),
        })
}

/// Why an HBONE stream could not be opened; `denied` when the destination's policy said 401.
struct OutError {
    message: String,
    denied: bool,
}

/// The informational headers Istio's ztunnel sends with CONNECT; receivers require none.
fn connect_headers(pod: &Pod, peer: SocketAddr) -> HeaderMap {
    let mut h = HeaderMap::new();
    let w = &pod.workload;
    let mut baggage = format!("k8s.namespace.name={},k8s.pod.name={}", w.namespace, w.name);
    if let Some(app) = w.labels.get("app") {
        baggage.push_str(&format!(",service.name={app}"));
    }
    if let Some(v) = w.labels.get("version") {
        baggage.push_str(&format!(",service.version={v}"));
    }
    let forwarded = match peer {
        SocketAddr::V4(a) => format!("for=\"{a}\""),
        SocketAddr::V6(a) => format!("for=\"[{}]:{}\"", a.ip(), a.port()),
    };
    let mut rng = rand::rng();
    let traceparent = format!(
        "00-{:032x}-{:016x}-01",
        rng.random::<u128>(),
        rng.random::<u64>()
    );
    for (name, value) in [
        ("baggage", baggage),
        ("forwarded", forwarded),
        ("traceparent", traceparent),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcore::proto::config::{ConfigUpdate, Endpoint, Service, ServicePort};

    fn wl(uid: &str, ip: &str, captured: bool) -> Workload {
        let (ns, name) = uid.split_once('/').unwrap();
        Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: ns.into(),
            service_account: "sa".into(),
            trust_domain: "td".into(),
            ips: vec![ip.into()],
            captured,
            ..Default::default()
        }
    }

    fn store() -> ConfigStore {
        let mut s = ConfigStore::default();
        s.apply(ConfigUpdate {
            snapshot: true,
            workloads: vec![
                wl("a/mesh", "10.1.0.2", true),
                wl("b/plain", "10.2.0.2", false),
            ],
            services: vec![Service {
                key: "a/svc".into(),
                vips: vec!["10.96.0.10".into()],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                    name: "http".into(),
                    ..Default::default()
                }],
                endpoints: vec![Endpoint {
                    workload_uid: "a/mesh".into(),
                    ports: [(80, 8080)].into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        s
    }

    #[test]
    fn mesh_pod_goes_over_hbone_to_15008() {
        let r = route(&store(), "10.1.0.2:9000".parse().unwrap());
        assert_eq!(
            r,
            Route::Hbone {
                target: "10.1.0.2:9000".parse().unwrap(),
                hbone: "10.1.0.2:15008".parse().unwrap(),
                identity: Identity::new("td", "a", "sa"),
                workload: "a/mesh".into()
            }
        );
    }

    #[test]
    fn vip_resolves_to_endpoint_and_target_port() {
        match route(&store(), "10.96.0.10:80".parse().unwrap()) {
            Route::Hbone { target, .. } => assert_eq!(target, "10.1.0.2:8080".parse().unwrap()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            route(&store(), "10.96.0.10:81".parse().unwrap()),
            Route::Refuse(_)
        ));
    }

    #[test]
    fn non_mesh_and_unknown_pass_through() {
        assert_eq!(
            route(&store(), "10.2.0.2:80".parse().unwrap()),
            Route::Passthrough("10.2.0.2:80".parse().unwrap())
        );
        assert_eq!(
            route(&store(), "192.0.2.1:80".parse().unwrap()),
            Route::Passthrough("192.0.2.1:80".parse().unwrap())
        );
    }
}
