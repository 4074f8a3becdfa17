//! A synthetic cluster for scale tests and the control-plane bench: seeded and deterministic
//! (same size and seed, same objects), sized by pod/Service/policy/node counts.
//!
//! What it makes, as a real cluster holds it: namespaces (most ambient, a few with a waypoint),
//! Deployments' pods with realistic metadata (ReplicaSet owner, pod-template-hash, generateName,
//! a managedFields block), spread over N nodes with per-node dual-stack pod IPs (a few Pending
//! without an address, a few Succeeded Job pods), Services with selectors and 1–2 ports
//! (numeric and named target ports, a few headless), AuthorizationPolicies (namespace-wide,
//! selector, DENY, L7 attached to a waypoint), PeerAuthentications, some routes and
//! DestinationRules, waypoint Gateways; plus churn operations (pod create/delete, label edits,
//! policy edits/creates/deletes) that keep the model in step.
//!
//! It also answers what a correct control plane must send each node, from its own model
//! ([`Synth::workloads`], [`Synth::policies_for_node`], [`Synth::endpoints`]): the scale test
//! compares meshd's streams against these. Owns the model and its rendering only; writes
//! nothing into an API server itself (callers `put` what [`Synth::objects`] and churn return).

mod churn;
mod expect;
mod policies;
mod render;

use std::collections::BTreeMap;

use serde_json::Value;

pub use churn::{Change, Churn, Effect};
pub use render::pod_object;
use render::{namespace_object, policy_object, service_object};

/// Istio's root namespace: its policies reach every node.
pub const ROOT_NAMESPACE: &str = "istio-system";
/// The label a churn edit sets on a pod (its value is the edit's serial number).
pub const CHURN_LABEL: &str = "synth.mesh/churn";

/// How big a cluster to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthSize {
    pub pods: usize,
    pub services: usize,
    /// AuthorizationPolicies and PeerAuthentications together.
    pub policies: usize,
    pub nodes: usize,
}

impl SynthSize {
    /// The figure: 10,000 pods, 1,000 Services, 1,000 policies, 100 nodes.
    pub const FULL: SynthSize = SynthSize {
        pods: 10_000,
        services: 1_000,
        policies: 1_000,
        nodes: 100,
    };

    /// [`SynthSize::FULL`] divided by `divisor` (at least one of each).
    pub fn divided(divisor: usize) -> SynthSize {
        let d = divisor.max(1);
        let f = |n: usize| (n / d).max(1);
        SynthSize {
            pods: f(10_000),
            services: f(1_000),
            policies: f(1_000),
            nodes: f(100),
        }
    }

    pub fn namespaces(&self) -> usize {
        (self.pods / 50).max(2)
    }

    /// Nodes per pool: teams' pods run in their pool (nodeSelector), as in clusters with
    /// per-team node pools; shared namespaces run anywhere.
    pub fn pool_size(&self) -> usize {
        (self.nodes / 10).max(2).min(self.nodes.max(1))
    }

    pub fn pools(&self) -> usize {
        self.nodes.max(1).div_ceil(self.pool_size())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Scheduled, container still starting: no address yet.
    Pending,
    /// A finished Job's pod: keeps its address but runs no more.
    Succeeded,
}

#[derive(Debug, Clone)]
pub struct SynthNamespace {
    pub name: String,
    pub ambient: bool,
    /// Has a waypoint Gateway `waypoint` that its Services use.
    pub waypoint: bool,
    /// The node pool its pods run in (a team's nodeSelector), or `None`: any node.
    pub pool: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct SynthPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ips: Vec<String>,
    pub phase: Phase,
    /// The Deployment (or Job) it belongs to, and its ReplicaSet's pod-template-hash.
    pub owner: String,
    pub hash: String,
    pub uid: String,
}

impl SynthPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    /// A workload in the mesh view: running (or at least not finished) with an address.
    pub fn is_workload(&self) -> bool {
        self.phase != Phase::Succeeded && !self.ips.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// Resolved per pod from its container ports.
    Named(String),
}

#[derive(Debug, Clone)]
pub struct SynthPort {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
    pub app_protocol: &'static str,
}

#[derive(Debug, Clone)]
pub struct SynthService {
    pub namespace: String,
    pub name: String,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<SynthPort>,
    pub headless: bool,
}

#[derive(Debug, Clone)]
pub struct SynthPolicy {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub spec: Value,
}

impl SynthPolicy {
    /// "Kind/ns/name", the config stream's key.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }

