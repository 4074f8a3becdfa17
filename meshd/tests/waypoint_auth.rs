//! Waypoints as meshd clients: a service-account token gets its own certificate and nobody
//! else's, subscribes only as its own Gateway's waypoint, and is sent only what that waypoint
//! routes; a node token cannot pose as a waypoint; a bad route is refused and the last good one
//! stays served.

mod common;

use std::collections::BTreeSet;

use common::*;
use meshcore::Identity;
use meshcore::proto::ca::CertificateRequest;
use meshcore::proto::ca::certificate_service_client::CertificateServiceClient;
use meshcore::proto::config::config_service_client::ConfigServiceClient;
use meshcore::proto::config::{ConfigUpdate, SubscribeRequest};
use meshd::daemon::RunOptions;
use tonic::{Code, Streaming};

const APPS: &str = "
apiVersion: v1
kind: Service
metadata: {name: wp, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {clusterIP: 10.96.0.2, selector: {gateway.networking.k8s.io/gateway-name: wp}, ports: [{name: mesh, port: 15008}]}
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
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop}
spec: {clusterIP: 10.96.0.12, selector: {app: other}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}, annotations: {mesh.local/netns: /run/netns/web-1}}
spec: {nodeName: node-0, serviceAccountName: web}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api, version: v1}}
spec: {nodeName: node-1, serviceAccountName: api}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Namespace
metadata: {name: bank, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata:
  name: vault
  namespace: bank
  labels: {istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: vault}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: vault-1, namespace: bank, labels: {app: vault}}
spec: {nodeName: node-1, serviceAccountName: vault}
status: {podIP: 10.0.0.20}
---
apiVersion: v1
kind: Pod
metadata: {name: other-1, namespace: shop, labels: {app: other}}
spec: {nodeName: node-1, serviceAccountName: other}
status: {podIP: 10.0.0.12}
";

/// web's VirtualService (sends to api), api's DestinationRule, and other's (not bound) pair.
fn routes(web_regex: &str) -> String {
    routes_with(web_regex, "v1")
}

fn routes_with(web_regex: &str, subset: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web-vs, namespace: shop}}
spec:
  hosts: [web]
  http:
  - match: [{{uri: {{regex: '{web_regex}'}}}}]
    route: [{{destination: {{host: api, subset: {subset}}}}}]
  - route: [{{destination: {{host: web}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api-dr, namespace: shop}}
spec: {{host: api, subsets: [{{name: v1, labels: {{version: v1}}}}]}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: other-vs, namespace: shop}}
spec: {{hosts: [other], http: [{{route: [{{destination: {{host: other}}}}]}}]}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: other-dr, namespace: shop}}
spec: {{host: other}}
"
    )
}

async fn start() -> Meshd {
    let gateways = [waypoint_gateway("wp", ""), waypoint_gateway("wp2", "")].join("---\n");
    Meshd::start_with(
        &[
            ("00-ns.yaml", NAMESPACES),
            ("10-gw.yaml", &gateways),
            ("20-apps.yaml", APPS),
            ("30-routes.yaml", &routes("/api/.*")),
        ],
        |dir| RunOptions {
            write_dir: Some(dir.join("out")),
            ..Default::default()
        },
    )
    .await
}

fn cert_req(identity: &str, token: &str) -> tonic::Request<CertificateRequest> {
    let id: Identity = identity.parse().unwrap();
    request(
        CertificateRequest {
            csr_pem: meshcore::ca::generate_csr(&id).unwrap().1,
            identity: identity.into(),
            validity_seconds: 600,
        },
        Some(token),
    )
}

fn sub(node: &str, waypoint: &str, token: &str) -> tonic::Request<SubscribeRequest> {
    request(
        SubscribeRequest {
            node: node.into(),
            waypoint: waypoint.into(),
        },
        Some(token),
    )
}

async fn next(stream: &mut Streaming<ConfigUpdate>) -> ConfigUpdate {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("timed out waiting for a config update")
        .expect("stream failed")
        .expect("stream ended")
}

