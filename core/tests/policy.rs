//! The L4 policy engine as users see it: Istio AuthorizationPolicy / PeerAuthentication specs in,
//! decisions, mTLS modes, reports and errors out.
//!
//! Owns only these tests; table-driven where the semantics are a matrix.

use meshcore::Identity;
use meshcore::policy::{
    Connection, Decision, DecisionCache, MtlsMode, NO_ALLOW_MATCHED, PolicySet, PolicyStatus,
};
use meshcore::proto::config::{Policy, Workload};
use serde_json::{Value, json};

const ROOT: &str = "istio-system";
const DST_IP: &str = "10.1.0.10";

fn policy(kind: &str, ns: &str, name: &str, spec: Value) -> Policy {
    Policy {
        key: format!("{kind}/{ns}/{name}"),
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
        spec_json: spec.to_string(),
    }
}

fn ap(ns: &str, name: &str, spec: Value) -> Policy {
    policy("AuthorizationPolicy", ns, name, spec)
}

fn pa(ns: &str, name: &str, spec: Value) -> Policy {
    policy("PeerAuthentication", ns, name, spec)
}

fn wl(ns: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        uid: format!("{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        service_account: name.into(),
        ips: vec![DST_IP.into()],
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        trust_domain: "cluster.local".into(),
        ..Default::default()
    }
}

/// The default destination: app/server, labels app=server.
fn server() -> Workload {
    wl("app", "server", &[("app", "server")])
}

fn mtls(ns: &str, sa: &str, src: &str, port: u16) -> Connection {
    Connection {
        src_identity: Some(Identity::new("cluster.local", ns, sa).into()),
        src_ip: src.parse().unwrap(),
        dst_ip: DST_IP.parse().unwrap(),
        dst_port: port,
    }
}

fn plain(src: &str, port: u16) -> Connection {
    Connection {
        src_identity: None,
        src_ip: src.parse().unwrap(),
        dst_ip: DST_IP.parse().unwrap(),
        dst_port: port,
    }
}

/// frontend/web from 10.2.0.5 to port 8080.
fn conn_a() -> Connection {
    mtls("frontend", "web", "10.2.0.5", 8080)
}

/// other/db from 192.168.1.1 to port 9090.
fn conn_b() -> Connection {
    mtls("other", "db", "192.168.1.1", 9090)
}

fn deny(p: &str) -> Decision {
    Decision::Deny { policy: p.into() }
}

fn no_allow() -> Decision {
    deny(NO_ALLOW_MATCHED)
}

fn compile(policies: &[Policy]) -> PolicySet {
    PolicySet::compile(policies, ROOT)
}

