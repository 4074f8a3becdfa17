//! The node side of the config stream, computed per change rather than per subscriber: what a
//! node's ztunnel is sent is exactly `delta::snapshot(view_for_node(v))` and then
//! `delta::delta(view_for_node(old), view_for_node(new))`, but without building either view.
//!
//! Owns the per-version facts every node filter needs ([`VersionFacts`]: namespaces with pods on
//! each node, policy keys by namespace), the global difference between two versions
//! ([`GlobalDiff`]), both computed once and shared through [`Shared`], and a node subscriber's
//! state ([`NodeSubscriber`]: the last version it was brought up to and the policy keys it
//! holds). Does not decide what a node may see (`config_service::view_for_node` does; this must
//! agree with it) and does not know about gRPC.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use meshcore::proto::config::{ConfigUpdate, Policy, Workload};

use crate::translate::{MeshView, VersionedView};

/// Versions (facts) and version pairs (diffs) kept: subscribers lagging further recompute.
const KEPT: usize = 16;

/// What every node filter needs of one version, computed once.
#[derive(Debug, Default)]
pub struct VersionFacts {
    /// Node → namespaces with a pod on it (addressed or not: see `view_for_node`).
    local_namespaces: BTreeMap<String, BTreeSet<String>>,
    /// Namespace → keys of its policies that nodes are sent.
    policies_by_ns: BTreeMap<String, BTreeSet<String>>,
}

impl VersionFacts {
    pub fn of(view: &MeshView) -> Self {
        let mut local_namespaces: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for w in view.workloads.values() {
            let ns = local_namespaces.entry(w.node.clone()).or_default();
            if !ns.contains(&w.namespace) {
                ns.insert(w.namespace.clone());
            }
        }
        for (node, ids) in &view.identities_by_node {
            let ns = local_namespaces.entry(node.clone()).or_default();
            ns.extend(ids.iter().map(|(n, _)| n.clone()));
        }
        let mut policies_by_ns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (k, p) in view.policies.iter().filter(|(_, p)| for_nodes(p)) {
            policies_by_ns
                .entry(p.namespace.clone())
                .or_default()
                .insert(k.clone());
        }
        VersionFacts {
            local_namespaces,
            policies_by_ns,
        }
    }

    fn namespaces(&self, node: &str) -> Option<&BTreeSet<String>> {
        self.local_namespaces.get(node)
    }

    /// The policy keys `node` holds at this version.
    fn policy_keys(&self, node: &str, root_namespace: &str) -> BTreeSet<String> {
        let local = self.namespaces(node).into_iter().flatten();
        std::iter::once(root_namespace)
            .chain(local.map(String::as_str))
            .filter_map(|ns| self.policies_by_ns.get(ns))
            .flatten()
            .cloned()
            .collect()
    }
}

/// Whether nodes are sent this policy at all (beyond its namespace being theirs). ztunnel
/// enforces neither a RequestAuthentication (it cannot read JWTs) nor an AuthorizationPolicy
/// attached with `targetRef`/`targetRefs` (meshcore's policy engine compiles those for
/// waypoints only, never into ztunnel's L4 set): they are the waypoints' alone. A spec the
/// engine could read otherwise (not an object, `targetRefs` not a list) is still sent.
pub fn for_nodes(p: &Policy) -> bool {
    match p.kind.as_str() {
        "RequestAuthentication" => false,
        "AuthorizationPolicy" => !attached_with_target_refs(&p.spec_json),
        _ => true,
    }
}

/// As meshcore's engine decides it: `targetRef` set, or `targetRefs` a non-empty list.
fn attached_with_target_refs(spec_json: &str) -> bool {
    let Ok(serde_json::Value::Object(spec)) = serde_json::from_str(spec_json) else {
        return false;
    };
    spec.get("targetRef").is_some_and(|v| !v.is_null())
        || spec
            .get("targetRefs")
            .and_then(|v| v.as_array())
            .is_some_and(|a| !a.is_empty())
}

/// What changed between two versions, by key, in each section.
#[derive(Debug, Default)]
pub struct GlobalDiff {
    /// New or changed, in key order.
    workloads: Vec<String>,
    removed_workloads: Vec<String>,
    services: Vec<String>,
    removed_services: Vec<String>,
    /// New or changed.
    policies: BTreeSet<String>,
    /// Whether the set of policy keys changed (added or removed).
    policy_keys_changed: bool,
    trust_bundle: bool,
}

impl GlobalDiff {
    pub fn between(old: &MeshView, new: &MeshView) -> Self {
        let (workloads, removed_workloads) =
            crate::delta::diff_keys(&old.workloads, &new.workloads);
        let (services, removed_services) = crate::delta::diff_keys(&old.services, &new.services);
        let (policies, removed_policies) = crate::delta::diff_keys(&old.policies, &new.policies);
        // Added, removed, or edited into or out of what nodes are sent.
        let policy_keys_changed = !removed_policies.is_empty()
            || policies.iter().any(|k| {
                let sent = |v: &MeshView| v.policies.get(k).is_some_and(for_nodes);
                !old.policies.contains_key(k) || sent(old) != sent(new)
            });
        GlobalDiff {
            workloads,
            removed_workloads,
            services,
            removed_services,
            policies: policies.into_iter().collect(),
            policy_keys_changed,
            trust_bundle: old.trust_bundle != new.trust_bundle,
        }
    }
}