fn keys<'a>(it: impl Iterator<Item = &'a str>) -> BTreeSet<&'a str> {
    it.collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_token_gets_only_its_own_certificate() {
    let meshd = start().await;
    let mut ca = CertificateServiceClient::new(meshd.channel().await);
    let wp = meshd.sa_token("shop", "wp");
    let own = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/wp");
    let resp = ca.create_certificate(cert_req(&own, &wp)).await.unwrap();
    assert!(resp.into_inner().cert_chain_pem[0].contains("BEGIN CERTIFICATE"));
    // Another identity of its namespace, one of another namespace: refused, saying why.
    for other in ["ns/shop/sa/web", "ns/bank/sa/wp"] {
        let id = format!("spiffe://{TRUST_DOMAIN}/{other}");
        let err = ca.create_certificate(cert_req(&id, &wp)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{other}: {err:?}");
        assert!(err.message().contains("only its own identity"), "{err:?}");
    }
    // Nodes keep their rule: node-0 runs web-1 (sa web), not api.
    let node = meshd.token("node-0");
    let web = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/web");
    ca.create_certificate(cert_req(&web, &node)).await.unwrap();
    let api = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/api");
    let err = ca
        .create_certificate(cert_req(&api, &node))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    meshd.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_subscribes_only_as_itself_and_gets_only_its_routes() {
    let meshd = start().await;
    let mut client = ConfigServiceClient::new(meshd.channel().await);
    let wp = meshd.sa_token("shop", "wp");

    // Who may subscribe as what.
    let denied = [
        ("shop/wp2", wp.clone(), "runs as service account wp2"),
        ("", wp.clone(), "set `waypoint`"),
        (
            "shop/wp",
            meshd.sa_token("bank", "wp"),
            "not in namespace bank",
        ),
        ("shop/ghost", wp.clone(), "no waypoint Gateway shop/ghost"),
        ("shop/wp", meshd.token("node-0"), "service-account token"),
    ];
    for (waypoint, token, why) in denied {
        let err = client
            .subscribe(sub("node-0", waypoint, &token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{why}: {err:?}");
        assert!(err.message().contains(why), "{why}: {err:?}");
    }

    let mut stream = client
        .subscribe(sub("node-0", "shop/wp", &wp))
        .await
        .unwrap()
        .into_inner();
    let snap = next(&mut stream).await;
    assert!(snap.snapshot);
    assert_eq!(
        keys(snap.services.iter().map(|s| s.key.as_str())),
        keys(["shop/api", "shop/web"].into_iter()),
        "the bound service and what its routes send to; not bank/vault, bound to it from a \
         namespace its listener does not allow"
    );
    assert_eq!(
        keys(snap.workloads.iter().map(|w| w.uid.as_str())),
        keys(["shop/api-1", "shop/web-1"].into_iter()),
        "their endpoints"
    );
    assert!(
        snap.workloads
            .iter()
            .all(|w| w.netns.is_empty() && w.annotations.is_empty())
    );
    assert_eq!(
        keys(snap.routes.iter().map(|r| r.key.as_str())),
        keys(["VirtualService/shop/web-vs", "DestinationRule/shop/api-dr"].into_iter())
    );
    assert!(snap.policies.is_empty());
    assert!(snap.trust_bundle.is_some());
    let web_vs = snap.routes.iter().find(|r| r.name == "web-vs").unwrap();
    assert!(web_vs.spec_json.contains("/api/.*"), "{}", web_vs.spec_json);

    // A bad regex is refused, naming file, resource and field; the last good version stays:
    // the next update is the valid edit made after it, and nothing else.
    meshd.write("30-routes.yaml", &routes("(unclosed"));
    let status = meshd
        .dir
        .path()
        .join("out/status/VirtualService.shop.web-vs.json");
    let s = status.clone();
    wait_for("the refusal in the route's status", move || {
        let s = s.clone();
        async move { std::fs::read_to_string(&s).is_ok_and(|t| t.contains("\"False\"")) }
    })
    .await;
    let text = std::fs::read_to_string(&status).unwrap();
    for part in [
        "30-routes.yaml",
        "VirtualService shop/web-vs",
        "spec.http[0].match[0].uri.regex",
        "last good version",
    ] {
        assert!(text.contains(part), "{part} in {text}");
    }
    meshd.write(
        "20-apps.yaml",
        &APPS.replace("version: v1", "version: v1, x: y"),
    );
    let d = next(&mut stream).await;
    assert!(!d.snapshot);
    assert_eq!(
        keys(d.workloads.iter().map(|w| w.uid.as_str())),
        keys(["shop/api-1"].into_iter())
    );
    assert!(
        d.routes.is_empty() && d.removed_routes.is_empty(),
        "the refused edit changed nothing: {d:?}"
    );

    // A valid edit of the route reaches the waypoint; one of another service's does not.
    meshd.write("30-routes.yaml", &routes("/v2/.*"));
    let d = next(&mut stream).await;
    assert_eq!(d.routes.len(), 1, "{d:?}");
    assert!(d.routes[0].spec_json.contains("/v2/.*"));

    // Valid on its own but naming a subset no DestinationRule defines: refused by the mesh-wide
    // check, the last good version stays (the waypoint would otherwise drop the resource).
    meshd.write("30-routes.yaml", &routes_with("/v3/.*", "v9"));
    let s = status.clone();
    wait_for("the subset refusal in the route's status", move || {
        let s = s.clone();
        async move { std::fs::read_to_string(&s).is_ok_and(|t| t.contains("v9")) }
    })
    .await;
    let text = std::fs::read_to_string(&status).unwrap();
    for part in [
        "spec.http[0].route[0].destination.subset",
        "\"False\"",
        "last good version",
    ] {
        assert!(text.contains(part), "{part} in {text}");
    }
    meshd.write("20-apps.yaml", APPS);
    let d = next(&mut stream).await;
    assert_eq!(
        keys(d.workloads.iter().map(|w| w.uid.as_str())),
        keys(["shop/api-1"].into_iter())
    );
    assert!(
        d.routes.is_empty() && d.removed_routes.is_empty(),
        "the refused edit changed nothing: {d:?}"
    );
    meshd.stop().await.unwrap();
}
