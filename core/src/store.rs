//! The data plane's copy of the config stream, indexed for the lookups a proxy makes per
//! connection (by pod IP, by Service VIP).
//!
//! Owns applying snapshots and deltas in order. Does not talk gRPC (the subscriber does) and
//! holds no policy logic.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::identity::Identity;
use crate::proto::config::{ConfigUpdate, Policy, RouteResource, Service, TrustBundle, Workload};

/// Everything a node currently knows about the mesh.
#[derive(Default, Debug, Clone)]
pub struct ConfigStore {
    pub version: u64,
    /// Bumped whenever the set of policies changes, so consumers recompile only then.
    pub policy_generation: u64,
    /// Bumped whenever the set of L7 route resources changes (waypoints recompile then).
    pub route_generation: u64,
    workloads: HashMap<String, Arc<Workload>>,
    services: HashMap<String, Arc<Service>>,
    policies: HashMap<String, Arc<Policy>>,
    routes: HashMap<String, Arc<RouteResource>>,
    trust_bundle: Option<TrustBundle>,
    workload_by_ip: HashMap<IpAddr, String>,
    service_by_vip: HashMap<IpAddr, String>,
}

impl ConfigStore {
    /// Applies one update from the stream. A snapshot replaces everything.
    pub fn apply(&mut self, update: ConfigUpdate) {
        if update.snapshot || !update.policies.is_empty() || !update.removed_policies.is_empty() {
            self.policy_generation += 1;
        }
        if update.snapshot || !update.routes.is_empty() || !update.removed_routes.is_empty() {
            self.route_generation += 1;
        }
        if update.snapshot {
            self.workloads.clear();
            self.services.clear();
            self.policies.clear();
            self.routes.clear();
        }
        self.version = update.version;
        for uid in update.removed_workloads {
            self.workloads.remove(&uid);
        }
        for key in update.removed_services {
            self.services.remove(&key);
        }
        for key in update.removed_policies {
            self.policies.remove(&key);
        }
        for key in update.removed_routes {
            self.routes.remove(&key);
        }
        for w in update.workloads {
            self.workloads.insert(w.uid.clone(), Arc::new(w));
        }
        for s in update.services {
            self.services.insert(s.key.clone(), Arc::new(s));
        }
        for p in update.policies {
            self.policies.insert(p.key.clone(), Arc::new(p));
        }
        for r in update.routes {
            self.routes.insert(r.key.clone(), Arc::new(r));
        }
        if let Some(tb) = update.trust_bundle {
            self.trust_bundle = Some(tb);
        }
        self.reindex();
    }

    fn reindex(&mut self) {
        self.workload_by_ip.clear();
        for (uid, w) in &self.workloads {
            // Indexed as looked up: a v4-mapped listing names the IPv4 address.
            for ip in w.ips.iter().filter_map(|s| s.parse::<IpAddr>().ok()) {
                self.workload_by_ip.insert(canonical(ip), uid.clone());
            }
        }
        self.service_by_vip.clear();
        for (key, s) in &self.services {
            for ip in s.vips.iter().filter_map(|s| s.parse::<IpAddr>().ok()) {
                self.service_by_vip.insert(canonical(ip), key.clone());
            }
        }
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip
            .get(&canonical(ip))
            .and_then(|uid| self.workloads.get(uid))
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip
            .get(&canonical(ip))
            .and_then(|k| self.services.get(k))
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// L7 route resources (VirtualService, DestinationRule, HTTPRoute, GRPCRoute), waypoints only.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<RouteResource>> {
        self.routes.values()
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.values()
    }

    /// Workloads scheduled on `node`.
    pub fn local_workloads<'a>(
        &'a self,
        node: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Workload>> + 'a {
        self.workloads.values().filter(move |w| w.node == node)
    }

    pub fn trust_bundle(&self) -> Option<&TrustBundle> {
        self.trust_bundle.as_ref()
    }
}

/// A v4-mapped IPv6 address names the same pod as its IPv4 form.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The SPIFFE identity a workload runs as.
pub fn workload_identity(w: &Workload) -> Identity {
    Identity::new(&w.trust_domain, &w.namespace, &w.service_account)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(uid: &str, ip: &str) -> Workload {
        Workload {
            uid: uid.into(),
            ips: vec![ip.into()],
            ..Default::default()
        }
    }

    #[test]
    fn snapshot_replaces_and_delta_edits() {
        let mut s = ConfigStore::default();
        s.apply(ConfigUpdate {
            snapshot: true,
            workloads: vec![wl("a/x", "10.0.0.1")],
            ..Default::default()
        });
        assert!(s.workload_by_ip("10.0.0.1".parse().unwrap()).is_some());
        assert!(
            s.workload_by_ip("::ffff:10.0.0.1".parse().unwrap())
                .is_some()
        );
        s.apply(ConfigUpdate {
            workloads: vec![wl("a/y", "10.0.0.2")],
            removed_workloads: vec!["a/x".into()],
            ..Default::default()
        });
        assert!(s.workload_by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert_eq!(
            s.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap().uid,
            "a/y"
        );
        s.apply(ConfigUpdate {
            snapshot: true,
            ..Default::default()
        });
        assert_eq!(s.workloads().count(), 0);
    }

    /// Found by the config_stream fuzz target: an address listed in v4-mapped form was indexed
    /// under that form while lookups canonicalise, so the pod or VIP was never found.
    #[test]
    fn v4_mapped_listings_are_found_by_either_form() {
        let mut s = ConfigStore::default();
        s.apply(ConfigUpdate {
            snapshot: true,
            workloads: vec![wl("a/x", "::ffff:10.0.0.1")],
            services: vec![Service {
                key: "a/svc".into(),
                vips: vec!["::ffff:10.96.0.1".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        for ip in ["10.0.0.1", "::ffff:10.0.0.1"] {
            assert_eq!(s.workload_by_ip(ip.parse().unwrap()).unwrap().uid, "a/x");
        }
        for ip in ["10.96.0.1", "::ffff:10.96.0.1"] {
            assert_eq!(s.service_by_vip(ip.parse().unwrap()).unwrap().key, "a/svc");
        }
    }
}
