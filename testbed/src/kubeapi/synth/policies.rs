//! The generator's policies (AuthorizationPolicies and PeerAuthentications of the root and the
//! team namespaces), routes, DestinationRules and waypoint Gateways. Part of [`super`].

use serde_json::{Value, json};

use super::{APPS, ROOT_NAMESPACE, Synth, SynthPolicy, SynthService};

impl Synth {
    pub(super) fn make_policies(&mut self) {
        let n = self.size.policies;
        let root = [
            (
                "PeerAuthentication",
                "default",
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            (
                "AuthorizationPolicy",
                "deny-quarantined",
                json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["quarantine"]}}]}]}),
            ),
            (
                "AuthorizationPolicy",
                "allow-monitoring",
                json!({"selector": {"matchLabels": {"app": "prometheus"}},
                       "rules": [{"from": [{"source": {"namespaces": ["monitoring"]}}]}]}),
            ),
        ];
        for (kind, name, spec) in root.into_iter().take(n) {
            self.insert_policy(kind, ROOT_NAMESPACE, name, spec);
        }
        let namespaces = self.team_namespaces();
        let mut i = 0;
        while self.policies.len() < n {
            let ns = namespaces[self.rng.skewed(namespaces.len())].clone();
            let (kind, name, spec) = self.policy_spec(&ns, i);
            self.insert_policy(kind, &ns, &name, spec);
            i += 1;
        }
    }

    pub(super) fn insert_policy(
        &mut self,
        kind: &'static str,
        namespace: &str,
        name: &str,
        spec: Value,
    ) {
        let p = SynthPolicy {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            spec,
        };
        self.policies.insert(p.key(), p);
    }

    /// The `i`th policy of namespace `ns`: a mix of what teams write.
    fn policy_spec(&mut self, ns: &str, i: usize) -> (&'static str, String, Value) {
        let apps: Vec<String> = self
            .deployments
            .iter()
            .filter(|d| d.namespace == ns)
            .map(|d| d.name.clone())
            .collect();
        let app = match apps.len() {
            0 => "none".to_string(),
            n => apps[self.rng.below(n)].clone(),
        };
        let other = self.team_namespaces();
        let peer_ns = other[self.rng.below(other.len())].clone();
        let caller = format!("cluster.local/ns/{peer_ns}/sa/{}", APPS[i % APPS.len()]);
        let waypoint = self.namespaces.get(ns).is_some_and(|n| n.waypoint);
        match self.rng.below(20) {
            0 | 1 => (
                "PeerAuthentication",
                format!("mtls-{i}"),
                json!({"selector": {"matchLabels": {"app": app}},
                       "mtls": {"mode": "STRICT"},
                       "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}),
            ),
            2 if waypoint => (
                "AuthorizationPolicy",
                format!("l7-{i}"),
                json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                       "rules": [{"from": [{"source": {"principals": [caller]}}],
                                  "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}]}]}),
            ),
            3..=5 => (
                "AuthorizationPolicy",
                format!("deny-{i}"),
                json!({"selector": {"matchLabels": {"app": app}}, "action": "DENY",
                       "rules": [{"from": [{"source": {"notNamespaces": [ns, peer_ns]}}],
                                  "to": [{"operation": {"ports": ["9090"]}}]}]}),
            ),
            6..=9 => (
                "AuthorizationPolicy",
                format!("ns-{i}"),
                json!({"rules": [{"from": [{"source": {"namespaces": [ns, peer_ns, ROOT_NAMESPACE]}}]}]}),
            ),
            _ => (
                "AuthorizationPolicy",
                format!("allow-{i}"),
                json!({"selector": {"matchLabels": {"app": app}},
                       "rules": [{"from": [{"source": {"principals": [caller]}}],
                                  "to": [{"operation": {"ports": ["8080"]}}]}]}),
            ),
        }
    }

    pub(super) fn make_others(&mut self) {
        for ns in self.namespaces.values().filter(|n| n.waypoint) {
            self.others.push(json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": ns.name,
                             "labels": {"istio.io/waypoint-for": "service"}},
                "spec": {"gatewayClassName": "istio-waypoint",
                         "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
            }));
        }
        let services: Vec<SynthService> = self.services.values().cloned().collect();
        for (i, s) in services.iter().enumerate() {
            let host = format!("{}.{}.svc.cluster.local", s.name, s.namespace);
            let meta = |suffix: &str| json!({"name": format!("{}-{suffix}", s.name), "namespace": s.namespace});
            match i % 50 {
                7 => self.others.push(json!({
                    "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                    "metadata": meta("vs"),
                    "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host}}],
                             "retries": {"attempts": 3, "perTryTimeout": "2s"}, "timeout": "10s"}]}
                })),
                17 => self.others.push(json!({
                    "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                    "metadata": meta("dr"),
                    "spec": {"host": host, "trafficPolicy": {"connectionPool": {"http": {"http2MaxRequests": 100}},
                             "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s", "baseEjectionTime": "30s"}}}
                })),
                27 => self.others.push(json!({
                    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                    "metadata": meta("route"),
                    "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": s.name, "port": 80}],
                             "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                                        "backendRefs": [{"name": s.name, "port": 80}]}]}
                })),
                _ => {}
            }
        }
    }
}
