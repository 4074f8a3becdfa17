//! L7 access control through a real waypoint (see `common` for the harness): AuthorizationPolicy
//! attached with `targetRefs` decides per request with the client's certificate identity (403
//! `RBAC: access denied`, the backend never sees the request); RequestAuthentication verifies
//! JWTs (401 for a bad one, a missing one allowed unless a policy wants a request principal),
//! with keys inline or from a `jwksUri` served by a pod in the mesh.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshcore::proto::config::Policy;
use serde_json::{Value, json};

fn on_gateway() -> Value {
    json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "wp"}])
}

fn on_service(name: &str) -> Value {
    json!([{"group": "", "kind": "Service", "name": name}])
}

fn ap(name: &str, spec: Value) -> Policy {
    policy_resource("AuthorizationPolicy", "app", name, spec)
}

fn ra(name: &str, spec: Value) -> Policy {
    policy_resource("RequestAuthentication", "app", name, spec)
}

async fn call(
    m: &Mesh,
    vip: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, Option<String>, String) {
    let mut c = m.http1(&format!("{vip}:80")).await;
    let mut req = get(path, "web");
    *req.method_mut() = method.parse().unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let resp = send1(&mut c, req).await;
    let status = resp.status();
    let pod = resp
        .headers()
        .get("x-pod")
        .map(|v| v.to_str().unwrap().to_string());
    (status, pod, body_text(resp).await)
}

#[tokio::test]
async fn denied_requests_get_403_and_allowed_ones_reach_the_backend() {
    let (m, _keys) = authz_mesh(vec![
        ap(
            "no-admin",
            json!({"targetRefs": on_gateway(), "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/admin/{**}"]}}]}]}),
        ),
        ap(
            "client-reads",
            json!({"targetRefs": on_service("web"), "rules": [{
            "from": [{"source": {"principals": ["td/ns/client/sa/cli"]}}],
            "to": [{"operation": {"methods": ["GET"]}}]}]}),
        ),
    ])
    .await;
    let (status, pod, _) = call(&m, WEB_VIP, "GET", "/items", None).await;
    assert_eq!(
        (status, pod.as_deref()),
        (StatusCode::OK, Some("backend-0"))
    );
    let dump = m.config_dump().await;
    assert_eq!(
        dump["authz"]["onGateway"],
        json!(["app/no-admin"]),
        "{dump}"
    );
    assert_eq!(
        dump["authz"]["authorizationPolicies"][1]["key"],
        json!("app/no-admin")
    );
    for (method, path) in [
        ("GET", "/admin/users"),
        ("POST", "/items"),
        // Dot segments are resolved before matching (Istio's default path normalization).
        ("GET", "/public/../admin/users"),
        ("GET", "/./admin/users"),
        // ...with the dots percent-encoded too, as Envoy's canonicalizer reads them.
        ("GET", "/public/%2e%2e/admin/users"),
        ("GET", "/public/%2E./admin/users"),
    ] {
        let (status, pod, body) = call(&m, WEB_VIP, method, path, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(body, "RBAC: access denied", "{method} {path}");
        assert_eq!(pod, None, "{method} {path} must not reach the backend");
    }
    // The backend serves the path the policy judged, not the raw one it could resolve itself.
    let (status, _, body) = call(&m, WEB_VIP, "GET", "/public/%2e%2e/items?x=1", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("path=/items "), "{body}");
    // The ALLOW policy is on Service web only: the keys service has none (the DENY still holds).
    assert_eq!(
        call(&m, KEYS_VIP, "POST", "/x", None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&m, KEYS_VIP, "GET", "/admin/x", None).await.0,
        StatusCode::FORBIDDEN
    );

    // The client's identity comes from its certificate: allow someone else and it is refused.
    m.set_policies(vec![ap(
        "others",
        json!({"targetRefs": on_service("web"), "rules": [{
        "from": [{"source": {"principals": ["td/ns/other/sa/cli"]}}]}]}),
    )]);
    let (status, _, body) = call(&m, WEB_VIP, "GET", "/items", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
    m.set_policies(vec![ap(
        "client-ns",
        json!({"targetRefs": on_service("web"), "rules": [{
        "from": [{"source": {"namespaces": ["client"]}}]}]}),
    )]);
    assert_eq!(
        call(&m, WEB_VIP, "GET", "/items", None).await.0,
        StatusCode::OK
    );
}

/// An ES256 key and its JWK.
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

fn signer() -> Signer {
    let kp = rcgen::KeyPair::generate().unwrap();
    let raw = kp.public_key_raw();
    Signer {
        key: EncodingKey::from_ec_der(&kp.serialize_der()),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65])}),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(s: &Signer, sub: &str, exp: u64) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    let claims = json!({"iss": "https://issuer.test", "sub": sub, "aud": "web", "exp": exp});
    jsonwebtoken::encode(&h, &claims, &s.key).unwrap()
}

