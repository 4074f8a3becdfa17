//! The L7 side of the policy engine as a waypoint uses it: AuthorizationPolicy attached with
//! `targetRefs`, evaluated per request (every supported field, as ALLOW, DENY and AUDIT), and
//! RequestAuthentication's JWT verification (valid, expired, wrong issuer, wrong audience, bad
//! signature, missing).
//!
//! Owns only these tests.

use std::net::IpAddr;
use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshcore::Identity;
use meshcore::policy::jwt::{Authn, Claims, authenticate};
use meshcore::policy::{
    Connection, Decision, NO_ALLOW_MATCHED, PolicySet, PolicyStatus, Request, WaypointTarget,
};
use meshcore::proto::config::Policy;
use serde_json::{Value, json};

const ROOT: &str = "istio-system";

fn policy(kind: &str, ns: &str, name: &str, spec: Value) -> Policy {
    Policy {
        key: format!("{kind}/{ns}/{name}"),
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
        spec_json: spec.to_string(),
    }
}

fn gateway_ref() -> Value {
    json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "wp"}])
}

/// One request at waypoint `app/wp`, addressed to Service `app/web`.
#[derive(Clone)]
struct Req {
    identity: Option<Identity>,
    src_ip: &'static str,
    dst_ip: &'static str,
    dst_port: u16,
    method: &'static str,
    host: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    sni: Option<&'static str>,
    claims: Option<Claims>,
}

fn base() -> Req {
    Req {
        identity: Some(Identity::new("cluster.local", "client", "cli")),
        src_ip: "10.0.0.5",
        dst_ip: "10.96.0.10",
        dst_port: 80,
        method: "GET",
        host: "web.app.svc.cluster.local",
        path: "/api/v1/items",
        headers: vec![],
        sni: None,
        claims: None,
    }
}

fn alice() -> Claims {
    let payload = json!({
        "iss": "https://issuer.example", "sub": "alice", "aud": ["web", "api"], "azp": "spa",
        "groups": ["admins", "dev"], "org": {"role": "owner"}
    });
    Claims {
        principal: "https://issuer.example/alice".into(),
        audiences: vec!["web".into(), "api".into()],
        presenter: Some("spa".into()),
        payload: payload.as_object().unwrap().clone(),
    }
}

fn decide(set: &PolicySet, r: &Req, service: &str) -> meshcore::policy::Verdict {
    let mut headers = http::HeaderMap::new();
    for (k, v) in &r.headers {
        headers.append(
            http::HeaderName::from_static(k),
            http::HeaderValue::from_static(v),
        );
    }
    let conn = Connection {
        src_identity: r.identity.clone().map(Into::into),
        src_ip: r.src_ip.parse::<IpAddr>().unwrap(),
        dst_ip: r.dst_ip.parse().unwrap(),
        dst_port: r.dst_port,
    };
    let req = Request {
        method: r.method,
        host: r.host,
        path: r.path,
        headers: &headers,
        remote_ip: conn.src_ip,
        sni: r.sni,
        auth: r.claims.as_ref(),
    };
    let at = WaypointTarget {
        gateway_namespace: "app",
        gateway_name: "wp",
        service: Some(("app", service)),
    };
    set.authorize_request(&at, &conn, &req)
}

type Edit = fn(&mut Req);