// ---------------------------------------------------------------------------------------------
// Every supported field, each not-twin, each string form, for ALLOW, DENY and AUDIT.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum At {
    Source(&'static str),
    Operation(&'static str),
    When(&'static str),
    WhenNot(&'static str),
}

struct FieldCase {
    name: &'static str,
    at: At,
    values: &'static [&'static str],
    matching: fn() -> Connection,
    other: fn() -> Connection,
}

fn rule_for(at: At, values: &[&str]) -> Value {
    match at {
        At::Source(f) => json!({"from": [{"source": {f: values}}]}),
        At::Operation(f) => json!({"to": [{"operation": {f: values}}]}),
        At::When(k) => json!({"when": [{"key": k, "values": values}]}),
        At::WhenNot(k) => json!({"when": [{"key": k, "notValues": values}]}),
    }
}

#[rustfmt::skip]
fn field_cases() -> Vec<FieldCase> {
    use At::*;
    let a = conn_a;
    let b = conn_b;
    let plain_a = || plain("10.2.0.5", 8080);
    // app/web: serviceAccounts "web" in a policy of namespace app means app/web.
    let app_web = || mtls("app", "web", "10.2.0.6", 8080);
    let v6 = || mtls("frontend", "web", "fd00::5", 8080);
    let mapped = || mtls("frontend", "web", "::ffff:10.2.0.5", 8080);
    let other_dst = || Connection { dst_ip: "10.1.0.11".parse().unwrap(), ..conn_a() };
    let v6_dst = || Connection { dst_ip: "fd00:1::10".parse().unwrap(), ..conn_a() };
    vec![
        // principals: exact, prefix*, *suffix, *, spiffe:// accepted.
        FieldCase { name: "principals exact", at: Source("principals"), values: &["cluster.local/ns/frontend/sa/web"], matching: a, other: b },
        FieldCase { name: "principals prefix", at: Source("principals"), values: &["cluster.local/ns/frontend/*"], matching: a, other: b },
        FieldCase { name: "principals suffix", at: Source("principals"), values: &["*/sa/web"], matching: a, other: b },
        FieldCase { name: "principals any", at: Source("principals"), values: &["*"], matching: a, other: plain_a },
        FieldCase { name: "principals spiffe", at: Source("principals"), values: &["spiffe://cluster.local/ns/frontend/sa/web"], matching: a, other: b },
        FieldCase { name: "principals list", at: Source("principals"), values: &["x/ns/y/sa/z", "cluster.local/ns/frontend/sa/web"], matching: a, other: b },
        FieldCase { name: "notPrincipals exact", at: Source("notPrincipals"), values: &["cluster.local/ns/other/sa/db"], matching: a, other: b },
        FieldCase { name: "notPrincipals prefix", at: Source("notPrincipals"), values: &["cluster.local/ns/other/*"], matching: a, other: b },
        FieldCase { name: "notPrincipals suffix", at: Source("notPrincipals"), values: &["*/sa/db"], matching: a, other: b },
        // Plaintext has no principal: it passes negative lists.
        FieldCase { name: "notPrincipals any", at: Source("notPrincipals"), values: &["*"], matching: plain_a, other: a },
        // namespaces
        FieldCase { name: "namespaces exact", at: Source("namespaces"), values: &["frontend"], matching: a, other: b },
        FieldCase { name: "namespaces prefix", at: Source("namespaces"), values: &["front*"], matching: a, other: b },
        FieldCase { name: "namespaces suffix", at: Source("namespaces"), values: &["*end"], matching: a, other: b },
        FieldCase { name: "namespaces any", at: Source("namespaces"), values: &["*"], matching: a, other: plain_a },
        FieldCase { name: "notNamespaces exact", at: Source("notNamespaces"), values: &["other"], matching: a, other: b },
        FieldCase { name: "notNamespaces prefix", at: Source("notNamespaces"), values: &["oth*"], matching: a, other: b },
        FieldCase { name: "notNamespaces suffix", at: Source("notNamespaces"), values: &["*her"], matching: a, other: b },
        FieldCase { name: "notNamespaces any", at: Source("notNamespaces"), values: &["*"], matching: plain_a, other: a },
        // serviceAccounts: "ns/sa", or "sa" in the policy's namespace (app).
        FieldCase { name: "serviceAccounts ns/sa", at: Source("serviceAccounts"), values: &["frontend/web"], matching: a, other: b },
        FieldCase { name: "serviceAccounts sa", at: Source("serviceAccounts"), values: &["web"], matching: app_web, other: a },
        FieldCase { name: "serviceAccounts plaintext", at: Source("serviceAccounts"), values: &["frontend/web"], matching: a, other: plain_a },
        FieldCase { name: "notServiceAccounts ns/sa", at: Source("notServiceAccounts"), values: &["other/db"], matching: a, other: b },
        FieldCase { name: "notServiceAccounts sa", at: Source("notServiceAccounts"), values: &["web"], matching: a, other: app_web },
        FieldCase { name: "notServiceAccounts plaintext", at: Source("notServiceAccounts"), values: &["frontend/web"], matching: plain_a, other: a },
        // ipBlocks: single IP, CIDR, IPv6, v4-mapped (both ways).
        FieldCase { name: "ipBlocks ip", at: Source("ipBlocks"), values: &["10.2.0.5"], matching: a, other: b },
        FieldCase { name: "ipBlocks cidr", at: Source("ipBlocks"), values: &["10.2.0.0/16"], matching: a, other: b },
        FieldCase { name: "ipBlocks plaintext", at: Source("ipBlocks"), values: &["10.2.0.0/16"], matching: plain_a, other: b },
        FieldCase { name: "ipBlocks v6", at: Source("ipBlocks"), values: &["fd00::/16"], matching: v6, other: a },
        FieldCase { name: "ipBlocks v6 single", at: Source("ipBlocks"), values: &["fd00::5"], matching: v6, other: a },
        FieldCase { name: "ipBlocks v4-mapped source", at: Source("ipBlocks"), values: &["10.2.0.0/16"], matching: mapped, other: b },
        FieldCase { name: "ipBlocks v4-mapped block", at: Source("ipBlocks"), values: &["::ffff:10.2.0.0/112"], matching: a, other: b },
        FieldCase { name: "notIpBlocks cidr", at: Source("notIpBlocks"), values: &["192.168.0.0/16"], matching: a, other: b },
        FieldCase { name: "notIpBlocks v6", at: Source("notIpBlocks"), values: &["fd00::/16"], matching: a, other: v6 },
        // ports
        FieldCase { name: "ports", at: Operation("ports"), values: &["8080"], matching: a, other: b },
        FieldCase { name: "ports list", at: Operation("ports"), values: &["80", "8080"], matching: a, other: b },
        FieldCase { name: "notPorts", at: Operation("notPorts"), values: &["9090"], matching: a, other: b },
        // conditions
        FieldCase { name: "source.ip", at: When("source.ip"), values: &["10.2.0.0/16"], matching: a, other: b },
        FieldCase { name: "source.ip v4-mapped", at: When("source.ip"), values: &["10.2.0.5"], matching: mapped, other: b },
        FieldCase { name: "source.ip not", at: WhenNot("source.ip"), values: &["192.168.0.0/16"], matching: a, other: b },
        FieldCase { name: "source.namespace exact", at: When("source.namespace"), values: &["frontend"], matching: a, other: b },
        FieldCase { name: "source.namespace prefix", at: When("source.namespace"), values: &["front*"], matching: a, other: b },
        FieldCase { name: "source.namespace suffix", at: When("source.namespace"), values: &["*end"], matching: a, other: b },
        FieldCase { name: "source.namespace any", at: When("source.namespace"), values: &["*"], matching: a, other: plain_a },
        FieldCase { name: "source.namespace not", at: WhenNot("source.namespace"), values: &["other"], matching: a, other: b },
        FieldCase { name: "source.principal exact", at: When("source.principal"), values: &["cluster.local/ns/frontend/sa/web"], matching: a, other: b },
        FieldCase { name: "source.principal prefix", at: When("source.principal"), values: &["cluster.local/*"], matching: a, other: plain_a },
        FieldCase { name: "source.principal suffix", at: When("source.principal"), values: &["*/sa/web"], matching: a, other: b },
        FieldCase { name: "source.principal any", at: When("source.principal"), values: &["*"], matching: b, other: plain_a },
        FieldCase { name: "source.principal not", at: WhenNot("source.principal"), values: &["*/sa/db"], matching: a, other: b },
        FieldCase { name: "destination.ip", at: When("destination.ip"), values: &["10.1.0.10/32"], matching: a, other: other_dst },
        FieldCase { name: "destination.ip v6", at: When("destination.ip"), values: &["fd00:1::/64"], matching: v6_dst, other: a },
        FieldCase { name: "destination.ip not", at: WhenNot("destination.ip"), values: &["10.1.0.11"], matching: a, other: other_dst },
        FieldCase { name: "destination.port", at: When("destination.port"), values: &["8080"], matching: a, other: b },
        FieldCase { name: "destination.port not", at: WhenNot("destination.port"), values: &["9090"], matching: a, other: b },
    ]
}

#[test]
fn every_field_for_every_action() {
    let dst = server();
    for case in field_cases() {
        let rule = rule_for(case.at, case.values);
        for action in ["ALLOW", "DENY", "AUDIT"] {
            let set = compile(&[ap(
                "app",
                "p",
                json!({"action": action, "rules": [rule.clone()]}),
            )]);
            assert!(
                set.errors().is_empty(),
                "{} {action}: {:?}",
                case.name,
                set.errors()
            );
            let m = set.authorize_verbose(&(case.matching)(), &dst);
            let o = set.authorize_verbose(&(case.other)(), &dst);
            let (want_m, want_o, audit_m) = match action {
                "ALLOW" => (Decision::Allow, no_allow(), vec![]),
                "DENY" => (deny("app/p"), Decision::Allow, vec![]),
                _ => (Decision::Allow, Decision::Allow, vec!["app/p".to_string()]),
            };
            assert_eq!(
                m.decision, want_m,
                "{} {action}: matching connection",
                case.name
            );
            assert_eq!(
                o.decision, want_o,
                "{} {action}: other connection",
                case.name
            );
            assert_eq!(
                m.audited, audit_m,
                "{} {action}: audit of matching connection",
                case.name
            );
            assert!(
                o.audited.is_empty(),
                "{} {action}: audit of other connection",
                case.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Precedence and rule structure.
// ---------------------------------------------------------------------------------------------

struct Scenario {
    name: &'static str,
    policies: Vec<Policy>,
    checks: Vec<(Connection, Decision)>,
}

fn run(scenarios: Vec<Scenario>, dst: &Workload) {
    for s in scenarios {
        let set = compile(&s.policies);
        assert!(set.errors().is_empty(), "{}: {:?}", s.name, set.errors());
        for (i, (conn, want)) in s.checks.iter().enumerate() {
            assert_eq!(
                &set.authorize(conn, dst),
                want,
                "{}: check {i} ({conn:?})",
                s.name
            );
        }
    }
}

#[test]
fn precedence() {
    let allow_all = || ap("app", "allow-all", json!({"rules": [{}]}));
    let deny_frontend = || {
        ap(
            "app",
            "deny-frontend",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["frontend"]}}]}]}),
        )
    };
    let allow_other = || {
        ap(
            "app",
            "allow-other",
            json!({"rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}),
        )
    };
    run(
        vec![
            Scenario {
                name: "no policies allow",
                policies: vec![],
                checks: vec![
                    (conn_a(), Decision::Allow),
                    (plain("1.1.1.1", 1), Decision::Allow),
                ],
            },
            Scenario {
                name: "DENY beats ALLOW",
                policies: vec![allow_all(), deny_frontend()],
                checks: vec![
                    (conn_a(), deny("app/deny-frontend")),
                    (conn_b(), Decision::Allow),
                ],
            },
            Scenario {
                name: "only non-matching DENY",
                policies: vec![deny_frontend()],
                checks: vec![(conn_b(), Decision::Allow)],
            },
            Scenario {
                name: "spec {} allows nothing",
                policies: vec![ap("app", "nothing", json!({}))],
                checks: vec![(conn_a(), no_allow()), (plain("10.2.0.5", 80), no_allow())],
            },
            Scenario {
                name: "rules [] allows nothing",
                policies: vec![ap("app", "nothing", json!({"rules": []}))],
                checks: vec![(conn_a(), no_allow())],
            },
            Scenario {
                name: "empty rule matches all",
                policies: vec![allow_all()],
                checks: vec![
                    (conn_a(), Decision::Allow),
                    (plain("1.2.3.4", 1), Decision::Allow),
                ],
            },
            Scenario {
                name: "any matching ALLOW allows",
                policies: vec![
                    allow_other(),
                    ap(
                        "app",
                        "allow-frontend",
                        json!({"rules": [{"from": [{"source": {"namespaces": ["frontend"]}}]}]}),
                    ),
                ],
                checks: vec![
                    (conn_a(), Decision::Allow),
                    (conn_b(), Decision::Allow),
                    (mtls("third", "x", "1.1.1.1", 1), no_allow()),
                ],
            },
            Scenario {
                name: "AUDIT is not an ALLOW policy",
                policies: vec![ap(
                    "app",
                    "audit",
                    json!({"action": "AUDIT", "rules": [{}]}),
                )],
                checks: vec![(conn_a(), Decision::Allow)],
            },
            Scenario {
                name: "AUDIT does not rescue a denied connection",
                policies: vec![
                    allow_other(),
                    ap("app", "audit", json!({"action": "AUDIT", "rules": [{}]})),
                ],
                checks: vec![(conn_a(), no_allow()), (conn_b(), Decision::Allow)],
            },
            Scenario {
                name: "DENY with empty rule denies all",
                policies: vec![ap(
                    "app",
                    "deny-all",
                    json!({"action": "DENY", "rules": [{}]}),
                )],
                checks: vec![
                    (conn_a(), deny("app/deny-all")),
                    (plain("1.1.1.1", 1), deny("app/deny-all")),
                ],
            },
            Scenario {
                name: "DENY with empty rule list never matches",
                policies: vec![ap(
                    "app",
                    "deny-none",
                    json!({"action": "DENY", "rules": []}),
                )],
                checks: vec![(conn_a(), Decision::Allow)],
            },
            Scenario {
                name: "first matching DENY by name is reported",
                policies: vec![
                    ap("app", "z-deny", json!({"action": "DENY", "rules": [{}]})),
                    ap("app", "a-deny", json!({"action": "DENY", "rules": [{}]})),
                ],
                checks: vec![(conn_a(), deny("app/a-deny"))],
            },
            Scenario {
                name: "from AND to",
                policies: vec![ap(
                    "app",
                    "p",
                    json!({"rules": [{"from": [{"source": {"namespaces": ["frontend"]}}], "to": [{"operation": {"ports": ["8080"]}}]}]}),
                )],
                checks: vec![
                    (conn_a(), Decision::Allow),
                    (mtls("frontend", "web", "10.2.0.5", 9090), no_allow()),
                    (mtls("other", "db", "10.2.0.5", 8080), no_allow()),
                ],
            },
            Scenario {
                name: "fields inside one source are ANDed",
                policies: vec![ap(
                    "app",
                    "p",
                    json!({"rules": [{"from": [{"source": {"namespaces": ["frontend"], "ipBlocks": ["10.2.0.0/16"]}}]}]}),
                )],
                checks: vec![
                    (conn_a(), Decision::Allow),
                    (mtls("frontend", "web", "192.168.1.1", 8080), no_allow()),
                    (mtls("other", "db", "10.2.0.5", 8080), no_allow()),
                ],
            },
            Scenario {
                name: "sources are ORed, operations are ORed",
                policies: vec![ap(
                    "app",
                    "p",
                    json!({"rules": [{
                        "from": [{"source": {"namespaces": ["frontend"]}}, {"source": {"ipBlocks": ["192.168.0.0/16"]}}],
                        "to": [{"operation": {"ports": ["8080"]}}, {"operation": {"ports": ["9090"]}}]
                    }]}),
                )],
                checks: vec![
                    (conn_a(), Decision::Allow),
                    (conn_b(), Decision::Allow),
                    (mtls("x", "y", "1.1.1.1", 8080), no_allow()),
                    (mtls("frontend", "web", "1.1.1.1", 7070), no_allow()),
                ],
            },
            Scenario {
                name: "positive and negative in one field",
                policies: vec![ap(
                    "app",
                    "p",
                    json!({"rules": [{"from": [{"source": {"namespaces": ["*"], "notNamespaces": ["other"]}}]}]}),
                )],
                checks: vec![
                    (conn_a(), Decision::Allow),
                    (conn_b(), no_allow()),
                    (plain("10.2.0.5", 8080), no_allow()),
                ],
            },
            Scenario {
                name: "when conditions are ANDed; values and notValues both apply",
                policies: vec![ap(
                    "app",
                    "p",
                    json!({"rules": [{"when": [
                        {"key": "source.ip", "values": ["10.0.0.0/8"], "notValues": ["10.9.0.0/16"]},
                        {"key": "destination.port", "values": ["8080"]}
                    ]}]}),
                )],
                checks: vec![
                    (conn_a(), Decision::Allow),
                    (mtls("frontend", "web", "10.9.0.1", 8080), no_allow()),
                    (mtls("frontend", "web", "10.2.0.5", 9090), no_allow()),
                ],
            },
            Scenario {
                name: "rules are ORed",
                policies: vec![ap(
                    "app",
                    "p",
                    json!({"rules": [
                        {"to": [{"operation": {"ports": ["8080"]}}]},
                        {"from": [{"source": {"namespaces": ["other"]}}]}
                    ]}),
                )],
                checks: vec![
                    (conn_a(), Decision::Allow),
                    (conn_b(), Decision::Allow),
                    (mtls("x", "y", "1.1.1.1", 9090), no_allow()),
                ],
            },
        ],
        &server(),
    );
}

#[test]
fn audit_lists_every_matching_audit_policy() {
    let set = compile(&[
        ap("app", "audit-b", json!({"action": "AUDIT", "rules": [{}]})),
        ap(
            "app",
            "audit-a",
            json!({"action": "AUDIT", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}),
        ),
        ap(
            "app",
            "audit-c",
            json!({"action": "AUDIT", "rules": [{"to": [{"operation": {"ports": ["1"]}}]}]}),
        ),
        ap(
            "app",
            "deny",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}),
        ),
    ]);
    let v = set.authorize_verbose(&conn_a(), &server());
    assert_eq!(v.decision, Decision::Allow);
    assert_eq!(
        v.audited,
        vec!["app/audit-a".to_string(), "app/audit-b".to_string()]
    );
    // Audited even when denied.
    let v = set.authorize_verbose(&mtls("other", "db", "1.1.1.1", 8080), &server());
    assert_eq!(v.decision, deny("app/deny"));
    assert_eq!(
        v.audited,
        vec!["app/audit-a".to_string(), "app/audit-b".to_string()]
    );
}

