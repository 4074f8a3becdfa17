//! The keys of RequestAuthentication `jwksUri`s, fetched through the mesh and cached.
//!
//! Owns resolving a `jwksUri` (`http://<host>[:port]/path`, host = a Service's hostname or
//! `name.namespace[.svc[.cluster.local]]`) to an endpoint of that Service in the config, the
//! HTTP GET over this waypoint's upstream code (HBONE to the pod, as any request), the cache,
//! and refreshing it (Istio's 20 minutes; failures retried with backoff; a failed refresh keeps
//! the last good keys). With no keys for a URI, tokens of its issuer are refused (401) and the
//! failure is logged. Does not verify tokens (`meshcore::policy::jwt`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dataplane::subscription::ConfigRx;
use http_body_util::{BodyExt, Full, Limited};
use meshcore::hbone::{Pool, PoolSettings};
use meshcore::policy::jwt::JwkSet;
use meshcore::policy::{DEFAULT_ROOT_NAMESPACE, PolicySet};
use meshcore::route::resilience::ConnectionPool;
use meshcore::store::ConfigStore;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::balance;
use crate::own_cert::OwnCert;
use crate::routing::{Backend, Router};
use crate::upstream::{Upstream, Version};

/// Istio's default JWKS refresh interval (`PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
const REFRESH: Duration = Duration::from_secs(20 * 60);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A JWKS larger than this is refused.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "jwksUri {0:?} is not http://<host>[:port]/<path> (https is not fetched: the mesh \
         already encrypts the hop)"
    )]
    BadUri(String),
    #[error("no Service named {0:?} in this waypoint's config")]
    NoService(String),
    #[error("Service {service} has no port {port}")]
    NoPort { service: String, port: u16 },
    #[error("Service {0} has no endpoint")]
    NoEndpoint(String),
    #[error("{0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("reading the body: {0}")]
    Body(String),
    #[error("not a JWKS: {0}")]
    Json(#[from] serde_json::Error),
}

enum Entry {
    Keys(Arc<JwkSet>),
    Failed(String),
}

/// The cache, shared by the request path (read, sync) and the refresh task.
pub struct Jwks {
    cache: Arc<Mutex<HashMap<String, Entry>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Jwks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Jwks {
    /// Starts the refresh task (needs a tokio runtime). It fetches with its own upstream pools
    /// (same code and identity as requests), so a JWKS fetch never waits behind traffic limits.
    pub fn start(config: ConfigRx, cert: OwnCert, kernel_tls: bool) -> Jwks {
        let cache = Arc::new(Mutex::new(HashMap::new()));
        let upstream = Upstream::new(
            Pool::new(PoolSettings {
                max_streams_per_conn: 200,
                kernel_tls,
                ..PoolSettings::default()
            }),
            cert,
        );
        let task = tokio::spawn(refresh(config, upstream, cache.clone()));
        Jwks { cache, task }
    }

    /// The keys of `uri`, or why there are none.
    pub fn get(&self, uri: &str) -> Result<Arc<JwkSet>, String> {
        match self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uri)
        {
            Some(Entry::Keys(k)) => Ok(k.clone()),
            Some(Entry::Failed(e)) => Err(e.clone()),
            None => Err("not fetched yet".into()),
        }
    }
}

