//! Choosing the endpoint a request or connection goes to.
//!
//! Owns listing a backend's endpoints from the config (a subset filters them by its labels)
//! and the load balancer: least request by power of two choices (Istio's default), over the
//! requests this waypoint has in flight to each endpoint. Does not connect anywhere.
//! `meshcore::route`'s balancers replace [`Balancer::pick`]'s policy when they land.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use meshcore::Identity;
use meshcore::store::{ConfigStore, workload_identity};
use rand::Rng;

use crate::routing::{Backend, Router};

/// One place a request can go.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `<pod ip>:<target port>` (the CONNECT authority), or the plain backend address.
    pub addr: SocketAddr,
    /// How to reach it.
    pub transport: Transport,
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
        }],
        Backend::Workload { uid, port } => store
            .workload(uid)
            .and_then(|w| Some((first_ip(&w.ips)?, workload_identity(w))))
            .map(|(ip, identity)| Endpoint {
                addr: SocketAddr::new(ip, *port),
                transport: Transport::Hbone { identity },
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
                    })
                })
                .collect()
        }
    }
}

fn first_ip(ips: &[String]) -> Option<IpAddr> {
    ips.iter().find_map(|s| s.parse().ok())
}

/// Requests in flight per endpoint, and the choice among endpoints.
#[derive(Default)]
pub struct Balancer {
    active: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

/// One request in flight to an endpoint, until dropped.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Balancer {
    fn counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        let mut m = self.active.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(addr).or_default().clone()
    }

    /// Least request, power of two choices: of two endpoints drawn at random, the one with
    /// fewer requests in flight. `None` when there is no endpoint.
    pub fn pick(&self, endpoints: &[Endpoint]) -> Option<(Endpoint, InFlight)> {
        let chosen = match endpoints.len() {
            0 => return None,
            1 => &endpoints[0],
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let b = (a + rng.random_range(1..n)) % n;
                let load = |i: usize| self.counter(endpoints[i].addr).load(Ordering::Acquire);
                if load(b) < load(a) {
                    &endpoints[b]
                } else {
                    &endpoints[a]
                }
            }
        };
        let c = self.counter(chosen.addr);
        c.fetch_add(1, Ordering::AcqRel);
        Some((chosen.clone(), InFlight(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            transport: Transport::Plain,
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let b = Balancer::default();
        let eps = [ep(1), ep(2)];
        // Endpoint 1 is busy: every later pick goes to 2.
        let (first, _busy) = b.pick(&eps[..1]).unwrap();
        assert_eq!(first.addr.port(), 1);
        for _ in 0..50 {
            let (e, _g) = b.pick(&eps).unwrap();
            assert_eq!(e.addr.port(), 2);
        }
        assert!(b.pick(&[]).is_none());
    }
}