// ---------------------------------------------------------------------------------------------
// Scopes.
// ---------------------------------------------------------------------------------------------

#[test]
fn scopes() {
    let deny_all = || json!({"action": "DENY", "rules": [{}]});
    let deny_selected =
        || json!({"action": "DENY", "selector": {"matchLabels": {"app": "server"}}, "rules": [{}]});
    let cases: Vec<(&str, Vec<Policy>, Workload, Decision)> = vec![
        (
            "root namespace without selector is mesh-wide",
            vec![ap(ROOT, "mesh", deny_all())],
            server(),
            deny("istio-system/mesh"),
        ),
        (
            "mesh-wide also in another namespace",
            vec![ap(ROOT, "mesh", deny_all())],
            wl("elsewhere", "x", &[]),
            deny("istio-system/mesh"),
        ),
        (
            "root namespace selector matches in every namespace",
            vec![ap(ROOT, "sel", deny_selected())],
            server(),
            deny("istio-system/sel"),
        ),
        (
            "root namespace selector needs the labels",
            vec![ap(ROOT, "sel", deny_selected())],
            wl("app", "other", &[("app", "other")]),
            Decision::Allow,
        ),
        (
            "namespace-wide applies to its namespace",
            vec![ap("app", "ns", deny_all())],
            server(),
            deny("app/ns"),
        ),
        (
            "namespace-wide does not apply elsewhere",
            vec![ap("app", "ns", deny_all())],
            wl("elsewhere", "x", &[("app", "server")]),
            Decision::Allow,
        ),
        (
            "selector matches labels",
            vec![ap("app", "sel", deny_selected())],
            server(),
            deny("app/sel"),
        ),
        (
            "selector needs all labels",
            vec![ap(
                "app",
                "sel",
                json!({"action": "DENY", "selector": {"matchLabels": {"app": "server", "version": "v2"}}, "rules": [{}]}),
            )],
            server(),
            Decision::Allow,
        ),
        (
            "selector with several labels",
            vec![ap(
                "app",
                "sel",
                json!({"action": "DENY", "selector": {"matchLabels": {"app": "server", "version": "v2"}}, "rules": [{}]}),
            )],
            wl(
                "app",
                "server",
                &[("app", "server"), ("version", "v2"), ("extra", "1")],
            ),
            deny("app/sel"),
        ),
        (
            "selector does not match other labels",
            vec![ap("app", "sel", deny_selected())],
            wl("app", "other", &[("app", "other")]),
            Decision::Allow,
        ),
        (
            "selector in another namespace does not apply",
            vec![ap("elsewhere", "sel", deny_selected())],
            server(),
            Decision::Allow,
        ),
        (
            "namespace-wide in another namespace does not apply",
            vec![ap("elsewhere", "ns", deny_all())],
            server(),
            Decision::Allow,
        ),
        (
            "ALLOW in another namespace does not make this one deny-by-default",
            vec![ap(
                "elsewhere",
                "allow",
                json!({"rules": [{"from": [{"source": {"namespaces": ["nobody"]}}]}]}),
            )],
            server(),
            Decision::Allow,
        ),
        (
            "empty selector selects the whole namespace",
            vec![ap(
                "app",
                "sel",
                json!({"action": "DENY", "selector": {}, "rules": [{}]}),
            )],
            wl("app", "x", &[]),
            deny("app/sel"),
        ),
    ];
    for (name, policies, dst, want) in cases {
        let set = compile(&policies);
        assert!(set.errors().is_empty(), "{name}: {:?}", set.errors());
        assert_eq!(set.authorize(&conn_a(), &dst), want, "{name}");
    }
}