/// (what, rule, a request that matches, one that does not).
fn rows() -> Vec<(&'static str, Value, Edit, Edit)> {
    fn id(r: &mut Req) {
        let _ = r;
    }
    fn other_id(r: &mut Req) {
        r.identity = Some(Identity::new("cluster.local", "evil", "x"));
    }
    fn no_id(r: &mut Req) {
        r.identity = None;
    }
    fn jwt(r: &mut Req) {
        r.claims = Some(alice());
    }
    fn other_ip(r: &mut Req) {
        r.src_ip = "192.168.1.1";
    }
    let src = |s: Value| json!({"from": [{"source": s}]});
    let op = |o: Value| json!({"to": [{"operation": o}]});
    let when = |key: &str, values: Value| json!({"when": [{"key": key, "values": values}]});
    let when_not = |key: &str, values: Value| json!({"when": [{"key": key, "notValues": values}]});
    vec![
        (
            "principals",
            src(json!({"principals": ["cluster.local/ns/client/sa/cli"]})),
            id,
            other_id,
        ),
        (
            "principals prefix",
            src(json!({"principals": ["cluster.local/ns/client/*"]})),
            id,
            no_id,
        ),
        (
            "notPrincipals",
            src(json!({"notPrincipals": ["cluster.local/ns/client/*"]})),
            other_id,
            id,
        ),
        (
            "namespaces",
            src(json!({"namespaces": ["client"]})),
            id,
            other_id,
        ),
        (
            "notNamespaces",
            src(json!({"notNamespaces": ["client"]})),
            other_id,
            id,
        ),
        (
            "serviceAccounts",
            src(json!({"serviceAccounts": ["client/cli"]})),
            id,
            other_id,
        ),
        (
            "notServiceAccounts",
            src(json!({"notServiceAccounts": ["client/cli"]})),
            other_id,
            id,
        ),
        (
            "ipBlocks",
            src(json!({"ipBlocks": ["10.0.0.0/24"]})),
            id,
            other_ip,
        ),
        (
            "notIpBlocks",
            src(json!({"notIpBlocks": ["10.0.0.0/24"]})),
            other_ip,
            id,
        ),
        (
            "remoteIpBlocks",
            src(json!({"remoteIpBlocks": ["10.0.0.5"]})),
            id,
            other_ip,
        ),
        (
            "notRemoteIpBlocks",
            src(json!({"notRemoteIpBlocks": ["10.0.0.5"]})),
            other_ip,
            id,
        ),
        (
            "requestPrincipals",
            src(json!({"requestPrincipals": ["https://issuer.example/alice"]})),
            jwt,
            |r| {
                let mut c = alice();
                c.principal = "https://issuer.example/bob".into();
                r.claims = Some(c)
            },
        ),
        (
            "requestPrincipals *",
            src(json!({"requestPrincipals": ["*"]})),
            jwt,
            id,
        ),
        (
            "notRequestPrincipals",
            src(json!({"notRequestPrincipals": ["*"]})),
            id,
            jwt,
        ),
        (
            "hosts (any case, any port)",
            op(json!({"hosts": ["web.app.svc.cluster.local"]})),
            |r| r.host = "WEB.app.svc.cluster.local:80",
            |r| r.host = "web.app.svc.cluster.local.evil",
        ),
        (
            "hosts suffix",
            op(json!({"hosts": ["*.svc.cluster.local"]})),
            id,
            |r| r.host = "example.com",
        ),
        (
            "notHosts",
            op(json!({"notHosts": ["web*"]})),
            |r| r.host = "other",
            id,
        ),
        ("ports", op(json!({"ports": ["80"]})), id, |r| {
            r.dst_port = 8080
        }),
        (
            "notPorts",
            op(json!({"notPorts": ["80"]})),
            |r| r.dst_port = 8080,
            id,
        ),
        (
            "methods",
            op(json!({"methods": ["GET", "HEAD"]})),
            id,
            |r| r.method = "POST",
        ),
        (
            "notMethods",
            op(json!({"notMethods": ["DELETE"]})),
            id,
            |r| r.method = "DELETE",
        ),
        (
            "paths exact",
            op(json!({"paths": ["/api/v1/items"]})),
            id,
            |r| r.path = "/api/v1/items/2",
        ),
        ("paths prefix", op(json!({"paths": ["/api/*"]})), id, |r| {
            r.path = "/admin"
        }),
        ("paths suffix", op(json!({"paths": ["*/items"]})), id, |r| {
            r.path = "/api/v1/users"
        }),
        (
            "paths {*}",
            op(json!({"paths": ["/api/{*}/items"]})),
            id,
            |r| r.path = "/api/v1/v2/items",
        ),
        (
            "paths {**}",
            op(json!({"paths": ["/api/{**}"]})),
            |r| r.path = "/api/a/b/c",
            |r| r.path = "/apix",
        ),
        ("notPaths", op(json!({"notPaths": ["/admin/*"]})), id, |r| {
            r.path = "/admin/x"
        }),
        (
            "request.headers",
            when("request.headers[x-user]", json!(["alice", "bob*"])),
            |r| r.headers = vec![("x-user", "bobby")],
            |r| r.headers = vec![("x-user", "eve")],
        ),
        (
            "request.headers absent",
            when("request.headers[x-user]", json!(["*"])),
            |r| r.headers = vec![("x-user", "x")],
            id,
        ),
        (
            "request.headers notValues",
            when_not("request.headers[x-user]", json!(["eve"])),
            |r| r.headers = vec![("x-user", "alice")],
            |r| r.headers = vec![("x-user", "eve")],
        ),
        (
            "source.ip",
            when("source.ip", json!(["10.0.0.0/8"])),
            id,
            other_ip,
        ),
        (
            "source.namespace",
            when("source.namespace", json!(["client"])),
            id,
            other_id,
        ),
        (
            "source.principal",
            when(
                "source.principal",
                json!(["cluster.local/ns/client/sa/cli"]),
            ),
            id,
            other_id,
        ),
        (
            "remote.ip",
            when("remote.ip", json!(["10.0.0.5/32"])),
            id,
            other_ip,
        ),
        (
            "destination.ip",
            when("destination.ip", json!(["10.96.0.0/16"])),
            id,
            |r| r.dst_ip = "10.1.2.3",
        ),
        (
            "destination.port",
            when("destination.port", json!(["80"])),
            id,
            |r| r.dst_port = 81,
        ),
        (
            "request.auth.principal",
            when(
                "request.auth.principal",
                json!(["https://issuer.example/*"]),
            ),
            jwt,
            id,
        ),
        (
            "request.auth.audiences",
            when("request.auth.audiences", json!(["api"])),
            jwt,
            id,
        ),
        (
            "request.auth.presenter",
            when("request.auth.presenter", json!(["spa"])),
            jwt,
            id,
        ),
        (
            "request.auth.claims list",
            when("request.auth.claims[groups]", json!(["admins"])),
            jwt,
            id,
        ),
        (
            "request.auth.claims nested",
            when("request.auth.claims[org][role]", json!(["owner"])),
            jwt,
            |r| {
                let mut c = alice();
                c.payload.insert("org".into(), json!({"role": "guest"}));
                r.claims = Some(c)
            },
        ),
        (
            "connection.sni",
            when("connection.sni", json!(["web.example"])),
            |r| r.sni = Some("web.example"),
            id,
        ),
        (
            "from AND to AND when",
            json!({
            "from": [{"source": {"namespaces": ["client"]}}],
            "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
            "when": [{"key": "request.headers[x-user]", "values": ["alice"]}]}),
            |r| r.headers = vec![("x-user", "alice")],
            |r| {
                r.headers = vec![("x-user", "alice")];
                r.method = "PUT"
            },
        ),
        (
            "sources OR-ed",
            json!({"from": [{"source": {"namespaces": ["x"]}}, {"source": {"namespaces": ["client"]}}]}),
            id,
            other_id,
        ),
    ]
}

