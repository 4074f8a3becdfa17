//! AuthorizationPolicy / PeerAuthentication compilation and L4 decisions on random policy sets
//! and connections. Besides "no panic", checks what users rely on:
//! - adding a DENY policy never allows a connection that was denied;
//! - an ALLOW policy with `spec: {}` allows nothing: alone it denies every connection to the
//!   workloads it applies to, and added to any set it never allows more;
//! - an AUDIT policy never changes a decision;
//! - the decision cache answers as the uncached evaluation, across recompiles.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use mesh_fuzz::r#gen;
use meshcore::policy::{DEFAULT_ROOT_NAMESPACE, Decision, DecisionCache, PolicySet};
use meshcore::proto::config::Policy;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut policies: Vec<Policy> = Vec::new();
    for i in 0..u.int_in_range(0..=6)? {
        policies.push(r#gen::any_policy(u, i)?);
    }
    let mut workloads = Vec::new();
    for i in 0..u.int_in_range(1..=3)? {
        workloads.push(r#gen::workload(u, i)?);
    }
    let mut conns = Vec::new();
    for _ in 0..u.int_in_range(1..=4)? {
        conns.push(r#gen::connection(u)?);
    }
    let deny_ns = *u.choose(r#gen::NAMESPACES)?;
    let deny = r#gen::policy(
        "AuthorizationPolicy",
        deny_ns,
        "extra-deny",
        &r#gen::authz_spec(u, Some("DENY"))?,
    );
    let audit_ns = *u.choose(r#gen::NAMESPACES)?;
    let audit = r#gen::policy(
        "AuthorizationPolicy",
        audit_ns,
        "extra-audit",
        &r#gen::authz_spec(u, Some("AUDIT"))?,
    );
    let empty_ns = *u.choose(r#gen::NAMESPACES)?;
    let empty = r#gen::policy("AuthorizationPolicy", empty_ns, "extra-empty", &json!({}));

    let root = DEFAULT_ROOT_NAMESPACE;
    let set = PolicySet::compile(&policies, root);
    let with = |extra: &Policy| PolicySet::compile(policies.iter().chain([extra]), root);
    let with_deny = with(&deny);
    let with_audit = with(&audit);
    let with_empty = with(&empty);
    let only_empty = PolicySet::compile([&empty], root);
    let cache = DecisionCache::new(4);

    // Everything the admin dump would show must serialize.
    for r in set.reports() {
        let _ = serde_json::to_string(r);
    }
    let _ = set.errors();

    for dst in &workloads {
        let _ = set.applicable(dst).count();
        for port in [0u16, 80, 8080, 9090] {
            let _ = set.mtls_mode(dst, port);
        }
        for conn in &conns {
            let base = set.authorize_verbose(conn, dst);
            let allowed = base.decision == Decision::Allow;
            if !allowed {
                assert_ne!(
                    with_deny.authorize(conn, dst),
                    Decision::Allow,
                    "adding DENY {} allowed {conn:?} to {dst:?}, denied before ({:?})",
                    deny.spec_json,
                    base.decision
                );
            }
            assert_eq!(
                with_audit.authorize(conn, dst),
                base.decision,
                "adding AUDIT {} changed the decision for {conn:?} to {dst:?}",
                audit.spec_json
            );
            if with_empty.authorize(conn, dst) == Decision::Allow {
                assert!(
                    allowed,
                    "adding `spec: {{}}` in {empty_ns:?} allowed {conn:?} to {dst:?}"
                );
            }
            if empty_ns == dst.namespace || empty_ns == root {
                assert_ne!(
                    only_empty.authorize(conn, dst),
                    Decision::Allow,
                    "`spec: {{}}` in {empty_ns:?} alone allowed {conn:?} to {dst:?}"
                );
            }
            // Interleave two generations so the cache must invalidate between them.
            for s in [&set, &with_deny, &set] {
                assert_eq!(
                    cache.authorize_verbose(s, conn, dst),
                    s.authorize_verbose(conn, dst),
                    "cached verdict differs for {conn:?} to {dst:?}"
                );
            }
        }
    }
    Ok(())
}