/// A value computed once, by whoever asks first.
type Once<T> = Arc<OnceLock<Arc<T>>>;
/// Recent values by key, oldest first.
type Recent<K, T> = Mutex<VecDeque<(K, Once<T>)>>;

/// Facts and diffs of recent versions, shared by every node subscriber of one server.
#[derive(Debug, Default)]
pub struct Shared {
    facts: Recent<u64, VersionFacts>,
    diffs: Recent<(u64, u64), GlobalDiff>,
}

/// The cell for `key`, made (and the oldest dropped) if absent. Computing happens outside the
/// list's lock, once: other subscribers wanting the same cell wait for it.
fn cell<K: PartialEq + Copy, T>(list: &Recent<K, T>, key: K) -> Once<T> {
    let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = list.iter().find(|(k, _)| *k == key) {
        return c.clone();
    }
    let c = Arc::new(OnceLock::new());
    list.push_back((key, c.clone()));
    if list.len() > KEPT {
        list.pop_front();
    }
    c
}

impl Shared {
    pub fn facts(&self, v: &VersionedView) -> Arc<VersionFacts> {
        let c = cell(&self.facts, v.version);
        c.get_or_init(|| Arc::new(VersionFacts::of(&v.view)))
            .clone()
    }

    pub fn diff(&self, old: &VersionedView, new: &VersionedView) -> Arc<GlobalDiff> {
        let c = cell(&self.diffs, (old.version, new.version));
        c.get_or_init(|| Arc::new(GlobalDiff::between(&old.view, &new.view)))
            .clone()
    }
}

/// A workload as `node` is sent it: other nodes' pods without netns and annotations.
fn for_node(w: &Workload, node: &str) -> Workload {
    let mut w = w.clone();
    if w.node != node {
        w.netns.clear();
        w.annotations.clear();
    }
    w
}

/// One node's subscription: where it is, and which policies it holds.
pub struct NodeSubscriber {
    node: String,
    root_namespace: String,
    at: Arc<VersionedView>,
    facts: Arc<VersionFacts>,
    policies: BTreeSet<String>,
}

impl NodeSubscriber {
    /// The subscriber at `current`, and the snapshot that brings it there.
    pub fn start(
        shared: &Shared,
        node: String,
        root_namespace: String,
        current: Arc<VersionedView>,
    ) -> (Self, ConfigUpdate) {
        let facts = shared.facts(&current);
        let policies = facts.policy_keys(&node, &root_namespace);
        let view = &current.view;
        let update = ConfigUpdate {
            version: current.version,
            snapshot: true,
            workloads: view
                .workloads
                .values()
                .map(|w| for_node(w, &node))
                .collect(),
            services: view.services.values().cloned().collect(),
            policies: policies
                .iter()
                .filter_map(|k| view.policies.get(k).cloned())
                .collect(),
            trust_bundle: Some(view.trust_bundle.clone()),
            ..Default::default()
        };
        let sub = NodeSubscriber {
            node,
            root_namespace,
            at: current,
            facts,
            policies,
        };
        (sub, update)
    }

    /// What brings the node from where it is to `next` (None: nothing it holds changed).
    pub fn advance(&mut self, shared: &Shared, next: Arc<VersionedView>) -> Option<ConfigUpdate> {
        if next.version == self.at.version {
            return None;
        }
        let diff = shared.diff(&self.at, &next);
        let facts = shared.facts(&next);
        let (old, new) = (&self.at.view, &next.view);
        let node = self.node.as_str();

        let mut workloads = Vec::new();
        for k in &diff.workloads {
            let Some(w) = new.workloads.get(k) else {
                continue;
            };
            let w = for_node(w, node);
            if old.workloads.get(k).map(|o| for_node(o, node)).as_ref() != Some(&w) {
                workloads.push(w);
            }
        }
        let services = diff
            .services
            .iter()
            .filter_map(|k| new.services.get(k).cloned())
            .collect();

        // The node's policy keys move only when its namespaces or the keys themselves do.
        let policies_now =
            if diff.policy_keys_changed || self.facts.namespaces(node) != facts.namespaces(node) {
                facts.policy_keys(node, &self.root_namespace)
            } else {
                self.policies.clone()
            };
        let policies = policies_now
            .iter()
            .filter(|k| !self.policies.contains(*k) || diff.policies.contains(*k))
            .filter_map(|k| new.policies.get(k).cloned())
            .collect();
        let removed_policies = self
            .policies
            .iter()
            .filter(|k| !policies_now.contains(*k))
            .cloned()
            .collect();

        let update = ConfigUpdate {
            version: next.version,
            snapshot: false,
            workloads,
            services,
            policies,
            trust_bundle: diff.trust_bundle.then(|| new.trust_bundle.clone()),
            removed_workloads: diff.removed_workloads.clone(),
            removed_services: diff.removed_services.clone(),
            removed_policies,
            routes: Vec::new(),
            removed_routes: Vec::new(),
        };
        self.at = next;
        self.facts = facts;
        self.policies = policies_now;
        let empty = update.workloads.is_empty()
            && update.services.is_empty()
            && update.policies.is_empty()
            && update.trust_bundle.is_none()
            && update.removed_workloads.is_empty()
            && update.removed_services.is_empty()
            && update.removed_policies.is_empty();
        (!empty).then_some(update)
    }
}

#[cfg(test)]
#[path = "config_node_tests.rs"]
mod tests;