fn jwks(s: &Signer) -> String {
    json!({"keys": [s.jwk]}).to_string()
}

#[tokio::test]
async fn jwt_with_inline_keys_401_for_bad_tokens_and_request_principals_in_policy() {
    let good = signer();
    let forger = signer();
    let authn = ra(
        "jwt",
        json!({"targetRefs": on_gateway(), "jwtRules": [{
        "issuer": "https://issuer.test", "audiences": ["web"], "jwks": jwks(&good),
        "outputPayloadToHeader": "x-jwt-payload"}]}),
    );
    let (m, _keys) = authz_mesh(vec![authn.clone()]).await;
    // No policy wants a request principal yet: a missing token passes, a bad one does not.
    assert_eq!(call(&m, KEYS_VIP, "GET", "/", None).await.0, StatusCode::OK);
    // A client cannot hand the backend a payload header of its own making.
    let mut c = m.http1(&format!("{KEYS_VIP}:80")).await;
    let mut req = get("/", "web");
    req.headers_mut()
        .insert("x-jwt-payload", "eyJzdWIiOiJhZG1pbiJ9".parse().unwrap());
    let resp = send1(&mut c, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let echoed: Value = serde_json::from_str(&body_text(resp).await).unwrap();
    assert!(echoed.get("x-jwt-payload").is_none(), "{echoed}");
    let valid = token(&good, "alice", now() + 600);
    let (status, _, echoed) = call(&m, KEYS_VIP, "GET", "/", Some(&valid)).await;
    assert_eq!(status, StatusCode::OK);
    let echoed: Value = serde_json::from_str(&echoed).unwrap();
    assert_eq!(
        echoed["x-jwt-payload"],
        json!(valid.split('.').nth(1).unwrap())
    );
    assert!(
        echoed.get("authorization").is_none(),
        "token removed: {echoed}"
    );
    for (what, t) in [
        ("expired", token(&good, "alice", now() - 3600)),
        ("forged", token(&forger, "alice", now() + 600)),
        ("garbage", "a.b.c".to_string()),
    ] {
        let (status, pod, body) = call(&m, WEB_VIP, "GET", "/", Some(&t)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(body, "Jwt verification fails", "{what}");
        assert_eq!(pod, None, "{what}");
    }

    m.set_policies(vec![
        authn,
        ap(
            "alice-only",
            json!({"targetRefs": on_service("web"), "rules": [{
            "from": [{"source": {"requestPrincipals": ["https://issuer.test/alice"]}}]}]}),
        ),
    ]);
    assert_eq!(
        call(&m, WEB_VIP, "GET", "/", None).await.0,
        StatusCode::FORBIDDEN
    );
    let bob = token(&good, "bob", now() + 600);
    assert_eq!(
        call(&m, WEB_VIP, "GET", "/", Some(&bob)).await.0,
        StatusCode::FORBIDDEN
    );
    let (status, pod, _) = call(&m, WEB_VIP, "GET", "/", Some(&valid)).await;
    assert_eq!(
        (status, pod.as_deref()),
        (StatusCode::OK, Some("backend-0"))
    );
}

#[tokio::test]
async fn jwks_uri_is_fetched_through_the_mesh_and_a_failed_fetch_refuses_tokens() {
    let s = signer();
    let (m, keys) = authz_mesh(vec![ra(
        "jwt",
        json!({"targetRefs": on_gateway(), "jwtRules": [{
        "issuer": "https://issuer.test", "jwksUri": "http://keys.app.svc.cluster.local/jwks"}]}),
    )])
    .await;
    let valid = token(&s, "alice", now() + 600);
    // The keys pod answers 500: the fetch fails, tokens of the issuer are refused.
    let deadline = Instant::now() + DEADLINE;
    while keys.fetches.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the waypoint never asked for the JWKS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, body) = call(&m, WEB_VIP, "GET", "/", Some(&valid)).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::UNAUTHORIZED, "Jwt verification fails")
    );
    assert_eq!(call(&m, WEB_VIP, "GET", "/", None).await.0, StatusCode::OK);
    // Once the keys are served the retry picks them up.
    *keys.jwks.lock().unwrap() = Some(jwks(&s));
    loop {
        let (status, pod, _) = call(&m, WEB_VIP, "GET", "/", Some(&valid)).await;
        if status == StatusCode::OK {
            assert_eq!(pod.as_deref(), Some("backend-0"));
            break;
        }
        assert!(
            Instant::now() < deadline + DEADLINE,
            "keys never fetched: still {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let forged = token(&signer(), "alice", now() + 600);
    assert_eq!(
        call(&m, WEB_VIP, "GET", "/", Some(&forged)).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// Sends bytes that are not HTTP through the waypoint to `authority` and reports whether they
/// came back (the backend's TCP port echoes); a refused connection ends with nothing.
async fn tcp_echoes(m: &Mesh, authority: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let payload = b"\x00not http\r\n\x01".to_vec();
    // A refusal may reset the stream before the client has read the CONNECT's answer.
    let Ok(tunnel) = m.connect(authority).await else {
        return false;
    };
    let (mut r, mut w) = tokio::io::split(tunnel);
    // A refused connection may be closed before or while this is written.
    let _ = w.write_all(&payload).await;
    let _ = w.shutdown().await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, r.read_to_end(&mut got))
        .await
        .expect("the waypoint answers or closes in time");
    got == payload
}

/// TCP through the waypoint — a TCP port, or bytes that are not HTTP on a sniffed one — is
/// judged by the same policies, on its connection alone: an ALLOW rule needing the request
/// never matches, a DENY rule matches on its connection fields (as Istio's waypoint does).
#[tokio::test]
async fn tcp_connections_are_judged_by_the_same_policies() {
    let (m, _keys) = authz_mesh(Vec::new()).await;
    let ports = [format!("{WEB_VIP}:9000"), format!("{WEB_VIP}:83")];
    for a in &ports {
        assert!(tcp_echoes(&m, a).await, "{a}: no policy, passes");
    }
    let cases = [
        (
            "DENY with only an HTTP field refuses every connection",
            json!({"targetRefs": on_gateway(), "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin/{**}"]}}]}]}),
            false,
        ),
        (
            "DENY for another principal leaves the client alone",
            json!({"targetRefs": on_gateway(), "action": "DENY",
                "rules": [{"from": [{"source": {"principals": ["td/ns/other/sa/x"]}}],
                           "to": [{"operation": {"methods": ["POST"]}}]}]}),
            true,
        ),
        (
            "ALLOW of the client's principal admits it",
            json!({"targetRefs": on_service("web"),
                "rules": [{"from": [{"source": {"principals": ["td/ns/client/sa/cli"]}}]}]}),
            true,
        ),
        (
            "ALLOW of someone else refuses the client",
            json!({"targetRefs": on_service("web"),
                "rules": [{"from": [{"source": {"principals": ["td/ns/other/sa/cli"]}}]}]}),
            false,
        ),
        (
            "ALLOW that needs the request never matches a connection",
            json!({"targetRefs": on_service("web"),
                "rules": [{"from": [{"source": {"principals": ["td/ns/client/sa/cli"]}}],
                           "to": [{"operation": {"methods": ["GET"]}}]}]}),
            false,
        ),
        (
            "...even when its request field is a not-list",
            json!({"targetRefs": on_service("web"),
                "rules": [{"from": [{"source": {"principals": ["td/ns/client/sa/cli"]}}],
                           "to": [{"operation": {"notPaths": ["/private"]}}]}]}),
            false,
        ),
    ];
    for (what, spec, passes) in cases {
        m.set_policies(vec![ap("p", spec)]);
        for a in &ports {
            assert_eq!(tcp_echoes(&m, a).await, passes, "{what} ({a})");
        }
    }
}
