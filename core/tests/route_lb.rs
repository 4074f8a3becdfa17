//! meshcore::route::lb: which policy a DestinationRule gives each (service, port, subset), and
//! the distribution each policy produces — least-request prefers idle endpoints, round robin
//! cycles, random spreads, consistent hashing is sticky, spreads, ignores endpoint order and
//! moves only the keys of an endpoint that goes.

use std::collections::HashMap;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use meshcore::route::lb::{Balancer, EndpointView, HashKey, HashOn, HashRequest, LbPolicy};
use meshcore::route::{PortInfo, RouteResourceRef, ServiceInfo, compile};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

fn rng() -> StdRng {
    StdRng::seed_from_u64(11)
}

fn views<'a>(keys: &[&'a str], active: &[u32]) -> Vec<EndpointView<'a>> {
    keys.iter()
        .zip(active)
        .map(|(k, a)| EndpointView { key: k, active: *a })
        .collect()
}

/// Within 5 standard deviations of the binomial mean (false failure odds below 1 in 10^6).
fn within_binomial(count: usize, n: usize, p: f64) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    assert!(
        ((count as f64) - mean).abs() <= 5.0 * sd,
        "{count} of {n}, expected {mean} ± {}",
        5.0 * sd
    );
}

fn counts(b: &Balancer, policy: &LbPolicy, eps: &[EndpointView<'_>], n: usize) -> Vec<usize> {
    let mut rng = rng();
    let mut c = vec![0; eps.len()];
    for _ in 0..n {
        c[b.pick(policy, eps, None, &mut rng).expect("an endpoint")] += 1;
    }
    c
}

#[test]
fn least_request_prefers_idle_endpoints() {
    let b = Balancer::new();
    let eps = views(&["a", "b", "c"], &[10, 0, 10]);
    let c = counts(&b, &LbPolicy::LeastRequest, &eps, 3000);
    // The idle endpoint wins every pair it is in: 2 of the 3 equally likely pairs.
    within_binomial(c[1], 3000, 2.0 / 3.0);
    // The busiest never wins a pair against a less busy one.
    let eps = views(&["a", "b", "c"], &[0, 5, 10]);
    let c = counts(&b, &LbPolicy::LeastRequest, &eps, 3000);
    assert_eq!(c[2], 0, "{c:?}");
    within_binomial(c[0], 3000, 2.0 / 3.0);
    // Equal load spreads evenly.
    let eps = views(&["a", "b", "c"], &[1, 1, 1]);
    let c = counts(&b, &LbPolicy::LeastRequest, &eps, 3000);
    for n in c {
        within_binomial(n, 3000, 1.0 / 3.0);
    }
}

#[test]
fn round_robin_cycles_and_random_spreads() {
    let b = Balancer::new();
    let eps = views(&["a", "b", "c"], &[9, 0, 0]);
    let mut rng = rng();
    let seq: Vec<usize> = (0..7)
        .map(|_| b.pick(&LbPolicy::RoundRobin, &eps, None, &mut rng).unwrap())
        .collect();
    assert_eq!(seq, [0, 1, 2, 0, 1, 2, 0]);
    let c = counts(&Balancer::new(), &LbPolicy::Random, &eps, 3000);
    for n in c {
        within_binomial(n, 3000, 1.0 / 3.0); // busy or not
    }
    assert_eq!(b.pick(&LbPolicy::RoundRobin, &[], None, &mut rng), None);
    assert_eq!(
        b.pick(&LbPolicy::LeastRequest, &eps[..1], None, &mut rng),
        Some(0)
    );
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn key(policy: &LbPolicy, h: &HeaderMap, path: &str, ip: Option<IpAddr>) -> HashKey {
    policy.hash_key(
        &HashRequest {
            headers: h,
            path_and_query: path,
            source_ip: ip,
        },
        &mut rng(),
    )
}

#[test]
fn consistent_hash_is_sticky_spreads_and_is_stable() {
    let policy = LbPolicy::ConsistentHash(HashOn::Header(HeaderName::from_static("x-user")));
    let names: Vec<String> = (0..4).map(|i| format!("10.0.0.{i}")).collect();
    let keys: Vec<&str> = names.iter().map(String::as_str).collect();
    let eps = views(&keys, &[0, 50, 0, 0]);
    let b = Balancer::new();
    let mut rng = rng();
    let pick_key = |b: &Balancer, eps: &[EndpointView<'_>], user: &str, rng: &mut StdRng| {
        let k = key(&policy, &headers(&[("x-user", user)]), "/", None).key;
        eps[b.pick(&policy, eps, k, rng).unwrap()].key.to_string()
    };
    // Sticky: the same user lands on the same endpoint, whatever its load.
    let first = pick_key(&b, &eps, "ann", &mut rng);
    for _ in 0..100 {
        assert_eq!(pick_key(&b, &eps, "ann", &mut rng), first);
    }
    // Spreads: 4000 users over 4 endpoints, each within a third of its fair share (a ring of
    // 1024 points gives each endpoint 256 arcs: shares vary by a few percent).
    let mut before = HashMap::new();
    let mut per: HashMap<String, usize> = HashMap::new();
    for u in 0..4000 {
        let e = pick_key(&b, &eps, &format!("user-{u}"), &mut rng);
        *per.entry(e.clone()).or_default() += 1;
        before.insert(u, e);
    }
    for k in &keys {
        let n = per.get(*k).copied().unwrap_or(0);
        assert!((667..=1333).contains(&n), "{k} got {n} of 4000: {per:?}");
    }
    // Order does not matter.
    let reversed: Vec<EndpointView<'_>> = eps.iter().rev().copied().collect();
    let b2 = Balancer::new();
    for u in 0..500 {
        assert_eq!(
            pick_key(&b2, &reversed, &format!("user-{u}"), &mut rng),
            before[&u]
        );
    }
    // One endpoint goes: only its users move.
    let without: Vec<EndpointView<'_>> = eps.iter().filter(|e| e.key != keys[2]).copied().collect();
    let mut moved = 0;
    for u in 0..4000 {
        let now = pick_key(&b, &without, &format!("user-{u}"), &mut rng);
        if before[&u] != keys[2] {
            assert_eq!(
                now, before[&u],
                "user-{u} moved although its endpoint stayed"
            );
        } else {
            moved += 1;
        }
    }
    assert!(moved > 0);
    // No header: no key (any endpoint will do).
    assert_eq!(
        key(&policy, &HeaderMap::new(), "/", None),
        HashKey::default()
    );
}

#[test]
fn hash_keys_from_cookie_source_ip_and_query() {
    let cookie = LbPolicy::ConsistentHash(HashOn::Cookie {
        name: "sticky".into(),
        path: Some("/app".into()),
        ttl: Some(std::time::Duration::from_secs(3600)),
    });
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let fresh = key(&cookie, &HeaderMap::new(), "/", Some(ip));
    let set = fresh
        .set_cookie
        .clone()
        .expect("a cookie to set when it is missing");
    assert!(
        set.starts_with("sticky=\"") && set.contains("Max-Age=3600") && set.contains("Path=/app"),
        "{set}"
    );
    // The client sends the cookie back: same key, nothing more to set.
    let value = set.split('"').nth(1).unwrap();
    let back = key(
        &cookie,
        &headers(&[("cookie", &format!("a=b; sticky={value}"))]),
        "/",
        Some("10.9.9.9".parse().unwrap()),
    );
    assert_eq!((back.key, back.set_cookie), (fresh.key, None));
    // Without a ttl no cookie is generated.
    let no_ttl = LbPolicy::ConsistentHash(HashOn::Cookie {
        name: "s".into(),
        path: None,
        ttl: None,
    });
    assert_eq!(
        key(&no_ttl, &HeaderMap::new(), "/", Some(ip)),
        HashKey::default()
    );
    // ttl 0: a session cookie (no Max-Age).
    let session = LbPolicy::ConsistentHash(HashOn::Cookie {
        name: "s".into(),
        path: None,
        ttl: Some(Default::default()),
    });
    assert!(
        !key(&session, &HeaderMap::new(), "/", Some(ip))
            .set_cookie
            .unwrap()
            .contains("Max-Age")
    );

    let by_ip = LbPolicy::ConsistentHash(HashOn::SourceIp);
    assert_eq!(
        key(&by_ip, &HeaderMap::new(), "/", Some(ip)).key,
        key(&by_ip, &HeaderMap::new(), "/x", Some(ip)).key
    );
    assert_ne!(
        key(&by_ip, &HeaderMap::new(), "/", Some(ip)).key,
        key(
            &by_ip,
            &HeaderMap::new(),
            "/",
            Some("10.1.2.4".parse().unwrap())
        )
        .key
    );
    let by_q = LbPolicy::ConsistentHash(HashOn::QueryParam("user".into()));
    assert_eq!(
        key(&by_q, &HeaderMap::new(), "/a?user=ann&x=1", None).key,
        key(&by_q, &HeaderMap::new(), "/b?user=ann", None).key
    );
    assert_eq!(key(&by_q, &HeaderMap::new(), "/a?x=1", None).key, None);
    assert_eq!(
        key(&LbPolicy::RoundRobin, &HeaderMap::new(), "/", Some(ip)),
        HashKey::default()
    );
}

#[test]
fn policy_per_port_and_subset_follows_istio_merge() {
    let services = vec![ServiceInfo {
        key: "mesh/web".into(),
        name: "web".into(),
        namespace: "mesh".into(),
        hostname: "web.mesh.svc.cluster.local".into(),
        ports: [80, 8080, 9090]
            .iter()
            .map(|p| PortInfo {
                port: *p,
                ..Default::default()
            })
            .collect(),
    }];
    let dr: Value = json!({"host": "web",
        "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}, "portLevelSettings": [
            {"port": {"number": 8080}, "loadBalancer": {"simple": "RANDOM"}},
            {"port": {"number": 9090}, "connectionPool": {}}]},
        "subsets": [
            {"name": "sticky", "labels": {"v": "1"}, "trafficPolicy": {"loadBalancer": {"consistentHash": {"useSourceIp": true}},
                "portLevelSettings": [{"port": {"number": 8080}, "loadBalancer": {"simple": "LEAST_REQUEST"}}]}},
            {"name": "plain", "labels": {"v": "2"}}]});
    let refs = [RouteResourceRef {
        kind: "DestinationRule",
        namespace: "mesh",
        name: "web",
        spec: &dr,
        generation_order: 0,
    }];
    let (t, d) = compile(&refs, &services, "cluster.local");
    assert!(
        d.iter()
            .all(|d| d.severity != meshcore::route::Severity::Error),
        "{d:?}"
    );
    assert_eq!(t.lb_policy("mesh/web", 80, None), LbPolicy::RoundRobin);
    assert_eq!(t.lb_policy("mesh/web", 8080, None), LbPolicy::Random);
    // A port entry without a loadBalancer replaces the top level: the default, not ROUND_ROBIN.
    assert_eq!(t.lb_policy("mesh/web", 9090, None), LbPolicy::LeastRequest);
    assert_eq!(
        t.lb_policy("mesh/web", 80, Some("sticky")),
        LbPolicy::ConsistentHash(HashOn::SourceIp)
    );
    assert_eq!(
        t.lb_policy("mesh/web", 8080, Some("sticky")),
        LbPolicy::LeastRequest
    );
    assert_eq!(
        t.lb_policy("mesh/web", 8080, Some("plain")),
        LbPolicy::Random
    );
    assert_eq!(t.lb_policy("mesh/other", 80, None), LbPolicy::LeastRequest);
}
