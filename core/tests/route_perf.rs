//! How long a routing decision and an endpoint pick take (for the waypoint's CPU budget).
//! Ignored by default; run with
//! `cargo test --release -p meshcore --test route_perf -- --ignored --nocapture`. Prints, asserts
//! nothing about time.

use std::time::Instant;

use http::{HeaderMap, HeaderValue};
use meshcore::route::lb::{Balancer, EndpointView, HashOn, LbPolicy};
use meshcore::route::{
    HttpDecision, HttpRequestInfo, PortInfo, RouteResourceRef, ServiceInfo, compile,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;

#[test]
#[ignore]
fn decision_and_pick_cost() {
    let services = vec![ServiceInfo {
        key: "mesh/web".into(),
        name: "web".into(),
        namespace: "mesh".into(),
        hostname: "web.mesh.svc.cluster.local".into(),
        ports: vec![PortInfo {
            port: 80,
            ..Default::default()
        }],
    }];
    let mut rules: Vec<_> = (0..10)
        .map(|i| json!({"match": [{"uri": {"prefix": format!("/api/v{i}")}, "headers": {"x-user-group": {"exact": "beta"}}}],
                        "route": [{"destination": {"host": "web", "subset": "canary"}}]}))
        .collect();
    rules.push(json!({"route": [{"destination": {"host": "web", "subset": "stable"}, "weight": 90},
                                {"destination": {"host": "web", "subset": "canary"}, "weight": 10}]}));
    let vs = json!({"hosts": ["web"], "http": rules});
    let dr = json!({"host": "web", "subsets": [{"name": "stable", "labels": {"v": "1"}}, {"name": "canary", "labels": {"v": "2"}}]});
    let refs = [
        RouteResourceRef {
            kind: "DestinationRule",
            namespace: "mesh",
            name: "web",
            spec: &dr,
            generation_order: 0,
        },
        RouteResourceRef {
            kind: "VirtualService",
            namespace: "mesh",
            name: "web",
            spec: &vs,
            generation_order: 1,
        },
    ];
    let (table, _) = compile(&refs, &services, "cluster.local");
    let mut headers = HeaderMap::new();
    headers.insert("x-user-group", HeaderValue::from_static("alpha"));
    headers.insert("user-agent", HeaderValue::from_static("curl/8"));
    let info = HttpRequestInfo {
        service: "mesh/web",
        port: 80,
        method: "GET",
        scheme: "http",
        authority: "web",
        path_and_query: "/api/v9/items?id=3",
        headers: &headers,
        client_namespace: Some("mesh"),
    };
    let mut rng = StdRng::seed_from_u64(1);
    let n = 1_000_000;
    let start = Instant::now();
    let mut forwards = 0;
    for _ in 0..n {
        if let HttpDecision::Forward(_) = table.http_with(&info, &mut rng) {
            forwards += 1;
        }
    }
    let per = start.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "http decision through 10 non-matching rules + 90/10 split: {per:.0} ns ({forwards} forwards)"
    );

    let (empty, _) = compile(&[], &services, "cluster.local");
    let start = Instant::now();
    for _ in 0..n {
        if let HttpDecision::Forward(_) = empty.http_with(&info, &mut rng) {
            forwards += 1;
        }
    }
    let per = start.elapsed().as_nanos() as f64 / n as f64;
    println!("http decision, no routes (default forward): {per:.0} ns ({forwards} forwards)");

    let keys: Vec<String> = (0..20).map(|i| format!("10.0.0.{i}")).collect();
    let eps: Vec<EndpointView<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| EndpointView {
            key: k,
            active: i as u32 % 3,
        })
        .collect();
    let b = Balancer::new();
    for (name, policy, hash) in [
        ("least request", LbPolicy::LeastRequest, None),
        ("round robin", LbPolicy::RoundRobin, None),
        (
            "ring hash",
            LbPolicy::ConsistentHash(HashOn::SourceIp),
            Some(0x1234_5678_9abc_def0u64),
        ),
    ] {
        let start = Instant::now();
        let mut sum = 0;
        for i in 0..n {
            sum += b
                .pick(&policy, &eps, hash.map(|h| h ^ i as u64), &mut rng)
                .unwrap_or(0);
        }
        let per = start.elapsed().as_nanos() as f64 / n as f64;
        println!("pick among 20 endpoints, {name}: {per:.0} ns (checksum {sum})");
    }
}