    /// Whether ztunnel enforces it, so nodes are sent it: not a RequestAuthentication, not an
    /// AuthorizationPolicy attached with `targetRef(s)` (waypoints enforce those).
    pub fn for_ztunnel(&self) -> bool {
        let attached = !self.spec["targetRef"].is_null()
            || self.spec["targetRefs"]
                .as_array()
                .is_some_and(|a| !a.is_empty());
        match self.kind {
            "RequestAuthentication" => false,
            "AuthorizationPolicy" => !attached,
            _ => true,
        }
    }
}

/// splitmix64: tiny, seeded, and the same on every platform and dependency version.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// An index in 0..n skewed towards 0 (a few big namespaces and Deployments, many small).
    fn skewed(&mut self, n: usize) -> usize {
        ((self.unit().powi(2) * n as f64) as usize).min(n.saturating_sub(1))
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    /// Kubernetes' random name suffix alphabet (no vowels, no look-alikes).
    fn suffix(&mut self, len: usize) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len())] as char)
            .collect()
    }
    fn uid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }
}

const TEAMS: &[&str] = &[
    "payments", "checkout", "catalog", "search", "identity", "billing", "ledger", "shipping",
    "reviews", "ads", "media", "notify", "profile", "orders", "pricing", "fraud",
];
const APPS: &[&str] = &[
    "api",
    "web",
    "worker",
    "gateway",
    "cache",
    "indexer",
    "scheduler",
    "sync",
    "export",
    "render",
    "auth",
    "store",
    "events",
    "metrics",
    "admin",
    "batch",
];

#[derive(Debug, Clone)]
struct Deployment {
    namespace: String,
    name: String,
    hash: String,
    service_account: String,
    /// A Job (its pods finish) rather than a Deployment.
    job: bool,
}

/// The synthetic cluster and its churn.
#[derive(Debug, Clone)]
pub struct Synth {
    rng: Rng,
    pub size: SynthSize,
    pub namespaces: BTreeMap<String, SynthNamespace>,
    /// By "ns/name".
    pub pods: BTreeMap<String, SynthPod>,
    /// By "ns/name".
    pub services: BTreeMap<String, SynthService>,
    /// By "Kind/ns/name".
    pub policies: BTreeMap<String, SynthPolicy>,
    /// Routes, DestinationRules and waypoint Gateways (not sent to nodes).
    pub others: Vec<Value>,
    deployments: Vec<Deployment>,
    /// Addresses handed out per node (never reused).
    next_ip: Vec<u32>,
    serial: u64,
}

impl Synth {
    pub fn new(size: SynthSize, seed: u64) -> Synth {
        let mut s = Synth {
            rng: Rng(seed),
            size,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            policies: BTreeMap::new(),
            others: Vec::new(),
            deployments: Vec::new(),
            next_ip: vec![0; size.nodes.max(1)],
            serial: 0,
        };
        s.make_namespaces();
        s.make_workloads();
        s.make_policies();
        s.make_others();
        s
    }

    /// Node names, `node-0` … `node-(N-1)`.
    pub fn nodes(&self) -> Vec<String> {
        (0..self.size.nodes.max(1)).map(node_name).collect()
    }

    fn make_namespaces(&mut self) {
        let n = self.size.namespaces();
        for i in 0..n {
            let name = format!("{}-{i}", TEAMS[i % TEAMS.len()]);
            let ambient = i % 10 != 9;
            let waypoint = ambient && i % 20 == 3;
            // Three in ten are shared platform namespaces, spread over every node.
            let pool = (i % 10 >= 3).then(|| i % self.size.pools());
            self.namespaces.insert(
                name.clone(),
                SynthNamespace {
                    name,
                    ambient,
                    waypoint,
                    pool,
                },
            );
        }
        self.namespaces.insert(
            ROOT_NAMESPACE.into(),
            SynthNamespace {
                name: ROOT_NAMESPACE.into(),
                ambient: false,
                waypoint: false,
                pool: None,
            },
        );
    }

