//! Opening an outbound connection's HBONE stream, with one retry on another endpoint.
//!
//! A stream that cannot be opened (refused, reset, the peer's 503 when its app refused, a
//! connection that died), or whose endpoint leaves the config while it is being opened (the
//! pod is going: its answer may never come), is tried once more on the route the current
//! config gives, if that is another endpoint. Nothing of the app's is sent before the stream
//! opens, so the second try repeats nothing: the first endpoint's app saw no byte. A rolling
//! update then costs the clients that raced it nothing. A policy denial (401) is final.
//!
//! Owns: the stream request (pool key, CONNECT headers) and the retry decision. Must not
//! touch: the copy, metrics and the access log (outbound's), or routing rules ([`crate::outbound::route`]).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use meshcore::Identity;
use meshcore::hbone::{ConnectRequest, Dialer, H2Stream, HboneError, PoolKey};
use meshcore::store::ConfigStore;
use rand::Rng;
use tracing::debug;

use crate::config::ConfigRx;
use crate::outbound::{Decision, Route, route_avoiding, still_routed};
use crate::proxy::{Ctx, Pod};

/// Why an HBONE stream could not be opened; `denied` when the destination's policy said 401.
pub struct OutError {
    pub message: String,
    pub denied: bool,
}

/// A stream opened on a route other than the one first chosen: that route and the config
/// snapshot it was chosen from (for the connection's labels).
pub struct Rerouted {
    pub route: Route,
    pub store: Arc<ConfigStore>,
}

/// Opens the stream for `first` (an HBONE route of a connection from `peer` to `dst`), or
/// once more on the current config's route for `dst` when the first cannot be opened; see
/// the module doc. `config` must have seen the snapshot `first` was chosen from.
pub async fn open(
    ctx: &Ctx,
    pod: &Arc<Pod>,
    peer: SocketAddr,
    dst: SocketAddr,
    first: &Route,
    mut config: ConfigRx,
) -> (Result<H2Stream, OutError>, Option<Rerouted>) {
    let Route::Hbone { workload, .. } = first else {
        return (Err(not_hbone(first)), None);
    };
    let (error, reason) = {
        let opening = attempt(ctx, pod, peer, first);
        tokio::pin!(opening);
        loop {
            tokio::select! {
                opened = &mut opening => match opened {
                    Ok(stream) => return (Ok(stream), None),
                    Err(e) if e.denied => return (Err(e), None),
                    Err(e) => break (e, "open_failed"),
                },
                changed = config.changed(), if !config.is_closed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let gone = config
                        .borrow_and_update()
                        .as_ref()
                        .is_none_or(|s| !still_routed(s, dst, first));
                    if gone {
                        let message = format!("endpoint {workload} left the config (or its service) while its stream was being opened");
                        break (OutError { message, denied: false }, "endpoint_left");
                    }
                }
            }
        }
    };
    let Some(store) = config.borrow_and_update().clone() else {
        return (Err(error), None);
    };
    let missing = ctx.waypoints.missing;
    let Decision { route: again, .. } =
        route_avoiding(&store, &pod.workload, dst, missing, Some(workload));
    match &again {
        Route::Hbone {
            workload: other, ..
        } if other != workload => {
            debug!(pod = %pod.workload.uid, %peer, %dst, first = %workload, error = %error.message, retry = %other,
                "outbound: stream not opened; trying another endpoint");
            ctx.metrics.outbound_retried(reason);
            let opened = attempt(ctx, pod, peer, &again).await;
            let opened = opened.map_err(|e| OutError {
                message: format!("{} (after: {})", e.message, error.message),
                denied: e.denied,
            });
            (
                opened,
                Some(Rerouted {
                    route: again,
                    store,
                }),
            )
        }
        // The same endpoint, or no other route for the connection: the first error stands.
        _ => (Err(error), None),
    }
}

fn not_hbone(route: &Route) -> OutError {
    OutError {
        message: format!("no HBONE stream for route {route:?}"),
        denied: false,
    }
}

/// Opens the stream for one HBONE route (pooled).
async fn attempt(
    ctx: &Ctx,
    pod: &Arc<Pod>,
    peer: SocketAddr,
    route: &Route,
) -> Result<H2Stream, OutError> {
    let Route::Hbone {
        target,
        hbone,
        identity,
        workload,
        ..
    } = route
    else {
        return Err(not_hbone(route));
    };
    hbone_out(
        ctx,
        pod,
        peer,
        (*target, *hbone),
        identity.clone(),
        workload,
    )
    .await
}

/// Opens the HBONE stream for one outbound connection (pooled).
async fn hbone_out(
    ctx: &Ctx,
    pod: &Arc<Pod>,
    peer: SocketAddr,
    (target, hbone): (SocketAddr, SocketAddr),
    dst_identity: Identity,
    dst_workload: &str,
) -> Result<H2Stream, OutError> {
    let cert = ctx.certs.get(&pod.identity).await.map_err(|e| OutError {
        message: e.to_string(),
        denied: false,
    })?;
    let key = PoolKey {
        source: pod.workload.uid.clone(),
        src_identity: (*pod.identity).clone(),
        dst_identities: vec![dst_identity],
        dst: hbone,
        dst_instance: dst_workload.to_string(),
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