#[test]
fn every_supported_field_as_allow_deny_and_audit() {
    for (what, rule, hit, miss) in rows() {
        for action in ["ALLOW", "DENY", "AUDIT"] {
            let p = policy(
                "AuthorizationPolicy",
                "app",
                "p",
                json!({"targetRefs": gateway_ref(), "action": action, "rules": [rule]}),
            );
            let set = PolicySet::compile([&p], ROOT);
            assert!(set.errors().is_empty(), "{what}: {:?}", set.errors());
            let (mut yes, mut no) = (base(), base());
            hit(&mut yes);
            miss(&mut no);
            let (y, n) = (decide(&set, &yes, "web"), decide(&set, &no, "web"));
            let deny = |p: &str| Decision::Deny { policy: p.into() };
            match action {
                "ALLOW" => {
                    assert_eq!(y.decision, Decision::Allow, "{what} {action} hit");
                    assert_eq!(n.decision, deny(NO_ALLOW_MATCHED), "{what} {action} miss");
                }
                "DENY" => {
                    assert_eq!(y.decision, deny("app/p"), "{what} {action} hit");
                    assert_eq!(n.decision, Decision::Allow, "{what} {action} miss");
                }
                _ => {
                    assert_eq!(
                        (y.decision, y.audited),
                        (Decision::Allow, vec!["app/p".to_string()]),
                        "{what} {action} hit"
                    );
                    assert_eq!(
                        (n.decision, n.audited),
                        (Decision::Allow, vec![]),
                        "{what} {action} miss"
                    );
                }
            }
        }
    }
}

