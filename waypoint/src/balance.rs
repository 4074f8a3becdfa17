//! Choosing the endpoint a request or connection goes to, and whether it may go at all.
//!
//! Owns listing a backend's endpoints from the config (a subset filters them by its labels)
//! and the choice among them with the destination's load-balancing policy
//! (`meshcore::route::lb`: least request by default), fed with the requests this waypoint has
//! in flight to each endpoint, leaving out endpoints outlier detection ejected (`outlier`) and
//! those a retry already tried; admission under the destination's request and retry limits
//! (`circuit`). Does not connect anywhere.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use meshcore::Identity;
use meshcore::route::DestinationPolicy;
use meshcore::route::lb::{self, EndpointView, HashRequest, LbPolicy};
use meshcore::store::{ConfigStore, workload_identity};

use crate::circuit::{Admitted, Circuits};
use crate::outlier::{Detector, Usable};
use crate::routing::{Backend, Router};

/// One place a request can go.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `<pod ip>:<target port>` (the CONNECT authority), or the plain backend address.
    pub addr: SocketAddr,
    /// How to reach it.
    pub transport: Transport,
    /// The destination it was listed for: its connection-pool limits count there.
    pub destination: Backend,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// HBONE to `<pod ip>:15008`, expecting the pod's identity.
    Hbone { identity: Identity },
    /// Plain TCP (the plain-HTTP listener's backend).
    Plain,
}

/// The HBONE port of every mesh pod.
pub const HBONE_PORT: u16 = 15008;

/// The endpoints `backend` has now.
pub fn endpoints(store: &ConfigStore, router: &Router, backend: &Backend) -> Vec<Endpoint> {
    match backend {
        Backend::Address(a) => vec![Endpoint {
            addr: *a,
            transport: Transport::Plain,
            destination: backend.clone(),
        }],
        Backend::Workload { uid, port } => store
            .workload(uid)
            .and_then(|w| Some((first_ip(&w.ips)?, workload_identity(w))))
            .map(|(ip, identity)| Endpoint {
                addr: SocketAddr::new(ip, *port),
                transport: Transport::Hbone { identity },
                destination: backend.clone(),
            })
            .into_iter()
            .collect(),
        Backend::Service {
            service,
            port,
            subset,
        } => {
            let Some(svc) = store.service(service) else {
                return Vec::new();
            };
            let Some(sp) = svc.ports.iter().find(|p| p.port == u32::from(*port)) else {
                return Vec::new();
            };
            let labels: Option<&BTreeMap<String, String>> = match subset {
                Some(s) => match router.subset_labels(service, s) {
                    Some(l) => Some(l),
                    // An unknown subset selects nothing (meshd rejects such routes first).
                    None => return Vec::new(),
                },
                None => None,
            };
            svc.endpoints
                .iter()
                .filter_map(|ep| {
                    let w = store.workload(&ep.workload_uid)?;
                    if let Some(labels) = labels
                        && !labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    {
                        return None;
                    }
                    let target = ep
                        .ports
                        .get(&sp.port)
                        .copied()
                        .unwrap_or(match sp.target_port {
                            0 => sp.port,
                            t => t,
                        });
                    let target = u16::try_from(target).ok()?;
                    Some(Endpoint {
                        addr: SocketAddr::new(first_ip(&w.ips)?, target),
                        transport: Transport::Hbone {
                            identity: workload_identity(w),
                        },
                        destination: backend.clone(),
                    })
                })
                .collect()
        }
    }
}

fn first_ip(ips: &[String]) -> Option<IpAddr> {
    ips.iter().find_map(|s| s.parse().ok())
}

/// Requests in flight per endpoint, one `meshcore::route::lb::Balancer` per destination
/// (its round-robin position and hash ring live there), the destinations' circuit breakers
/// and outlier detectors.
pub struct Balancer {
    active: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    per_destination: Mutex<HashMap<Backend, Arc<lb::Balancer>>>,
    circuits: Circuits,
    outliers: Mutex<HashMap<Backend, Detector>>,
    /// Time as outlier detection sees it; tests move it by hand.
    clock: Arc<dyn Fn() -> Instant + Send + Sync>,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer::with_clock(Arc::new(Instant::now))
    }
}

/// One request in flight to an endpoint, until dropped.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The endpoint chosen for a request.
pub struct Picked {
    pub endpoint: Endpoint,
    pub in_flight: InFlight,
    /// A consistent-hash cookie to set on the response (`Set-Cookie` value).
    pub set_cookie: Option<String>,
}

impl Balancer {
    /// A balancer whose outlier detection reads the time from `clock`.
    pub fn with_clock(clock: Arc<dyn Fn() -> Instant + Send + Sync>) -> Balancer {
        Balancer {
            active: Mutex::default(),
            per_destination: Mutex::default(),
            circuits: Circuits::default(),
            outliers: Mutex::default(),
            clock,
        }
    }

