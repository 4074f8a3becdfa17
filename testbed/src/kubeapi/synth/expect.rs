//! What a correct control plane sends each node, from the generator's own model (not from
//! meshd's code): the scale test compares meshd's streams against it. Part of [`super`].

use std::collections::{BTreeMap, BTreeSet};

use super::render::container_port;
use super::{Phase, ROOT_NAMESPACE, Synth, SynthPod, SynthPolicy, SynthService, TargetPort};

impl Synth {
    /// Workload uids ("ns/name") every node must know: pods not finished, with an address.
    pub fn workloads(&self) -> BTreeSet<String> {
        self.pods
            .values()
            .filter(|p| p.is_workload())
            .map(SynthPod::key)
            .collect()
    }

    /// Whether the pod is enrolled: an ambient namespace and no opt-out label.
    pub fn captured(&self, pod: &SynthPod) -> bool {
        self.namespaces
            .get(&pod.namespace)
            .is_some_and(|n| n.ambient)
            && pod
                .labels
                .get("istio.io/dataplane-mode")
                .map(String::as_str)
                != Some("none")
    }

    /// Namespaces with a pod on `node` that has not finished (with an address or not yet).
    pub fn local_namespaces(&self, node: &str) -> BTreeSet<String> {
        self.pods
            .values()
            .filter(|p| p.node == node && p.phase != Phase::Succeeded)
            .map(|p| p.namespace.clone())
            .collect()
    }

    /// Policy keys `node` needs: those ztunnel enforces of the root namespace and of its local
    /// namespaces.
    pub fn policies_for_node(&self, node: &str) -> BTreeSet<String> {
        let local = self.local_namespaces(node);
        self.policies
            .values()
            .filter(|p| p.namespace == ROOT_NAMESPACE || local.contains(&p.namespace))
            .filter(|p| p.for_ztunnel())
            .map(SynthPolicy::key)
            .collect()
    }

    /// The nodes that must hear of a change to a policy of `namespace`.
    pub fn policy_nodes(&self, namespace: &str) -> BTreeSet<String> {
        if namespace == ROOT_NAMESPACE {
            return self.nodes().into_iter().collect();
        }
        self.pods
            .values()
            .filter(|p| p.namespace == namespace && p.phase != Phase::Succeeded)
            .map(|p| p.node.clone())
            .collect()
    }

    /// A Service's endpoints: workload uid → (service port → pod port).
    pub fn endpoints(&self, svc: &SynthService) -> BTreeMap<String, BTreeMap<u32, u32>> {
        self.pods
            .values()
            .filter(|p| p.namespace == svc.namespace && p.is_workload())
            .filter(|p| svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .map(|p| {
                let ports = svc
                    .ports
                    .iter()
                    .map(|sp| {
                        let target = match &sp.target {
                            TargetPort::Number(n) => *n,
                            TargetPort::Named(name) => container_port(name),
                        };
                        (u32::from(sp.port), u32::from(target))
                    })
                    .collect();
                (p.key(), ports)
            })
            .collect()
    }
}