#[test]
fn custom_root_namespace() {
    let policies = [
        ap(
            "mesh-root",
            "deny",
            json!({"action": "DENY", "rules": [{}]}),
        ),
        ap(
            ROOT,
            "ns-only",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["1"]}}]}]}),
        ),
    ];
    let set = PolicySet::compile(&policies, "mesh-root");
    assert_eq!(set.root_namespace(), "mesh-root");
    assert_eq!(set.authorize(&conn_a(), &server()), deny("mesh-root/deny"));
    // istio-system is an ordinary namespace now.
    assert_eq!(set.applicable(&server()).count(), 1);
}

// ---------------------------------------------------------------------------------------------
// What L4 cannot enforce: HTTP attributes, waypoint policies, CUSTOM.
// ---------------------------------------------------------------------------------------------

fn report_of<'a>(set: &'a PolicySet, key: &str) -> &'a meshcore::policy::PolicyReport {
    set.reports()
        .iter()
        .find(|r| r.key == key)
        .unwrap_or_else(|| panic!("no report for {key}"))
}

#[test]
fn http_only_allow_rule_is_dropped_and_reported() {
    let set = compile(&[ap(
        "app",
        "p",
        json!({"rules": [
            {"to": [{"operation": {"methods": ["GET"]}}]},
            {"from": [{"source": {"namespaces": ["other"]}}]}
        ]}),
    )]);
    assert!(set.errors().is_empty());
    // Rule 0 would allow everything; at L4 it is dropped, so only rule 1 remains.
    assert_eq!(set.authorize(&conn_a(), &server()), no_allow());
    assert_eq!(set.authorize(&conn_b(), &server()), Decision::Allow);
    let r = report_of(&set, "AuthorizationPolicy/app/p");
    assert_eq!(r.status, PolicyStatus::Enforced);
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    let w = &r.warnings[0];
    assert!(
        w.starts_with("AuthorizationPolicy app/p: spec.rules[0]: rule 0 of app/p uses methods"),
        "{w}"
    );
    assert!(
        w.contains("dropped at L4") && w.contains("more restrictive"),
        "{w}"
    );
    let dump = serde_json::to_value(r).unwrap();
    assert_eq!(dump["effective"]["droppedRules"], json!([0]));
    assert_eq!(dump["effective"]["rules"].as_array().unwrap().len(), 1);
}

#[test]
fn every_http_only_attribute() {
    let cases: Vec<(&str, Value)> = vec![
        (
            "requestPrincipals",
            json!({"from": [{"source": {"requestPrincipals": ["*"]}}]}),
        ),
        (
            "notRequestPrincipals",
            json!({"from": [{"source": {"notRequestPrincipals": ["x"]}}]}),
        ),
        (
            "remoteIpBlocks",
            json!({"from": [{"source": {"remoteIpBlocks": ["10.0.0.0/8"]}}]}),
        ),
        (
            "notRemoteIpBlocks",
            json!({"from": [{"source": {"notRemoteIpBlocks": ["10.0.0.0/8"]}}]}),
        ),
        (
            "hosts",
            json!({"to": [{"operation": {"hosts": ["a.example"]}}]}),
        ),
        (
            "notHosts",
            json!({"to": [{"operation": {"notHosts": ["a.example"]}}]}),
        ),
        (
            "methods",
            json!({"to": [{"operation": {"methods": ["GET"]}}]}),
        ),
        (
            "notMethods",
            json!({"to": [{"operation": {"notMethods": ["GET"]}}]}),
        ),
        ("paths", json!({"to": [{"operation": {"paths": ["/x*"]}}]})),
        (
            "notPaths",
            json!({"to": [{"operation": {"notPaths": ["/x"]}}]}),
        ),
        (
            "request.headers[x-user]",
            json!({"when": [{"key": "request.headers[x-user]", "values": ["a"]}]}),
        ),
        (
            "request.auth.claims[iss]",
            json!({"when": [{"key": "request.auth.claims[iss]", "values": ["a"]}]}),
        ),
        (
            "request.auth.principal",
            json!({"when": [{"key": "request.auth.principal", "values": ["a"]}]}),
        ),
        (
            "request.auth.audiences",
            json!({"when": [{"key": "request.auth.audiences", "values": ["a"]}]}),
        ),
        (
            "request.auth.presenter",
            json!({"when": [{"key": "request.auth.presenter", "values": ["a"]}]}),
        ),
        (
            "remote.ip",
            json!({"when": [{"key": "remote.ip", "values": ["10.0.0.0/8"]}]}),
        ),
        (
            "connection.sni",
            json!({"when": [{"key": "connection.sni", "values": ["a"]}]}),
        ),
        (
            "experimental.envoy.filters.a[b]",
            json!({"when": [{"key": "experimental.envoy.filters.a[b]", "values": ["a"]}]}),
        ),
    ];
    for (field, rule) in cases {
        // ALLOW and AUDIT: the rule is dropped (never matches).
        for action in ["ALLOW", "AUDIT"] {
            let set = compile(&[ap(
                "app",
                "p",
                json!({"action": action, "rules": [rule.clone()]}),
            )]);
            assert!(
                set.errors().is_empty(),
                "{field} {action}: {:?}",
                set.errors()
            );
            let v = set.authorize_verbose(&conn_a(), &server());
            let want = if action == "ALLOW" {
                no_allow()
            } else {
                Decision::Allow
            };
            assert_eq!(v.decision, want, "{field} {action}");
            assert!(v.audited.is_empty(), "{field} {action}");
            let r = report_of(&set, "AuthorizationPolicy/app/p");
            assert!(
                r.warnings
                    .iter()
                    .any(|w| w.contains(&format!("uses {field}")) && w.contains("dropped")),
                "{field} {action}: {:?}",
                r.warnings
            );
        }
        // DENY: enforced without the HTTP part, so it denies more (here: everything).
        let set = compile(&[ap(
            "app",
            "p",
            json!({"action": "DENY", "rules": [rule.clone()]}),
        )]);
        assert!(set.errors().is_empty(), "{field} DENY: {:?}", set.errors());
        assert_eq!(
            set.authorize(&conn_a(), &server()),
            deny("app/p"),
            "{field} DENY"
        );
        let r = report_of(&set, "AuthorizationPolicy/app/p");
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains(&format!("uses {field}")) && w.contains("denies more")),
            "{field} DENY: {:?}",
            r.warnings
        );
    }
}

