//! L7 policy reaches the waypoint that enforces it: a waypoint's subscription carries the
//! AuthorizationPolicies and RequestAuthentications attached with `targetRefs` to its Gateway,
//! to a Service bound to it, or (from the root namespace) to the waypoint GatewayClass, plus the
//! Service a `jwksUri` names — and nothing else; ztunnels still get every policy of their
//! namespaces, as before.

mod common;

use std::collections::BTreeSet;

use common::*;
use meshcore::proto::config::config_service_client::ConfigServiceClient;
use meshcore::proto::config::{ConfigUpdate, SubscribeRequest};

const APPS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none}}
spec: {nodeName: node-0, serviceAccountName: wp}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop}
spec: {clusterIP: 10.96.0.12, selector: {app: other}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: keys, namespace: shop}
spec: {clusterIP: 10.96.0.13, selector: {app: keys}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-0, serviceAccountName: web}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: keys-1, namespace: shop, labels: {app: keys}}
spec: {nodeName: node-0, serviceAccountName: keys}
status: {podIP: 10.0.0.13}
";

fn policy(kind: &str, ns: &str, name: &str, spec: &str) -> String {
    let api = "security.istio.io/v1";
    format!(
        "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

fn policies() -> String {
    let gw = "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]";
    let gw2 = "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp2}]";
    let class = "targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}]";
    let svc = |n: &str| format!("targetRefs: [{{group: '', kind: Service, name: {n}}}]");
    [
        policy("AuthorizationPolicy", "shop", "on-gateway", &format!("{{{gw}, action: DENY, rules: [{{to: [{{operation: {{paths: [/admin]}}}}]}}]}}")),
        policy("AuthorizationPolicy", "shop", "on-web", &format!("{{{}, rules: [{{}}]}}", svc("web"))),
        policy("AuthorizationPolicy", "istio-system", "on-class", &format!("{{{class}, action: AUDIT, rules: [{{}}]}}")),
        policy("AuthorizationPolicy", "shop", "on-other", &format!("{{{}, rules: [{{}}]}}", svc("other"))),
        policy("AuthorizationPolicy", "shop", "on-wp2", &format!("{{{gw2}, rules: [{{}}]}}")),
        policy("AuthorizationPolicy", "shop", "selector", "{selector: {matchLabels: {app: web}}, rules: [{}]}"),
        policy("PeerAuthentication", "shop", "strict", "{mtls: {mode: STRICT}}"),
        policy("RequestAuthentication", "shop", "jwt", &format!(
            "{{{gw}, jwtRules: [{{issuer: https://issuer.test, jwksUri: 'http://keys.shop.svc.cluster.local/jwks'}}]}}")),
    ]
    .join("---\n")
}

fn keys<'a>(it: impl Iterator<Item = &'a str>) -> BTreeSet<&'a str> {
    it.collect()
}

async fn snapshot(meshd: &Meshd, node: &str, waypoint: &str, token: &str) -> ConfigUpdate {
    let mut client = ConfigServiceClient::new(meshd.channel().await);
    let mut stream = client
        .subscribe(request(
            SubscribeRequest {
                node: node.into(),
                waypoint: waypoint.into(),
            },
            Some(token),
        ))
        .await
        .expect("subscribe")
        .into_inner();
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("a snapshot in time")
        .expect("stream")
        .expect("a snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_gets_the_policies_attached_to_it_and_the_jwks_service() {
    let gateways = [waypoint_gateway("wp", ""), waypoint_gateway("wp2", "")].join("---\n");
    let meshd = Meshd::start(&[
        ("00-ns.yaml", NAMESPACES),
        ("10-gw.yaml", &gateways),
        ("20-apps.yaml", APPS),
        ("30-policies.yaml", &policies()),
    ])
    .await;
    let snap = snapshot(&meshd, "node-0", "shop/wp", &meshd.sa_token("shop", "wp")).await;
    assert_eq!(
        keys(snap.policies.iter().map(|p| p.key.as_str())),
        keys(
            [
                "AuthorizationPolicy/shop/on-gateway",
                "AuthorizationPolicy/shop/on-web",
                "AuthorizationPolicy/istio-system/on-class",
                "RequestAuthentication/shop/jwt",
            ]
            .into_iter()
        )
    );
    assert_eq!(
        keys(snap.services.iter().map(|s| s.key.as_str())),
        keys(["shop/keys", "shop/web"].into_iter()),
        "the bound service, and the one serving the JWKS"
    );
    assert!(
        snap.workloads.iter().any(|w| w.uid == "shop/keys-1"),
        "the JWKS service's endpoint"
    );

    // ztunnel is sent the policies of its namespaces and of the root namespace that it
    // enforces: not those attached with targetRefs, not RequestAuthentications.
    let node = snapshot(&meshd, "node-0", "", &meshd.token("node-0")).await;
    assert_eq!(
        keys(node.policies.iter().map(|p| p.key.as_str())),
        keys(
            [
                "AuthorizationPolicy/shop/selector",
                "PeerAuthentication/shop/strict"
            ]
            .into_iter()
        )
    );
}