fn ap(name: &str, spec: Value) -> Policy {
    policy("AuthorizationPolicy", "app", name, spec)
}

#[test]
fn deny_beats_allow_and_audit_changes_nothing() {
    let set = PolicySet::compile(
        &[
            ap("allow", json!({"targetRefs": gateway_ref(), "rules": [{}]})),
            ap(
                "audit",
                json!({"targetRefs": gateway_ref(), "action": "AUDIT", "rules": [{}]}),
            ),
            ap(
                "deny",
                json!({"targetRefs": gateway_ref(), "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]}),
            ),
        ],
        ROOT,
    );
    let mut admin = base();
    admin.path = "/admin/x";
    let v = decide(&set, &admin, "web");
    assert_eq!(
        v.decision,
        Decision::Deny {
            policy: "app/deny".into()
        }
    );
    assert_eq!(v.audited, vec!["app/audit".to_string()]);
    assert_eq!(decide(&set, &base(), "web").decision, Decision::Allow);
}

#[test]
fn empty_spec_on_the_gateway_allows_nothing() {
    let set = PolicySet::compile(&[ap("none", json!({"targetRefs": gateway_ref()}))], ROOT);
    assert_eq!(
        decide(&set, &base(), "web").decision,
        Decision::Deny {
            policy: NO_ALLOW_MATCHED.into()
        }
    );
}

#[test]
fn attachment_gateway_service_class_and_selector() {
    let deny_all = |targets: Value| json!({"targetRefs": targets, "action": "DENY", "rules": [{}]});
    let cases = [
        // (policy namespace, spec, denied for web, denied for db)
        ("app", deny_all(gateway_ref()), true, true),
        (
            "app",
            deny_all(json!([{"kind": "Service", "group": "", "name": "web"}])),
            true,
            false,
        ),
        (
            "other",
            deny_all(json!([{"kind": "Service", "group": "", "name": "web"}])),
            false,
            false,
        ),
        ("other", deny_all(gateway_ref()), false, false),
        (
            ROOT,
            deny_all(
                json!([{"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}]),
            ),
            true,
            true,
        ),
        (
            "app",
            deny_all(
                json!([{"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}]),
            ),
            false,
            false,
        ),
        // Waypoints ignore selector (and namespace-wide) policies: those are ztunnel's.
        (
            "app",
            json!({"action": "DENY", "rules": [{}]}),
            false,
            false,
        ),
        (
            "app",
            json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY", "rules": [{}]}),
            false,
            false,
        ),
    ];
    for (i, (ns, spec, web, db)) in cases.into_iter().enumerate() {
        let set = PolicySet::compile(&[policy("AuthorizationPolicy", ns, "p", spec)], ROOT);
        assert!(set.errors().is_empty(), "case {i}: {:?}", set.errors());
        let denied = |svc| matches!(decide(&set, &base(), svc).decision, Decision::Deny { .. });
        assert_eq!((denied("web"), denied("db")), (web, db), "case {i}");
    }
}

#[test]
fn waypoint_policies_stay_out_of_ztunnel_and_unsupported_parts_are_reported() {
    let set = PolicySet::compile(
        &[
            ap(
                "custom",
                json!({"targetRefs": gateway_ref(), "action": "CUSTOM",
                "provider": {"name": "ext"}, "rules": [{}]}),
            ),
            ap(
                "exp",
                json!({"targetRefs": gateway_ref(), "rules": [{"when": [
                {"key": "experimental.envoy.filters.network.mysql_proxy[db.table]", "values": ["x"]}]}]}),
            ),
        ],
        ROOT,
    );
    assert!(set.errors().is_empty(), "{:?}", set.errors());
    for r in set.reports() {
        assert_eq!(r.status, PolicyStatus::NotEnforced, "{}", r.key);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("enforced by waypoint")),
            "{:?}",
            r.warnings
        );
    }
    let custom = set.reports().iter().find(|r| r.name == "custom").unwrap();
    assert!(
        custom
            .warnings
            .iter()
            .any(|w| w.contains("CUSTOM") && w.contains("NOT enforced"))
    );
    let exp = set.reports().iter().find(|r| r.name == "exp").unwrap();
    assert!(
        exp.warnings
            .iter()
            .any(|w| w.contains("experimental.envoy.filters") && w.contains("more restrictive")),
        "{:?}",
        exp.warnings
    );
    // CUSTOM is not enforced; the ALLOW rule the waypoint cannot evaluate is dropped, so the
    // ALLOW policy allows nothing.
    assert_eq!(
        decide(&set, &base(), "web").decision,
        Decision::Deny {
            policy: NO_ALLOW_MATCHED.into()
        }
    );
}

#[test]
fn invalid_l7_fields_are_refused_naming_the_field() {
    for (spec, field) in [
        (
            json!({"rules": [{"to": [{"operation": {"paths": ["/{**}/x/{*}"]}}]}]}),
            "paths[0]",
        ),
        (
            json!({"rules": [{"to": [{"operation": {"paths": ["/a/{*}.txt"]}}]}]}),
            "paths[0]",
        ),
        (
            json!({"rules": [{"when": [{"key": "request.headers", "values": ["x"]}]}]}),
            "when[0].key",
        ),
        (
            json!({"rules": [{"when": [{"key": "request.bogus", "values": ["x"]}]}]}),
            "when[0].key",
        ),
        (
            json!({"rules": [{"from": [{"source": {"remoteIpBlocks": ["10.0.0.300"]}}]}]}),
            "remoteIpBlocks[0]",
        ),
    ] {
        let mut spec = spec;
        spec["targetRefs"] = gateway_ref();
        let set = PolicySet::compile(&[ap("bad", spec.clone())], ROOT);
        let errors = set.errors();
        assert!(
            errors.iter().any(|e| e.contains(field)),
            "{spec}: {errors:?}"
        );
        assert_eq!(set.reports()[0].status, PolicyStatus::Rejected);
    }
    let bad_ref = json!({"targetRefs": [{"kind": "Deployment", "group": "apps", "name": "x"}]});
    assert!(PolicySet::compile(&[ap("bad", bad_ref)], ROOT).errors()[0].contains("targetRefs[0]"));
}

// ---- RequestAuthentication ----

/// A signing key (ES256) and its public JWK.
struct Signer {
    key: EncodingKey,
    jwk: Value,
}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn signer(kid: &str) -> Signer {
    let kp = rcgen::KeyPair::generate().unwrap();
    let raw = kp.public_key_raw(); // 0x04 || x || y
    Signer {
        key: EncodingKey::from_ec_der(&kp.serialize_der()),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
            "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65])}),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(s: &Signer, kid: &str, claims: Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, &claims, &s.key).unwrap()
}

fn ra(jwt_rules: Value) -> PolicySet {
    let p = policy(
        "RequestAuthentication",
        "app",
        "jwt",
        json!({"targetRefs": gateway_ref(), "jwtRules": jwt_rules}),
    );
    let set = PolicySet::compile([&p], ROOT);
    assert!(set.errors().is_empty(), "{:?}", set.errors());
    set
}

fn run(set: &PolicySet, headers: &[(&str, String)], query: Option<&str>) -> Authn {
    let at = WaypointTarget {
        gateway_namespace: "app",
        gateway_name: "wp",
        service: Some(("app", "web")),
    };
    let rules = set.jwt_rules(&at);
    let mut h = http::HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let no_remote =
        |uri: &str| -> Result<Arc<JwkSet>, String> { Err(format!("not fetched: {uri}")) };
    authenticate(&rules, &h, query, &no_remote, now())
}

fn bearer(t: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {t}"))]
}

#[test]
fn jwt_valid_expired_wrong_issuer_wrong_audience_bad_signature_missing() {
    let good = signer("k1");
    let forger = signer("k1"); // same kid, different key
    let set = ra(
        json!([{"issuer": "https://issuer.example", "audiences": ["web"],
        "jwks": json!({"keys": [good.jwk]}).to_string()}]),
    );
    let claims = |extra: Value| {
        let mut c = json!({"iss": "https://issuer.example", "sub": "alice", "aud": "web",
            "exp": now() + 600, "azp": "spa"});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    match run(&set, &bearer(&token(&good, "k1", claims(json!({})))), None) {
        Authn::Verified(v) => {
            assert_eq!(v.claims.principal, "https://issuer.example/alice");
            assert_eq!(v.claims.audiences, vec!["web".to_string()]);
            assert_eq!(v.claims.presenter.as_deref(), Some("spa"));
        }
        other => panic!("valid token: {other:?}"),
    }
    let failed = |a: Authn| match a {
        Authn::Failed(reason) => reason,
        other => panic!("expected a failure, got {other:?}"),
    };
    let expired = token(&good, "k1", claims(json!({"exp": now() - 3600})));
    assert_eq!(failed(run(&set, &bearer(&expired), None)), "Jwt is expired");
    // An expiry that is not a number is not "no expiry"; a huge one does not wrap around.
    let string_exp = token(&good, "k1", claims(json!({"exp": "never"})));
    assert_eq!(
        failed(run(&set, &bearer(&string_exp), None)),
        "Jwt exp claim is not a number of seconds"
    );
    let float_expired = token(
        &good,
        "k1",
        claims(json!({"exp": (now() - 3600) as f64 + 0.5})),
    );
    assert_eq!(
        failed(run(&set, &bearer(&float_expired), None)),
        "Jwt is expired"
    );
    let far = token(&good, "k1", claims(json!({"exp": u64::MAX})));
    assert!(matches!(run(&set, &bearer(&far), None), Authn::Verified(_)));
    let wrong_iss = token(&good, "k1", claims(json!({"iss": "https://evil.example"})));
    assert_eq!(
        failed(run(&set, &bearer(&wrong_iss), None)),
        "Jwt issuer is not configured"
    );
    let wrong_aud = token(&good, "k1", claims(json!({"aud": ["other"]})));
    assert_eq!(
        failed(run(&set, &bearer(&wrong_aud), None)),
        "Audiences in Jwt are not allowed"
    );
    let forged = token(&forger, "k1", claims(json!({})));
    assert!(failed(run(&set, &bearer(&forged), None)).starts_with("Jwt verification fails"));
    let mut tampered = token(&good, "k1", claims(json!({})))
        .split('.')
        .map(str::to_string)
        .collect::<Vec<_>>();
    tampered[1] = b64url(claims(json!({"sub": "admin"})).to_string().as_bytes());
    assert!(
        failed(run(&set, &bearer(&tampered.join(".")), None)).starts_with("Jwt verification fails")
    );
    let unknown_kid = token(&good, "k2", claims(json!({})));
    assert!(failed(run(&set, &bearer(&unknown_kid), None)).contains("kid"));
    assert!(matches!(run(&set, &[], None), Authn::NoToken));
    // Not a Bearer value: no token there, as Envoy's extractor sees it.
    assert!(matches!(
        run(&set, &[("authorization", "Basic abc".into())], None),
        Authn::NoToken
    ));
    // The default locations include the access_token query parameter.
    let q = format!("a=1&access_token={}", token(&good, "k1", claims(json!({}))));
    assert!(matches!(run(&set, &[], Some(&q)), Authn::Verified(_)));
    assert_eq!(
        failed(run(&set, &[], Some(&format!("access_token={expired}")))),
        "Jwt is expired"
    );
}

#[test]
fn jwt_from_headers_outputs_and_remote_keys() {
    let s = signer("k");
    let set = ra(
        json!([{"issuer": "iss", "jwksUri": "http://keys.app.svc.cluster.local/jwks",
        "fromHeaders": [{"name": "X-Jwt", "prefix": "Token "}],
        "outputPayloadToHeader": "x-jwt-payload", "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}]}]),
    );
    assert_eq!(
        set.jwks_uris().into_iter().collect::<Vec<_>>(),
        vec!["http://keys.app.svc.cluster.local/jwks".to_string()]
    );
    let t = token(&s, "k", json!({"iss": "iss", "sub": "bob"}));
    // Keys not fetched (yet, or the fetch failed): tokens of that issuer are refused.
    match run(&set, &[("x-jwt", format!("Token {t}"))], None) {
        Authn::Failed(r) => assert!(r.contains("Jwks remote fetch is failed"), "{r}"),
        other => panic!("{other:?}"),
    }
    // The Authorization header is not read when fromHeaders is set.
    assert!(matches!(run(&set, &bearer(&t), None), Authn::NoToken));
    let keys: JwkSet = serde_json::from_value(json!({"keys": [s.jwk]})).unwrap();
    let keys = Arc::new(keys);
    let at = WaypointTarget {
        gateway_namespace: "app",
        gateway_name: "wp",
        service: None,
    };
    let rules = set.jwt_rules(&at);
    let mut h = http::HeaderMap::new();
    h.insert("x-jwt", format!("Token {t}").parse().unwrap());
    let lookup = |_: &str| -> Result<Arc<JwkSet>, String> { Ok(keys.clone()) };
    let Authn::Verified(v) = authenticate(&rules, &h, None, &lookup, now()) else {
        panic!("remote keys verify");
    };
    v.apply(&mut h);
    assert!(
        h.get("x-jwt").is_none(),
        "forwardOriginalToken false removes the token"
    );
    assert_eq!(h["x-jwt-payload"], t.split('.').nth(1).unwrap());
    assert_eq!(h["x-sub"], "bob");
}

#[test]
fn request_authentication_validation() {
    for (rules, field) in [
        (json!([{"jwks": "{}"}]), "issuer"),
        (
            json!([{"issuer": "a", "jwks": "{}", "jwksUri": "http://x/"}]),
            "jwtRules[0]",
        ),
        (json!([{"issuer": "a", "jwksUri": "ftp://x/"}]), "jwksUri"),
        (
            json!([{"issuer": "a", "fromHeaders": [{"prefix": "x"}]}]),
            "fromHeaders[0]",
        ),
        (json!([{"issuer": "a", "bogus": 1}]), "bogus"),
    ] {
        let p = policy(
            "RequestAuthentication",
            "app",
            "jwt",
            json!({"targetRefs": gateway_ref(), "jwtRules": rules}),
        );
        let set = PolicySet::compile([&p], ROOT);
        assert!(
            set.errors().iter().any(|e| e.contains(field)),
            "{rules}: {:?}",
            set.errors()
        );
    }
}

/// A 2048-bit RSA key made for this test with `openssl genrsa` (PKCS#1 DER) and its modulus:
/// rcgen (ring) cannot make RSA keys.
const RSA_PKCS1_DER_HEX: &str = "308204a402010002820101009e517e5efa58867339fc7a95e65a12d0a407a27e806c88b0d40611e59f5f15445dea06698bf3edc840f77507e05a4514c8827e86c22ad5347e611fa145923a08207f870732b9dc5c53908120985b6e551e8e016d0b5404eef9f261b624650a73e1dee81b50e20eb8328bb705b85e60e1d8ff83dd33772e2da7ff99704a54ae943cd69a4401758bfe6f9be76d0a8ebc7450fdc10590ac1c051eec45b8766535f40e6f1d317daf9ccaa670033f575a859238532fc2b011d0331a863168f2b3706a1935ab1b234554626bf233d3809a0a0225def13571164fca2cc0f86f7e8edacaaa7ee2f09715e9a13b5481d198e9d9d1af78dc64768e631c9c162fd6f6e9ae9302030100010282010016a57ef784701800c63c00d263250ca9490d73dd0c99cf391c307cc18ff9409d8af6e8513e1d228266bdff165002c451a36cfc94623f50f2e00671f3d673d8569944cf6d39805a03e04ae76db632e8a6c711767ac15d6a11ea8715706c91acdbc40f92bc203c75f13b5469007f230ba6182daa1080f0276c387fd8d4608d99d08e572f96e5edd1a08cfd2056269bdb69a0d835151506dcefd5c297448d6f536da6cd44ae6e30b5e24316372c2c6963d3ccb7c70e732c749aa8c38e08c9a1a4a38aedc327cce697f7c842d9581c6c94fc116dde696806ec75408b4bd1d70c6b591ef285da8023d656e80bc97b379971c338ea9e495d901bfac41eb7924b32a20102818100cdd0a389d103596dad17b6151933e96f851fd3c6aee59f702fcc21c6ba35df260389a1f9c1fc6aa9052059300f4f05ce8301924666c7e5e83a63d7f362dc79a13766bbcf2062e6ed82162d5709162e9032c993ef5afa08238102a02e5b007d80382d373fa596bc552173ab0801a903ee58db396d753b15ef74f1a91806fb74d302818100c4ec05ffc398b1f90a3c2c72a90696b825597345d0a9ff25d8857a711d79eb8385d8c07a6507e2468606e436dee2d2875c9946ce0a0056173eb42b2c2b06beb7900826aba8c6d761c168a2505369e50a26a90311b2c6440aa98b40569d8a95cb33fe98e0263a4b42c0584ba7a9d73ec47fa2dd70a7dc993b46ff5c279d1bc74102818100b3ec0ccb52192778a5b4f0cc88f7c4be651669c06aecf9f0cd181afeeb9264bd8aa22b2377ddfe303bf70780e82120e663c85fe383be84d1fb198593937d4227199389e38c6069987ffc7b2e771719259e00727ef07d5bd80dd409cbfc69f54cbdcf69590e9d338f086b61bce216ab051650af676cf076409b6f176f95cb0559028180388d63c7a8df8034fa187fd749ed677968d8807f4b4696ccc29acaa8138400fbdb837cfb696a533457a74100f50f84d074ea5be82dfd1cbc3e38b5b15085f65d7712b0305a1f0899bd56944ea735e11e022e45805eac0bbc5826728aad61b055141088ccce8dad317555a61c776d264c7e2f4292e8d2347b4e8f6562c6fec44102818100b4bf22158b3b56f1517bb9349fb1e97ecd5c5a3849c15763404f72b20476405ebaa46d7dfa22fb6f40605b0d2a55cab25100b9af7f95ff8bc2d7db9f2544a91e1bb961baf0d86fdf6a2b5c4743a1c9b395fcc33af2510414c64dd121ffc137edcff9b2813d7b93ca4c55e440fa08ac11b36f2638e43ff950e7f2eb6319776e43";
const RSA_N: &str = "nlF-XvpYhnM5_HqV5loS0KQHon6AbIiw1AYR5Z9fFURd6gZpi_PtyED3dQfgWkUUyIJ-hsIq1TR-YR-hRZI6CCB_hwcyudxcU5CBIJhbblUejgFtC1QE7vnyYbYkZQpz4d7oG1DiDrgyi7cFuF5g4dj_g90zdy4tp_-ZcEpUrpQ81ppEAXWL_m-b520Kjrx0UP3BBZCsHAUe7EW4dmU19A5vHTF9r5zKpnADP1dahZI4Uy_CsBHQMxqGMWjys3BqGTWrGyNFVGJr8jPTgJoKAiXe8TVxFk_KLMD4b36O2sqqfuLwlxXpoTtUgdGY6dnRr3jcZHaOYxycFi_W9umukw";

#[test]
fn jwt_rs256_with_an_rsa_jwk() {
    let key = EncodingKey::from_rsa_der(&hex::decode(RSA_PKCS1_DER_HEX).unwrap());
    let jwk = json!({"kty": "RSA", "kid": "r1", "n": RSA_N, "e": "AQAB"});
    let set = ra(json!([{"issuer": "rsa-issuer", "jwks": json!({"keys": [jwk]}).to_string()}]));
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("r1".into());
    let t = jsonwebtoken::encode(
        &h,
        &json!({"iss": "rsa-issuer", "sub": "carol", "exp": now() + 60}),
        &key,
    )
    .unwrap();
    match run(&set, &bearer(&t), None) {
        Authn::Verified(v) => assert_eq!(v.claims.principal, "rsa-issuer/carol"),
        other => panic!("RS256 token: {other:?}"),
    }
    let mut parts: Vec<&str> = t.split('.').collect();
    let other = b64url(
        json!({"iss": "rsa-issuer", "sub": "mallory"})
            .to_string()
            .as_bytes(),
    );
    parts[1] = &other;
    assert!(matches!(
        run(&set, &bearer(&parts.join(".")), None),
        Authn::Failed(_)
    ));
    // An ES256 header against the RSA key: no key of that kind, refused.
    let es = signer("r1");
    let t = token(&es, "r1", json!({"iss": "rsa-issuer", "sub": "carol"}));
    assert!(matches!(run(&set, &bearer(&t), None), Authn::Failed(_)));
}