#[test]
fn deny_rule_keeps_its_l4_fields() {
    let set = compile(&[ap(
        "app",
        "p",
        json!({"action": "DENY", "rules": [{
            "from": [{"source": {"namespaces": ["frontend"], "requestPrincipals": ["*"]}}],
            "to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]
        }]}),
    )]);
    assert_eq!(set.authorize(&conn_a(), &server()), deny("app/p"));
    assert_eq!(
        set.authorize(&mtls("frontend", "web", "10.2.0.5", 9090), &server()),
        Decision::Allow
    );
    assert_eq!(set.authorize(&conn_b(), &server()), Decision::Allow);
    let r = report_of(&set, "AuthorizationPolicy/app/p");
    assert!(
        r.warnings[0].contains("uses requestPrincipals, methods"),
        "{:?}",
        r.warnings
    );
}

#[test]
fn waypoint_and_custom_policies_are_reported_not_enforced() {
    let set = compile(&[
        ap(
            "app",
            "waypoint",
            json!({"action": "DENY", "targetRefs": [{"kind": "Service", "group": "", "name": "server"}], "rules": [{}]}),
        ),
        ap(
            "app",
            "waypoint-old",
            json!({"action": "DENY", "targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}, "rules": [{}]}),
        ),
        ap(
            "app",
            "ext",
            json!({"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}),
        ),
    ]);
    assert!(set.errors().is_empty(), "{:?}", set.errors());
    assert_eq!(set.authorize(&conn_a(), &server()), Decision::Allow);
    for key in [
        "AuthorizationPolicy/app/waypoint",
        "AuthorizationPolicy/app/waypoint-old",
    ] {
        let r = report_of(&set, key);
        assert_eq!(r.status, PolicyStatus::NotEnforced, "{key}");
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("enforced by waypoint, not at L4")),
            "{key}: {:?}",
            r.warnings
        );
    }
    let r = report_of(&set, "AuthorizationPolicy/app/ext");
    assert_eq!(r.status, PolicyStatus::NotEnforced);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("CUSTOM") && w.contains("NOT enforced")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn other_kinds_are_reported() {
    let set = compile(&[policy(
        "RequestAuthentication",
        "app",
        "jwt",
        json!({"jwtRules": []}),
    )]);
    assert!(set.errors().is_empty());
    let r = report_of(&set, "RequestAuthentication/app/jwt");
    assert_eq!(r.status, PolicyStatus::NotEnforced);
    assert!(r.warnings[0].contains("NOT enforced"));
}

#[test]
fn spiffe_prefixed_principal_is_accepted_with_a_warning() {
    let set = compile(&[ap(
        "app",
        "p",
        json!({"rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/frontend/sa/web"]}}]}]}),
    )]);
    assert_eq!(set.authorize(&conn_a(), &server()), Decision::Allow);
    assert!(report_of(&set, "AuthorizationPolicy/app/p").warnings[0].contains("spiffe://"));
}

// ---------------------------------------------------------------------------------------------
// Rejected policies.
// ---------------------------------------------------------------------------------------------

#[test]
#[rustfmt::skip]
fn invalid_authorization_policies_are_rejected_naming_resource_and_field() {
    let src = |s: Value| json!({"rules": [{"from": [{"source": s}]}]});
    let cases: Vec<(&str, Value, &str)> = vec![
        ("unknown action", json!({"action": "ALOW", "rules": [{}]}), r#"AuthorizationPolicy app/bad: spec.action: unknown action "ALOW""#),
        ("action not a string", json!({"action": 1}), "AuthorizationPolicy app/bad: spec.action: expected a string"),
        ("matchLabels not an object", json!({"selector": {"matchLabels": ["app"]}}), "AuthorizationPolicy app/bad: spec.selector.matchLabels: expected an object"),
        ("label value not a string", json!({"selector": {"matchLabels": {"app": 1}}}), "AuthorizationPolicy app/bad: spec.selector.matchLabels.app: expected a string"),
        ("wildcard label", json!({"selector": {"matchLabels": {"app": "*"}}}), "AuthorizationPolicy app/bad: spec.selector.matchLabels.app: wildcard"),
        ("empty label key", json!({"selector": {"matchLabels": {"": "x"}}}), "spec.selector.matchLabels.: empty key"),
        ("matchExpressions", json!({"selector": {"matchExpressions": []}}), "AuthorizationPolicy app/bad: spec.selector.matchExpressions: unknown field"),
        ("selector and targetRefs", json!({"selector": {"matchLabels": {"a": "b"}}, "targetRefs": [{"kind": "Service", "name": "x"}]}), "spec.targetRefs: only one of targetRefs or workloadSelector"),
        ("bad CIDR", src(json!({"ipBlocks": ["10.0.0.0/33"]})), "AuthorizationPolicy app/bad: spec.rules[0].from[0].source.ipBlocks[0]: bad CIDR range"),
        ("bad IP", src(json!({"notIpBlocks": ["10.0.0.300"]})), "spec.rules[0].from[0].source.notIpBlocks[0]: bad IP address"),
        ("bad remote IP", src(json!({"remoteIpBlocks": ["nope"]})), "spec.rules[0].from[0].source.remoteIpBlocks[0]: bad IP address"),
        ("bad port", json!({"rules": [{"to": [{"operation": {"ports": ["80a"]}}]}]}), "AuthorizationPolicy app/bad: spec.rules[0].to[0].operation.ports[0]: bad port"),
        ("port out of range", json!({"rules": [{"to": [{"operation": {"notPorts": ["70000"]}}]}]}), "spec.rules[0].to[0].operation.notPorts[0]: bad port"),
        ("port as number", json!({"rules": [{"to": [{"operation": {"ports": [8080]}}]}]}), "spec.rules[0].to[0].operation.ports[0]: expected a string"),
        ("unknown source field", src(json!({"principal": ["x"]})), "spec.rules[0].from[0].source.principal: unknown field"),
        ("unknown rule field", json!({"rules": [{"form": []}]}), "spec.rules[0].form: unknown field"),
        ("unknown spec field", json!({"rule": []}), "spec.rule: unknown field"),
        ("empty source", src(json!({})), "spec.rules[0].from[0].source: `from.source` must not be empty"),
        ("null source", json!({"rules": [{"from": [{}]}]}), "spec.rules[0].from[0].source: `from.source` must not be null"),
        ("empty from", json!({"rules": [{"from": []}]}), "spec.rules[0].from: `from` must not be empty"),
        ("empty to", json!({"rules": [{"to": []}]}), "spec.rules[0].to: `to` must not be empty"),
        ("empty operation", json!({"rules": [{"to": [{"operation": {}}]}]}), "spec.rules[0].to[0].operation: `to.operation` must not be empty"),
        ("null rule", json!({"rules": [null]}), "spec.rules[0]: `rule` must not be null"),
        ("empty value", src(json!({"principals": [""]})), "spec.rules[0].from[0].source.principals[0]: empty value not allowed"),
        ("serviceAccounts with namespaces", src(json!({"serviceAccounts": ["a/b"], "namespaces": ["a"]})), "cannot set serviceAccounts with namespaces or principals"),
        ("serviceAccounts format", src(json!({"serviceAccounts": ["a/b/c"]})), "spec.rules[0].from[0].source.serviceAccounts[0]: expected format"),
        ("serviceAccounts wildcard", src(json!({"notServiceAccounts": ["a/*"]})), "spec.rules[0].from[0].source.notServiceAccounts[0]: wildcard not allowed"),
        ("unknown condition key", json!({"rules": [{"when": [{"key": "source.foo", "values": ["x"]}]}]}), "spec.rules[0].when[0].key: unknown attribute: source.foo"),
        ("condition without values", json!({"rules": [{"when": [{"key": "source.ip"}]}]}), "spec.rules[0].when[0]: at least one of `values` or `notValues`"),
        ("empty condition key", json!({"rules": [{"when": [{"key": "", "values": ["x"]}]}]}), "spec.rules[0].when[0].key: `key` must not be empty"),
        ("bad destination.port", json!({"rules": [{"when": [{"key": "destination.port", "notValues": ["x"]}]}]}), "spec.rules[0].when[0].notValues[0]: bad port"),
        ("bad source.ip", json!({"rules": [{"when": [{"key": "source.ip", "values": ["1.2.3.4/40"]}]}]}), "spec.rules[0].when[0].values[0]: bad CIDR"),
        ("destination.labels", json!({"rules": [{"when": [{"key": "destination.labels[app]", "values": ["x"]}]}]}), "replaced by the workload selector"),
        ("bad header key", json!({"rules": [{"when": [{"key": "request.headers", "values": ["x"]}]}]}), "spec.rules[0].when[0].key: bad key"),
        ("DENY without rules", json!({"action": "DENY"}), "AuthorizationPolicy app/bad: spec.rules: DENY action without `rules`"),
        ("provider with ALLOW", json!({"provider": {"name": "x"}, "rules": [{}]}), "spec.provider: `provider` must not be set"),
        ("CUSTOM without provider", json!({"action": "CUSTOM", "rules": [{}]}), "spec.provider.name: `provider.name` must not be empty"),
        ("rules not a list", json!({"rules": {}}), "spec.rules: expected a list"),
    ];
    for (name, spec, want) in cases {
        let set = compile(&[ap("app", "bad", spec)]);
        let errors = set.errors();
        assert!(errors.iter().any(|e| e.contains(want)), "{name}: want {want:?} in {errors:?}");
        let r = report_of(&set, "AuthorizationPolicy/app/bad");
        assert_eq!(r.status, PolicyStatus::Rejected, "{name}");
        assert!(r.effective.is_none(), "{name}");
        // Not applied at all: no policy applies, so everything is allowed.
        assert_eq!(set.applicable(&server()).count(), 0, "{name}");
        assert_eq!(set.authorize(&conn_a(), &server()), Decision::Allow, "{name}");
    }
}

#[test]
fn malformed_spec_json_is_rejected() {
    let mut p = ap("app", "bad", json!({}));
    p.spec_json = "{not json".into();
    let set = compile(&[p]);
    assert!(
        set.errors()[0].starts_with("AuthorizationPolicy app/bad: spec: invalid JSON"),
        "{:?}",
        set.errors()
    );
    let mut p = ap("app", "bad", json!({}));
    p.spec_json = "[]".into();
    assert!(compile(&[p]).errors()[0].contains("spec: expected an object"));
}

#[test]
fn a_rejected_policy_does_not_affect_valid_ones() {
    let set = compile(&[
        ap("app", "bad", json!({"action": "ALOW"})),
        ap(
            "app",
            "good",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["frontend"]}}]}]}),
        ),
    ]);
    assert_eq!(set.errors().len(), 1);
    assert_eq!(set.authorize(&conn_a(), &server()), deny("app/good"));
    assert_eq!(set.authorize(&conn_b(), &server()), Decision::Allow);
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication.
// ---------------------------------------------------------------------------------------------