async fn refresh(
    mut config: ConfigRx,
    upstream: Upstream,
    cache: Arc<Mutex<HashMap<String, Entry>>>,
) {
    // Per URI: when to fetch next, and consecutive failures (for the backoff).
    let mut due: HashMap<String, (Instant, u32)> = HashMap::new();
    loop {
        let store = config.borrow_and_update().clone();
        let wanted: BTreeSet<String> = store
            .as_deref()
            .map(|s| {
                PolicySet::compile(s.policies().map(|p| &**p), DEFAULT_ROOT_NAMESPACE).jwks_uris()
            })
            .unwrap_or_default();
        due.retain(|u, _| wanted.contains(u));
        cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|u, _| wanted.contains(u));
        let now = Instant::now();
        for uri in &wanted {
            let (at, failures) = *due.entry(uri.clone()).or_insert((now, 0));
            if at > now {
                continue;
            }
            let Some(store) = store.as_deref() else { break };
            let result = fetch(&upstream, store, uri).await;
            let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
            let next = match result {
                Ok(keys) => {
                    info!(%uri, keys = keys.keys.len(), "JWKS fetched");
                    c.insert(uri.clone(), Entry::Keys(Arc::new(keys)));
                    (Instant::now() + REFRESH, 0)
                }
                Err(e) => {
                    let backoff = Duration::from_secs(1 << failures.min(5)).min(MAX_BACKOFF);
                    match c.get(uri) {
                        Some(Entry::Keys(_)) => {
                            warn!(%uri, error = %e, retry_in = ?backoff, "JWKS refresh failed; keeping the last keys")
                        }
                        _ => {
                            warn!(%uri, error = %e, retry_in = ?backoff, "JWKS fetch failed: tokens of its issuer are refused (401)");
                            c.insert(uri.clone(), Entry::Failed(e.to_string()));
                        }
                    }
                    (Instant::now() + backoff, failures + 1)
                }
            };
            due.insert(uri.clone(), next);
        }
        let next = due.values().map(|(at, _)| *at).min();
        tokio::select! {
            changed = config.changed() => {
                if changed.is_err() {
                    return;
                }
                // A failure may have been the config's (the Service not there yet): retry now.
                let now = Instant::now();
                for (at, failures) in due.values_mut() {
                    if *failures > 0 {
                        *at = now;
                    }
                }
            }
            _ = sleep_until(next) => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `http://host[:port]/path` → (host, port, path-and-query).
fn split_uri(uri: &str) -> Option<(String, u16, String)> {
    let u: http::Uri = uri.parse().ok()?;
    if u.scheme_str() != Some("http") {
        return None;
    }
    let host = u.host()?.to_ascii_lowercase();
    let path = u.path_and_query().map_or("/", |p| p.as_str()).to_string();
    Some((host, u.port_u16().unwrap_or(80), path))
}

/// The Service `host` names: its hostname, or `name.namespace[.svc[.<domain>]]`.
fn service_for<'a>(
    store: &'a ConfigStore,
    host: &str,
) -> Option<&'a meshcore::proto::config::Service> {
    let host = host.trim_end_matches('.');
    store
        .services()
        .find(|s| {
            s.hostname == host || {
                let short = format!("{}.{}", s.name, s.namespace);
                host == short || host == format!("{short}.svc")
            }
        })
        .map(|s| &**s)
}

async fn fetch(upstream: &Upstream, store: &ConfigStore, uri: &str) -> Result<JwkSet, FetchError> {
    let (host, port, path) = split_uri(uri).ok_or_else(|| FetchError::BadUri(uri.to_string()))?;
    let svc = service_for(store, &host).ok_or_else(|| FetchError::NoService(host.clone()))?;
    if !svc.ports.iter().any(|p| p.port == u32::from(port)) {
        return Err(FetchError::NoPort {
            service: svc.key.clone(),
            port,
        });
    }
    let backend = Backend::Service {
        service: svc.key.as_str().into(),
        port,
        subset: None,
    };
    let endpoints = balance::endpoints(store, &Router::default(), &backend);
    // Any endpoint will do; spread fetches a little.
    let ep = endpoints
        .get(rand::random_range(0..endpoints.len().max(1)))
        .ok_or_else(|| FetchError::NoEndpoint(svc.key.clone()))?;
    let req = http::Request::get(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::ACCEPT, "application/json")
        .body(
            Full::new(Bytes::new())
                .map_err(|n: std::convert::Infallible| match n {})
                .boxed(),
        )
        .map_err(|_| FetchError::BadUri(uri.to_string()))?;
    let exchange = async {
        let resp = upstream
            .send(ep, Version::Http1, req, &ConnectionPool::default())
            .await?;
        if resp.status() != http::StatusCode::OK {
            return Err(FetchError::Status(resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| FetchError::Body(e.to_string()))?
            .to_bytes();
        Ok(serde_json::from_slice::<JwkSet>(&body)?)
    };
    tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| FetchError::Timeout(FETCH_TIMEOUT))?
}
