//! Snapshots and incremental updates of the config stream: what a subscriber must be sent to
//! go from one view to the next.
//!
//! Owns the diff (pure). Does not know about gRPC, nodes or versions' meaning.

use std::collections::BTreeMap;

use meshcore::proto::config::ConfigUpdate;

use crate::translate::MeshView;

/// Everything in `view`, replacing whatever the subscriber had.
pub fn snapshot(view: &MeshView, version: u64) -> ConfigUpdate {
    ConfigUpdate {
        version,
        snapshot: true,
        workloads: view.workloads.values().cloned().collect(),
        services: view.services.values().cloned().collect(),
        policies: view.policies.values().cloned().collect(),
        routes: view.routes.values().cloned().collect(),
        trust_bundle: Some(view.trust_bundle.clone()),
        ..Default::default()
    }
}

/// What changed from `old` to `new`, or None when the subscriber already has `new`.
pub fn delta(old: &MeshView, new: &MeshView, version: u64) -> Option<ConfigUpdate> {
    let (workloads, removed_workloads) = diff_map(&old.workloads, &new.workloads);
    let (services, removed_services) = diff_map(&old.services, &new.services);
    let (policies, removed_policies) = diff_map(&old.policies, &new.policies);
    let (routes, removed_routes) = diff_map(&old.routes, &new.routes);
    let trust_bundle = (old.trust_bundle != new.trust_bundle).then(|| new.trust_bundle.clone());
    let update = ConfigUpdate {
        version,
        snapshot: false,
        workloads,
        services,
        policies,
        trust_bundle,
        removed_workloads,
        removed_services,
        removed_policies,
        routes,
        removed_routes,
    };
    let empty = update.workloads.is_empty()
        && update.services.is_empty()
        && update.policies.is_empty()
        && update.trust_bundle.is_none()
        && update.removed_workloads.is_empty()
        && update.removed_services.is_empty()
        && update.removed_policies.is_empty()
        && update.routes.is_empty()
        && update.removed_routes.is_empty();
    (!empty).then_some(update)
}

/// (new or changed values, keys that are gone)
fn diff_map<T: Clone + PartialEq>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
) -> (Vec<T>, Vec<String>) {
    let (changed, removed) = diff_keys(old, new);
    let upserts = changed.iter().filter_map(|k| new.get(k).cloned()).collect();
    (upserts, removed)
}

/// (keys new or changed in `new`, keys gone), each in key order.
pub(crate) fn diff_keys<T: PartialEq>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
) -> (Vec<String>, Vec<String>) {
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (changed, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcore::proto::config::Workload;

    fn wl(uid: &str, node: &str) -> Workload {
        Workload {
            uid: uid.into(),
            node: node.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_changes_are_sent() {
        let mut a = MeshView::default();
        a.workloads.insert("x/a".into(), wl("x/a", "n1"));
        a.workloads.insert("x/b".into(), wl("x/b", "n1"));
        assert!(delta(&a, &a, 2).is_none());
        let mut b = a.clone();
        b.workloads.insert("x/a".into(), wl("x/a", "n2"));
        b.workloads.remove("x/b");
        b.workloads.insert("x/c".into(), wl("x/c", "n1"));
        let d = delta(&a, &b, 7).unwrap();
        assert_eq!((d.version, d.snapshot), (7, false));
        let uids: Vec<&str> = d.workloads.iter().map(|w| w.uid.as_str()).collect();
        assert_eq!(uids, vec!["x/a", "x/c"]);
        assert_eq!(d.removed_workloads, vec!["x/b"]);
        assert!(d.trust_bundle.is_none());
        let s = snapshot(&b, 8);
        assert!(s.snapshot && s.trust_bundle.is_some() && s.workloads.len() == 2);
    }
}
