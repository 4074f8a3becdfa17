//! The waypoint's background tasks, each following the config: its own certificate (fetched
//! once the trust domain is known, renewed when the trust bundle changes), the route table
//! (recompiled when routes or services change), and pruning pooled upstream connections to
//! endpoints that left. Owns none of the state it updates.

use std::sync::Arc;
use std::time::Duration;

use dataplane::subscription::ConfigRx;
use tokio::sync::watch;
use tracing::info;

use crate::app::Ctx;
use crate::own_cert::OwnCert;
use crate::routing::Router;

/// Starts fetching our certificate as soon as the first config names the trust domain, and
/// fetches it again when the trust bundle changes (a root added or retired: the new
/// certificate carries the new roots), as ztunnel does.
pub async fn prefetch(mut config: ConfigRx, cert: OwnCert) {
    let OwnCert::Managed { manager, .. } = &cert else {
        return std::future::pending().await;
    };
    let mut last_id = None;
    let mut last_roots: Option<Vec<String>> = None;
    loop {
        let roots = config
            .borrow_and_update()
            .as_ref()
            .and_then(|s| s.trust_bundle().map(|t| t.roots_pem.clone()));
        if let Some(id) = cert.identity()
            && last_id.as_ref() != Some(&id)
        {
            manager.prefetch(&id);
            last_id = Some(id);
        }
        if roots.is_some() && last_roots.is_some() && roots != last_roots {
            info!("trust bundle changed; renewing the waypoint's certificate");
            manager.refresh_all();
        }
        if roots.is_some() {
            last_roots = roots;
        }
        if config.changed().await.is_err() {
            // The subscription is gone (the supervisor reports that); nothing more to learn.
            return std::future::pending().await;
        }
    }
}

/// Recompiles the routes when the config's route resources change (its route generation) or
/// its services do (hosts and ports the routes refer to); otherwise the table in force stays.
pub async fn routes(mut config: ConfigRx, tx: watch::Sender<Router>) {
    let mut compiled: Option<(u64, u64)> = None;
    loop {
        let store = config.borrow_and_update().clone();
        if let Some(store) = store {
            let now = (store.route_generation, services_fingerprint(&store));
            if compiled != Some(now) {
                tx.send_replace(Router::compile(&store));
                compiled = Some(now);
            }
        }
        if config.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Changes whenever a Service's key, hostname or ports change (not its endpoints).
fn services_fingerprint(store: &meshcore::store::ConfigStore) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut items: Vec<_> = store
        .services()
        .map(|s| {
            let ports: Vec<_> = s
                .ports
                .iter()
                .map(|p| (p.port, &p.name, &p.app_protocol))
                .collect();
            (&s.key, &s.hostname, ports)
        })
        .collect();
    items.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    items.hash(&mut h);
    h.finish()
}

/// Every so often, drops pooled upstream connections to endpoints no longer in the config
/// (pods come and go; their connections would otherwise stay open forever).
pub async fn prune_upstreams(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let Some(store) = ctx.config.borrow().clone() else {
            continue;
        };
        let live: std::collections::HashSet<std::net::IpAddr> = store
            .workloads()
            .flat_map(|w| w.ips.iter().filter_map(|ip| ip.parse().ok()))
            .map(meshcore::store::canonical)
            .collect();
        let plain = ctx.plain_backend;
        ctx.upstream.retain(|addr| {
            Some(*addr) == plain || live.contains(&meshcore::store::canonical(addr.ip()))
        });
    }
}
