use std::collections::BTreeSet;

use super::*;

#[test]
fn same_seed_same_cluster_and_sizes_hold() {
    let size = SynthSize::divided(10);
    let (a, b) = (Synth::new(size, 7), Synth::new(size, 7));
    assert_eq!(a.objects(), b.objects());
    assert_ne!(a.objects(), Synth::new(size, 8).objects());
    assert_eq!(a.pods.len(), 1_000);
    assert_eq!(a.services.len(), 100);
    assert_eq!(a.policies.len(), 100);
    assert_eq!(a.nodes().len(), 10);
    // Unique addresses, every pod on a known node.
    let ips: Vec<&String> = a.pods.values().flat_map(|p| &p.ips).collect();
    let unique: BTreeSet<&String> = ips.iter().copied().collect();
    assert_eq!(ips.len(), unique.len());
    assert!(a.pods.values().all(|p| a.nodes().contains(&p.node)));
    // The mix is there: pending, finished, opted-out, headless, named ports, waypoints.
    assert!(a.pods.values().any(|p| p.phase == Phase::Pending));
    assert!(a.pods.values().any(|p| p.phase == Phase::Succeeded));
    assert!(a.services.values().any(|s| s.headless));
    assert!(a.namespaces.values().any(|n| n.waypoint));
    assert!(a.policies.values().any(|p| p.kind == "PeerAuthentication"));
    // Teams run in their node pools: no node needs most namespaces' policies.
    for n in a.nodes() {
        assert!(
            a.policies_for_node(&n).len() * 10 < a.policies.len() * 8,
            "{n}"
        );
    }
    // Every Service selects at least one running pod.
    assert!(a.services.values().all(|s| !a.endpoints(s).is_empty()));
}

#[test]
#[ignore = "prints the full size's shape"]
fn full_size_shape() {
    let s = Synth::new(SynthSize::FULL, 42);
    let bytes: usize = s.objects().iter().map(|o| o.to_string().len()).sum();
    let per_node: Vec<usize> = s
        .nodes()
        .iter()
        .map(|n| s.policies_for_node(n).len())
        .collect();
    eprintln!(
        "{} objects, {bytes} bytes of JSON; policies per node {:?} of {}",
        s.objects().len(),
        per_node,
        s.policies.len()
    );
}

#[test]
fn churn_keeps_the_model_in_step() {
    let mut s = Synth::new(SynthSize::divided(100), 1);
    let mut kinds = BTreeSet::new();
    for _ in 0..300 {
        let c = s.churn();
        match &c.effect {
            Effect::Workload { uid, present, .. } => {
                assert_eq!(s.pods.contains_key(uid), *present);
                kinds.insert(if *present { "pod+" } else { "pod-" });
            }
            Effect::Policy { key, present, .. } => {
                assert_eq!(s.policies.contains_key(key), *present);
                kinds.insert(if *present { "policy+" } else { "policy-" });
            }
        }
    }
    assert_eq!(kinds.len(), 4, "{kinds:?}");
}