    /// Team namespaces (not the root one), in a fixed order.
    fn team_namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .namespaces
            .keys()
            .filter(|n| *n != ROOT_NAMESPACE)
            .cloned()
            .collect();
        // Mix the order so the skew does not follow the alphabet.
        v.sort_by_key(|n| n.rsplit('-').next().and_then(|i| i.parse::<usize>().ok()));
        v
    }

    fn make_workloads(&mut self) {
        let namespaces = self.team_namespaces();
        let with_service = self.size.services;
        let total = with_service + with_service / 4 + 1;
        for d in 0..total {
            let namespace = namespaces[self.rng.skewed(namespaces.len())].clone();
            let name = format!("{}-{d}", APPS[d % APPS.len()]);
            let service_account = if self.rng.chance(20) {
                "default".to_string()
            } else {
                name.clone()
            };
            self.deployments.push(Deployment {
                namespace,
                name,
                hash: self.rng.suffix(10),
                service_account,
                job: d >= with_service && d % 7 == 0,
            });
        }
        for d in 0..with_service {
            let dep = self.deployments[d].clone();
            let mut ports = vec![SynthPort {
                name: "http".into(),
                port: 80,
                target: TargetPort::Number(8080),
                app_protocol: "http",
            }];
            if self.rng.chance(50) {
                ports.push(SynthPort {
                    name: "grpc".into(),
                    port: 9090,
                    target: TargetPort::Named("grpc".into()),
                    app_protocol: "grpc",
                });
            }
            let svc = SynthService {
                namespace: dep.namespace.clone(),
                name: dep.name.clone(),
                selector: BTreeMap::from([("app".to_string(), dep.name.clone())]),
                ports,
                headless: d % 20 == 19,
            };
            self.services
                .insert(format!("{}/{}", svc.namespace, svc.name), svc);
        }
        for i in 0..self.size.pods {
            // Every Deployment gets a pod first; the rest go mostly to the big ones.
            let d = if i < total { i } else { self.rng.skewed(total) };
            self.add_pod(d, false);
        }
    }

    /// A new pod of Deployment `d` on a random node; `churn` pods always run.
    fn add_pod(&mut self, d: usize, churn: bool) -> String {
        let dep = self.deployments[d].clone();
        let nodes = self.size.nodes.max(1);
        let node = match self.namespaces.get(&dep.namespace).and_then(|n| n.pool) {
            Some(pool) => {
                let first = pool * self.size.pool_size();
                (first + self.rng.below(self.size.pool_size())).min(nodes - 1)
            }
            None => self.rng.below(nodes),
        };
        let phase = if dep.job {
            Phase::Succeeded
        } else if !churn && self.rng.chance(1) {
            Phase::Pending
        } else {
            Phase::Running
        };
        let ips = if phase == Phase::Pending {
            Vec::new()
        } else {
            self.next_ip[node] += 1;
            let k = self.next_ip[node];
            let v4 = 0x0a80_0000u32 + (node as u32) * 4096 + k;
            vec![
                std::net::Ipv4Addr::from(v4).to_string(),
                format!("fd00:10:{:x}::{:x}", 0x100 + node, k),
            ]
        };
        let mut labels = BTreeMap::from([
            ("app".to_string(), dep.name.clone()),
            ("pod-template-hash".to_string(), dep.hash.clone()),
            ("version".to_string(), "v1".to_string()),
            (
                "app.kubernetes.io/part-of".to_string(),
                dep.namespace.clone(),
            ),
        ]);
        if self.rng.chance(1) {
            labels.insert("istio.io/dataplane-mode".into(), "none".into());
        }
        let pod = SynthPod {
            name: format!("{}-{}-{}", dep.name, dep.hash, self.rng.suffix(5)),
            namespace: dep.namespace.clone(),
            node: node_name(node),
            labels,
            service_account: dep.service_account.clone(),
            ips,
            phase,
            owner: dep.name.clone(),
            hash: dep.hash.clone(),
            uid: self.rng.uid(),
        };
        let key = pod.key();
        self.pods.insert(key.clone(), pod);
        key
    }

    /// Every object, namespaces first (a namespace must exist before what lives in it).
    pub fn objects(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self.namespaces.values().map(namespace_object).collect();
        out.extend(self.services.values().map(service_object));
        out.extend(self.pods.values().map(pod_object));
        out.extend(self.policies.values().map(policy_object));
        out.extend(self.others.iter().cloned());
        out
    }
}

pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

#[cfg(test)]
mod tests;