fn mode(m: &str) -> Value {
    json!({"mtls": {"mode": m}})
}

fn selected(labels: Value, mode: &str, ports: Value) -> Value {
    json!({"selector": {"matchLabels": labels}, "mtls": {"mode": mode}, "portLevelMtls": ports})
}

#[test]
fn peer_authentication_levels() {
    use MtlsMode::{Permissive as P, Strict as S};
    let other = || wl("app", "other", &[("app", "other")]);
    let ns2 = || wl("ns2", "x", &[("app", "server")]);
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Vec<Policy>, Vec<(Workload, u16, MtlsMode)>)> = vec![
        ("default is permissive", vec![], vec![(server(), 8080, P)]),
        (
            "mesh STRICT",
            vec![pa(ROOT, "default", mode("STRICT"))],
            vec![(server(), 8080, S), (ns2(), 1, S)],
        ),
        (
            "mesh UNSET is permissive",
            vec![pa(ROOT, "default", json!({}))],
            vec![(server(), 8080, P)],
        ),
        (
            "namespace overrides mesh",
            vec![
                pa(ROOT, "default", mode("STRICT")),
                pa("app", "ns", mode("PERMISSIVE")),
            ],
            vec![(server(), 8080, P), (ns2(), 8080, S)],
        ),
        (
            "namespace UNSET inherits mesh",
            vec![
                pa(ROOT, "default", mode("STRICT")),
                pa("app", "ns", json!({"mtls": {}})),
            ],
            vec![(server(), 8080, S)],
        ),
        (
            "namespace without mtls inherits mesh",
            vec![
                pa(ROOT, "default", mode("STRICT")),
                pa("app", "ns", json!({})),
            ],
            vec![(server(), 8080, S)],
        ),
        (
            "workload overrides namespace",
            vec![
                pa(ROOT, "default", mode("PERMISSIVE")),
                pa("app", "ns", mode("STRICT")),
                pa(
                    "app",
                    "wl",
                    json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "PERMISSIVE"}}),
                ),
            ],
            vec![(server(), 8080, P), (other(), 8080, S)],
        ),
        (
            "workload UNSET inherits namespace",
            vec![
                pa("app", "ns", mode("STRICT")),
                pa(
                    "app",
                    "wl",
                    json!({"selector": {"matchLabels": {"app": "server"}}}),
                ),
            ],
            vec![(server(), 8080, S)],
        ),
        (
            "workload selector only in its namespace",
            vec![pa(
                "app",
                "wl",
                json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "STRICT"}}),
            )],
            vec![(server(), 8080, S), (ns2(), 8080, P)],
        ),
        (
            "port-level PERMISSIVE under workload STRICT",
            vec![pa(
                "app",
                "wl",
                selected(
                    json!({"app": "server"}),
                    "STRICT",
                    json!({"8080": {"mode": "PERMISSIVE"}}),
                ),
            )],
            vec![(server(), 8080, P), (server(), 9090, S)],
        ),
        (
            "port-level PERMISSIVE under inherited namespace STRICT",
            vec![
                pa("app", "ns", mode("STRICT")),
                pa(
                    "app",
                    "wl",
                    selected(
                        json!({"app": "server"}),
                        "UNSET",
                        json!({"8080": {"mode": "PERMISSIVE"}}),
                    ),
                ),
            ],
            vec![(server(), 8080, P), (server(), 9090, S), (other(), 8080, S)],
        ),
        (
            "port-level STRICT under workload PERMISSIVE",
            vec![
                pa(ROOT, "default", mode("STRICT")),
                pa(
                    "app",
                    "wl",
                    selected(
                        json!({"app": "server"}),
                        "PERMISSIVE",
                        json!({"8080": {"mode": "STRICT"}}),
                    ),
                ),
            ],
            vec![(server(), 8080, S), (server(), 9090, P)],
        ),
        (
            "port-level UNSET inherits workload",
            vec![pa(
                "app",
                "wl",
                selected(
                    json!({"app": "server"}),
                    "STRICT",
                    json!({"8080": {"mode": "UNSET"}, "9090": {}}),
                ),
            )],
            vec![(server(), 8080, S), (server(), 9090, S)],
        ),
        (
            "mesh DISABLE behaves as permissive",
            vec![pa(ROOT, "default", mode("DISABLE"))],
            vec![(server(), 8080, P)],
        ),
        (
            "workload DISABLE behaves as permissive",
            vec![
                pa("app", "ns", mode("STRICT")),
                pa(
                    "app",
                    "wl",
                    json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "DISABLE"}}),
                ),
            ],
            vec![(server(), 8080, P)],
        ),
        (
            "port DISABLE behaves as permissive",
            vec![
                pa("app", "ns", mode("STRICT")),
                pa(
                    "app",
                    "wl",
                    selected(
                        json!({"app": "server"}),
                        "UNSET",
                        json!({"8080": {"mode": "DISABLE"}}),
                    ),
                ),
            ],
            vec![(server(), 8080, P), (server(), 9090, S)],
        ),
        (
            "portLevelMtls without selector is ignored",
            vec![pa(
                "app",
                "ns",
                json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
            )],
            vec![(server(), 8080, S)],
        ),
        (
            "root namespace selector is ignored",
            vec![pa(
                ROOT,
                "sel",
                json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "STRICT"}}),
            )],
            vec![
                (server(), 8080, P),
                (wl(ROOT, "x", &[("app", "server")]), 8080, P),
            ],
        ),
        (
            "root namespace workloads use the mesh policy",
            vec![pa(ROOT, "default", mode("STRICT"))],
            vec![(wl(ROOT, "x", &[]), 8080, S)],
        ),
        (
            "first workload policy by name wins",
            vec![
                pa(
                    "app",
                    "b",
                    json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "PERMISSIVE"}}),
                ),
                pa(
                    "app",
                    "a",
                    json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "STRICT"}}),
                ),
            ],
            vec![(server(), 8080, S)],
        ),
    ];
    for (name, policies, checks) in cases {
        let set = compile(&policies);
        assert!(set.errors().is_empty(), "{name}: {:?}", set.errors());
        for (dst, port, want) in checks {
            assert_eq!(
                set.mtls_mode(&dst, port),
                want,
                "{name}: {} port {port}",
                dst.uid
            );
        }
    }
}