    fn counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        let mut m = self.active.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(addr).or_default().clone()
    }

    /// Chooses among `endpoints` of `backend` with its DestinationRule's policy (least request
    /// by default), over the requests in flight from this waypoint, leaving out ejected
    /// endpoints (all are candidates in panic) and those in `exclude` (unless no other is
    /// left). `None`: no endpoint, or all ejected ("no healthy upstream").
    pub fn pick(
        &self,
        router: &Router,
        backend: &Backend,
        endpoints: &[Endpoint],
        request: &HashRequest<'_>,
        exclude: &[SocketAddr],
    ) -> Option<Picked> {
        let destination = router.destination_policy(backend);
        let candidates = self.candidates(&destination, backend, endpoints, exclude);
        let endpoints: Vec<&Endpoint> = candidates.iter().map(|i| &endpoints[*i]).collect();
        let policy = match backend {
            Backend::Service {
                service,
                port,
                subset,
            } => router.lb_policy(service, *port, subset.as_deref()),
            _ => LbPolicy::LeastRequest,
        };
        let mut rng = rand::rng();
        let hash = policy.hash_key(request, &mut rng);
        let keys: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
        let counters: Vec<Arc<AtomicUsize>> =
            endpoints.iter().map(|e| self.counter(e.addr)).collect();
        let views: Vec<EndpointView<'_>> = keys
            .iter()
            .zip(&counters)
            .map(|(key, c)| EndpointView {
                key,
                active: u32::try_from(c.load(Ordering::Acquire)).unwrap_or(u32::MAX),
            })
            .collect();
        let balancer = {
            let mut m = self
                .per_destination
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            m.entry(backend.clone()).or_default().clone()
        };
        let i = balancer.pick(&policy, &views, hash.key, &mut rng)?;
        let c = counters.get(i)?.clone();
        c.fetch_add(1, Ordering::AcqRel);
        Some(Picked {
            endpoint: (*endpoints.get(i)?).clone(),
            in_flight: InFlight(c),
            set_cookie: hash.set_cookie,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            transport: Transport::Plain,
            destination: backend(),
        }
    }

    fn backend() -> Backend {
        Backend::Service {
            service: "app/web".into(),
            port: 80,
            subset: None,
        }
    }

    fn ejecting(min_health_percent: u32) -> DestinationPolicy {
        DestinationPolicy {
            outlier: Some(meshcore::route::resilience::OutlierDetection {
                consecutive_5xx: 1,
                max_ejection_percent: 100,
                min_health_percent,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A balancer whose clock stands still.
    fn still() -> Balancer {
        let t0 = Instant::now();
        Balancer::with_clock(Arc::new(move || t0))
    }

    #[test]
    fn ejected_endpoints_are_left_out_and_none_left_is_no_healthy_upstream() {
        let b = still();
        let p = ejecting(0);
        let eps = [ep(1), ep(2), ep(3)];
        assert_eq!(b.candidates(&p, &backend(), &eps, &[]), [0, 1, 2]);
        b.report(&backend(), &p, eps[1].addr, Outcome::Status(500));
        assert_eq!(b.candidates(&p, &backend(), &eps, &[]), [0, 2]);
        b.report(&backend(), &p, eps[0].addr, Outcome::ConnectFailure);
        b.report(&backend(), &p, eps[2].addr, Outcome::Status(503));
        assert!(b.candidates(&p, &backend(), &eps, &[]).is_empty());
        // Without outlier detection nothing is ejected (and the old ejections are forgotten).
        let none = DestinationPolicy::default();
        assert_eq!(b.candidates(&none, &backend(), &eps, &[]), [0, 1, 2]);
        assert_eq!(b.candidates(&p, &backend(), &eps, &[]), [0, 1, 2]);
    }

    #[test]
    fn in_panic_ejected_endpoints_are_used_again() {
        let b = still();
        let p = ejecting(50);
        let eps = [ep(1), ep(2)];
        b.report(&backend(), &p, eps[0].addr, Outcome::Status(500));
        assert_eq!(b.candidates(&p, &backend(), &eps, &[]), [1]);
        b.report(&backend(), &p, eps[1].addr, Outcome::Status(500));
        assert_eq!(b.candidates(&p, &backend(), &eps, &[]), [0, 1]);
    }

    #[test]
    fn excluded_endpoints_are_avoided_while_another_is_left() {
        let b = still();
        let p = ejecting(0);
        let eps = [ep(1), ep(2), ep(3)];
        let tried = [eps[0].addr];
        assert_eq!(b.candidates(&p, &backend(), &eps, &tried), [1, 2]);
        let tried = [eps[0].addr, eps[2].addr];
        assert_eq!(b.candidates(&p, &backend(), &eps, &tried), [1]);
        // Ejected and excluded together leave nothing: fall back to the excluded, not the
        // ejected.
        b.report(&backend(), &p, eps[1].addr, Outcome::Status(500));
        assert_eq!(b.candidates(&p, &backend(), &eps, &tried), [0, 2]);
        // pick itself honours exclude.
        let router = Router::default();
        let headers = http::HeaderMap::new();
        let req = HashRequest {
            headers: &headers,
            path_and_query: "/",
            source_ip: None,
        };
        for _ in 0..20 {
            let p = b
                .pick(&router, &backend(), &eps[..2], &req, &[eps[0].addr])
                .unwrap();
            assert_eq!(p.endpoint.addr, eps[1].addr);
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let b = Balancer::default();
        let router = Router::default();
        let backend = Backend::Address(SocketAddr::from(([10, 0, 0, 1], 1)));
        let headers = http::HeaderMap::new();
        let req = HashRequest {
            headers: &headers,
            path_and_query: "/",
            source_ip: None,
        };
        let eps = [ep(1), ep(2)];
        // Endpoint 1 is busy: every later pick goes to 2.
        let busy = b.pick(&router, &backend, &eps[..1], &req, &[]).unwrap();
        assert_eq!(busy.endpoint.addr.port(), 1);
        for _ in 0..50 {
            let p = b.pick(&router, &backend, &eps, &req, &[]).unwrap();
            assert_eq!(p.endpoint.addr.port(), 2);
        }
        assert!(b.pick(&router, &backend, &[], &req, &[]).is_none());
    }
}

/// How one attempt to an endpoint ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// The connection could not be made (local-origin failure).
    ConnectFailure,
    /// The connection ended before a complete response.
    Reset,
    /// The attempt's timeout expired.
    Timeout,
}

/// A connection-pool limit overflowed: answer 503 `UO` with `x-envoy-overloaded`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow;

/// What is being admitted against a destination's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// A request (`http2MaxRequests`).
    Request,
    /// A retry (`maxRetries`).
    Retry,
}

/// Holds one request's (or retry's) place under a destination's limits until dropped.
pub struct Permit(#[allow(dead_code)] Admitted);

impl Balancer {
    /// Counts `what` against `backend`'s connection-pool limits (`http2MaxRequests` for a
    /// request, `maxRetries` for a retry); `Err` when that many are in flight already.
    pub fn admit(
        &self,
        backend: &Backend,
        policy: &DestinationPolicy,
        what: Admit,
    ) -> Result<Permit, Overflow> {
        self.circuits.admit(backend, &policy.pool, what).map(Permit)
    }

    /// Feeds outlier detection with how an attempt to `endpoint` of `backend` ended.
    pub fn report(
        &self,
        backend: &Backend,
        policy: &DestinationPolicy,
        endpoint: SocketAddr,
        outcome: Outcome,
    ) {
        let Some(config) = &policy.outlier else {
            return;
        };
        let now = (self.clock)();
        let mut m = self.outliers.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(backend.clone())
            .or_insert_with(|| Detector::new(now, config))
            .report(now, config, endpoint, outcome);
    }

    /// Indices into `endpoints` a pick may choose from: not ejected (unless in panic), and not
    /// excluded unless nothing else is left.
    fn candidates(
        &self,
        policy: &DestinationPolicy,
        backend: &Backend,
        endpoints: &[Endpoint],
        exclude: &[SocketAddr],
    ) -> Vec<usize> {
        let all = 0..endpoints.len();
        let usable: Vec<usize> = match &policy.outlier {
            None => {
                // No detection (any more): forget what an earlier config ejected.
                let mut m = self.outliers.lock().unwrap_or_else(|p| p.into_inner());
                if !m.is_empty() {
                    m.remove(backend);
                }
                all.collect()
            }
            Some(config) => {
                let now = (self.clock)();
                let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
                let mut m = self.outliers.lock().unwrap_or_else(|p| p.into_inner());
                let detector = m
                    .entry(backend.clone())
                    .or_insert_with(|| Detector::new(now, config));
                match detector.usable(now, config, &addrs) {
                    Usable::Panic => all.collect(),
                    Usable::Healthy(h) => all.filter(|i| h[*i]).collect(),
                }
            }
        };
        if exclude.is_empty() {
            return usable;
        }
        let fresh: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|i| !exclude.contains(&endpoints[*i].addr))
            .collect();
        if fresh.is_empty() { usable } else { fresh }
    }

    /// Circuit-breaker counts and ejections per destination, for `/config_dump`.
    pub fn dump(&self, router: &Router) -> serde_json::Value {
        let now = (self.clock)();
        let mut m = self.outliers.lock().unwrap_or_else(|p| p.into_inner());
        let outliers: Vec<serde_json::Value> = m
            .iter_mut()
            .filter_map(|(b, d)| {
                let policy = router.destination_policy(b);
                let mut v = d.dump(now, policy.outlier.as_ref()?);
                v["destination"] = format!("{b:?}").into();
                Some(v)
            })
            .collect();
        serde_json::json!({
            "inFlight": self.circuits.dump(),
            "outlierDetection": outliers,
        })
    }
}