#[test]
fn peer_authentication_reports() {
    let set = compile(&[
        pa(ROOT, "default", mode("DISABLE")),
        pa(
            "app",
            "ns",
            json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
        ),
        pa(
            "app",
            "wl",
            selected(
                json!({"app": "server"}),
                "UNSET",
                json!({"9090": {"mode": "DISABLE"}}),
            ),
        ),
        pa(
            ROOT,
            "sel",
            json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "STRICT"}}),
        ),
        pa("ns2", "a", mode("STRICT")),
        pa("ns2", "b", mode("PERMISSIVE")),
    ]);
    assert!(set.errors().is_empty(), "{:?}", set.errors());
    let r = report_of(&set, "PeerAuthentication/istio-system/default");
    assert_eq!(r.status, PolicyStatus::Enforced);
    assert!(
        r.warnings[0]
            .starts_with("PeerAuthentication istio-system/default: spec.mtls.mode: DISABLE"),
        "{:?}",
        r.warnings
    );
    let r = report_of(&set, "PeerAuthentication/app/ns");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("spec.portLevelMtls") && w.contains("ignored")),
        "{:?}",
        r.warnings
    );
    let r = report_of(&set, "PeerAuthentication/app/wl");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("spec.portLevelMtls[\"9090\"].mode: DISABLE")),
        "{:?}",
        r.warnings
    );
    let r = report_of(&set, "PeerAuthentication/istio-system/sel");
    assert_eq!(r.status, PolicyStatus::NotEnforced);
    assert!(r.warnings[0].contains("NOT applied"), "{:?}", r.warnings);
    // Two namespace-level policies: the first by name applies; the other is reported.
    assert_eq!(
        report_of(&set, "PeerAuthentication/ns2/a").status,
        PolicyStatus::Enforced
    );
    let r = report_of(&set, "PeerAuthentication/ns2/b");
    assert_eq!(r.status, PolicyStatus::NotEnforced);
    assert!(
        r.warnings.iter().any(|w| w.contains("ns2/a")),
        "{:?}",
        r.warnings
    );
    assert_eq!(set.mtls_mode(&wl("ns2", "x", &[]), 1), MtlsMode::Strict);
    let dump = serde_json::to_value(set.reports()).unwrap();
    assert!(
        dump.as_array()
            .unwrap()
            .iter()
            .any(|r| r["effective"]["portLevelMtls"]["9090"] == json!("DISABLE")),
        "{dump}"
    );
}

#[test]
fn invalid_peer_authentications_are_rejected() {
    let cases: Vec<(Value, &str)> = vec![
        (
            mode("STRCT"),
            r#"PeerAuthentication app/bad: spec.mtls.mode: unknown mode "STRCT""#,
        ),
        (
            json!({"mtls": {"mode": 3}}),
            "PeerAuthentication app/bad: spec.mtls.mode: expected a string",
        ),
        (json!({"mtls": "STRICT"}), "spec.mtls: expected an object"),
        (
            json!({"mtls": {"mod": "STRICT"}}),
            "spec.mtls.mod: unknown field",
        ),
        (
            selected(
                json!({"app": "server"}),
                "STRICT",
                json!({"0": {"mode": "STRICT"}}),
            ),
            r#"spec.portLevelMtls["0"]: port must be in range 1..65535"#,
        ),
        (
            selected(
                json!({"app": "server"}),
                "STRICT",
                json!({"http": {"mode": "STRICT"}}),
            ),
            r#"spec.portLevelMtls["http"]: port must be in range"#,
        ),
        (
            selected(
                json!({"app": "server"}),
                "STRICT",
                json!({"8080": {"mode": "NOPE"}}),
            ),
            r#"spec.portLevelMtls["8080"].mode: unknown mode "NOPE""#,
        ),
        (
            selected(json!({"app": "server"}), "STRICT", json!({})),
            "spec.portLevelMtls: port level mTLS, if defined, must have at least one element",
        ),
        (
            json!({"selector": {"matchLabels": {"app": ["x"]}}, "mtls": {"mode": "STRICT"}}),
            "spec.selector.matchLabels.app: expected a string",
        ),
    ];
    for (spec, want) in cases {
        let set = compile(&[pa("app", "bad", spec)]);
        let errors = set.errors();
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "want {want:?} in {errors:?}"
        );
        assert_eq!(
            report_of(&set, "PeerAuthentication/app/bad").status,
            PolicyStatus::Rejected
        );
        // Not applied: default PERMISSIVE.
        assert_eq!(
            set.mtls_mode(&server(), 8080),
            MtlsMode::Permissive,
            "{want}"
        );
    }
}

#[test]
fn strict_mtls_refuses_plaintext_in_authorize() {
    let set = compile(&[
        pa("app", "ns", mode("STRICT")),
        pa(
            "app",
            "wl",
            selected(
                json!({"app": "server"}),
                "UNSET",
                json!({"8080": {"mode": "PERMISSIVE"}}),
            ),
        ),
    ]);
    let d = set.authorize(&plain("10.2.0.5", 9090), &server());
    assert_eq!(
        d,
        deny("app/ns (PeerAuthentication STRICT: plaintext refused)")
    );
    assert_eq!(
        set.authorize(&plain("10.2.0.5", 8080), &server()),
        Decision::Allow
    );
    assert_eq!(
        set.authorize(&mtls("frontend", "web", "10.2.0.5", 9090), &server()),
        Decision::Allow
    );
    assert_eq!(
        set.mtls_mode_verbose(&server(), 8080),
        (MtlsMode::Permissive, Some("app/wl"))
    );
    assert_eq!(
        set.mtls_mode_verbose(&server(), 9090),
        (MtlsMode::Strict, Some("app/ns"))
    );
}

// ---------------------------------------------------------------------------------------------
// Addresses.
// ---------------------------------------------------------------------------------------------

#[test]
fn ipv6_and_v4_mapped_addresses() {
    let set = compile(&[
        ap(
            "app",
            "deny-v6",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["2001:db8::/32"]}}]}]}),
        ),
        ap(
            "app",
            "deny-v4",
            json!({"action": "DENY", "rules": [{"when": [{"key": "source.ip", "values": ["192.0.2.0/24"]}]}]}),
        ),
        ap(
            "app",
            "deny-dst",
            json!({"action": "DENY", "rules": [{"when": [{"key": "destination.ip", "values": ["10.1.0.99"]}]}]}),
        ),
    ]);
    assert!(set.errors().is_empty(), "{:?}", set.errors());
    let dst = server();
    let cases: Vec<(Connection, Decision)> = vec![
        (mtls("a", "b", "2001:db8::1", 80), deny("app/deny-v6")),
        (mtls("a", "b", "2001:db9::1", 80), Decision::Allow),
        (plain("192.0.2.7", 80), deny("app/deny-v4")),
        (plain("::ffff:192.0.2.7", 80), deny("app/deny-v4")),
        (plain("::ffff:192.0.3.7", 80), Decision::Allow),
        // A v6 range that is not v4-mapped does not match v4 peers.
        (plain("198.51.100.1", 80), Decision::Allow),
        (
            Connection {
                dst_ip: "::ffff:10.1.0.99".parse().unwrap(),
                ..conn_a()
            },
            deny("app/deny-dst"),
        ),
    ];
    for (conn, want) in cases {
        assert_eq!(set.authorize(&conn, &dst), want, "{conn:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Decision cache.
// ---------------------------------------------------------------------------------------------

#[test]
fn decision_cache_hits_and_invalidates() {
    let allow_frontend = ap(
        "app",
        "p",
        json!({"rules": [{"from": [{"source": {"namespaces": ["frontend"]}}]}]}),
    );
    let set1 = compile(std::slice::from_ref(&allow_frontend));
    let cache = DecisionCache::new(1024);
    let dst = server();

    assert_eq!(cache.authorize(&set1, &conn_a(), &dst), Decision::Allow);
    assert_eq!(cache.authorize(&set1, &conn_a(), &dst), Decision::Allow);
    let s = cache.stats();
    assert_eq!(
        (s.hits, s.misses, s.entries, s.generation),
        (1, 1, 1, set1.generation())
    );

    // A different source IP is a different key.
    assert_eq!(
        cache.authorize(&set1, &mtls("frontend", "web", "10.2.0.6", 8080), &dst),
        Decision::Allow
    );
    assert_eq!(cache.stats().misses, 2);

    // A relabelled destination is a different key, even with the same uid.
    let relabelled = wl("app", "server", &[("app", "server"), ("v", "2")]);
    cache.authorize(&set1, &conn_a(), &relabelled);
    assert_eq!(cache.stats().misses, 3);

    // A new PolicySet drops everything cached under the old one.
    let set2 = compile(&[
        allow_frontend,
        ap(
            "app",
            "deny",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}),
        ),
    ]);
    assert_ne!(set1.generation(), set2.generation());
    assert_eq!(cache.authorize(&set2, &conn_a(), &dst), deny("app/deny"));
    let s = cache.stats();
    assert_eq!((s.entries, s.generation), (1, set2.generation()));
    assert_eq!(cache.authorize(&set2, &conn_a(), &dst), deny("app/deny"));
    assert_eq!(cache.stats().hits, 2);

    // Audits survive caching.
    let set3 = compile(&[ap(
        "app",
        "audit",
        json!({"action": "AUDIT", "rules": [{}]}),
    )]);
    for _ in 0..2 {
        assert_eq!(
            cache.authorize_verbose(&set3, &conn_a(), &dst).audited,
            vec!["app/audit".to_string()]
        );
    }

    // Capacity bounds the cache.
    let small = DecisionCache::new(2);
    for port in 1..=5 {
        small.authorize(&set1, &mtls("frontend", "web", "10.2.0.5", port), &dst);
    }
    assert!(small.stats().entries <= 2);
    small.clear();
    assert_eq!(small.stats().entries, 0);
}

// ---------------------------------------------------------------------------------------------
// Scale.
// ---------------------------------------------------------------------------------------------

#[test]
fn ten_thousand_policies_compile_and_evaluate() {
    // 100 namespaces × (99 selector ALLOW policies + 1 namespace-wide DENY), plus one mesh-wide
    // DENY: 10,001 policies.
    let mut policies = Vec::with_capacity(10_000);
    for n in 0..100 {
        let ns = format!("ns{n}");
        for s in 0..99 {
            policies.push(ap(
                &ns,
                &format!("allow-svc{s}"),
                json!({
                    "selector": {"matchLabels": {"app": format!("svc{s}")}},
                    "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/{ns}/sa/client{s}")]}}],
                               "to": [{"operation": {"ports": ["8080"]}}]}]
                }),
            ));
        }
        policies.push(ap(
            &ns,
            "deny-9999",
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9999"]}}]}]}),
        ));
    }
    policies.push(ap(
        ROOT,
        "deny-blocked",
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["blocked"]}}]}]}),
    ));
    assert_eq!(policies.len(), 10_001);

    let set = compile(&policies);
    assert!(set.errors().is_empty());
    assert_eq!(set.reports().len(), policies.len());
    assert!(
        set.reports()
            .iter()
            .all(|r| r.status == PolicyStatus::Enforced)
    );

    let dst = wl("ns42", "svc7", &[("app", "svc7"), ("version", "v1")]);
    // Only its own ALLOW, its namespace's DENY and the mesh DENY are candidates.
    let applicable: Vec<String> = set.applicable(&dst).map(|a| a.key.clone()).collect();
    assert_eq!(
        applicable,
        vec![
            "istio-system/deny-blocked",
            "ns42/allow-svc7",
            "ns42/deny-9999"
        ]
    );

    let cache = DecisionCache::default();
    let cases: Vec<(Connection, Decision)> = vec![
        (mtls("ns42", "client7", "10.0.0.1", 8080), Decision::Allow),
        (mtls("ns42", "client8", "10.0.0.1", 8080), no_allow()),
        (mtls("ns41", "client7", "10.0.0.1", 8080), no_allow()),
        (mtls("ns42", "client7", "10.0.0.1", 8081), no_allow()),
        (
            mtls("ns42", "client7", "10.0.0.1", 9999),
            deny("ns42/deny-9999"),
        ),
        (
            mtls("blocked", "client7", "10.0.0.1", 8080),
            deny("istio-system/deny-blocked"),
        ),
        (plain("10.0.0.1", 8080), no_allow()),
    ];
    for _ in 0..2 {
        for (conn, want) in &cases {
            assert_eq!(&set.authorize(conn, &dst), want, "{conn:?}");
            assert_eq!(&cache.authorize(&set, conn, &dst), want, "cached {conn:?}");
        }
    }
    assert_eq!(cache.stats().hits, cases.len() as u64);

    // A workload no selector picks: only DENY policies apply, so allowed unless denied.
    let unselected = wl("ns42", "x", &[("app", "none")]);
    assert_eq!(
        set.authorize(&mtls("a", "b", "10.0.0.1", 8080), &unselected),
        Decision::Allow
    );
    assert_eq!(
        set.authorize(&mtls("a", "b", "10.0.0.1", 9999), &unselected),
        deny("ns42/deny-9999")
    );

    // Every namespace's selector policies are independent.
    for n in [0, 57, 99] {
        let dst = wl(&format!("ns{n}"), "svc98", &[("app", "svc98")]);
        assert_eq!(
            set.authorize(&mtls(&format!("ns{n}"), "client98", "10.0.0.1", 8080), &dst),
            Decision::Allow
        );
        assert_eq!(
            set.authorize(&mtls("ns0", "client97", "10.0.0.1", 8080), &dst),
            no_allow()
        );
    }
}

#[test]
fn reports_serialize_for_the_config_dump() {
    let set = compile(&[ap(
        "app",
        "p",
        json!({"action": "DENY", "selector": {"matchLabels": {"app": "server"}}, "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/a/*"], "ipBlocks": ["10.0.0.0/8", "::ffff:1.2.3.4"]}}],
            "to": [{"operation": {"notPorts": ["22"]}}],
            "when": [{"key": "destination.ip", "notValues": ["fd00::/8"]}]
        }]}),
    )]);
    let dump = serde_json::to_value(set.reports()).unwrap();
    let eff = &dump[0]["effective"];
    assert_eq!(dump[0]["status"], json!("Enforced"));
    assert_eq!(eff["action"], json!("DENY"));
    assert_eq!(eff["scope"], json!({"workloadSelector": {"app": "server"}}));
    assert_eq!(
        eff["rules"][0]["clauses"],
        json!([
            [{"principals": [{"prefix": "cluster.local/ns/a/"}], "sourceIps": ["10.0.0.0/8", "1.2.3.4/32"]}],
            [{"notDestinationPorts": [22]}],
            [{"notDestinationIps": ["fd00::/8"]}]
        ])
    );
}
