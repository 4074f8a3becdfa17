//! The config stream over a real unix socket: snapshot, deltas, bad files, deletions, auth.

mod common;

use common::*;
use meshcore::proto::config::config_service_client::ConfigServiceClient;
use meshcore::proto::config::{ConfigUpdate, SubscribeRequest};
use tonic::{Code, Streaming};

async fn next(stream: &mut Streaming<ConfigUpdate>) -> ConfigUpdate {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("timed out waiting for a config update")
        .expect("stream failed")
        .expect("stream ended")
}

fn uids(u: &ConfigUpdate) -> Vec<&str> {
    u.workloads.iter().map(|w| w.uid.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_deltas() {
    let a = pod("a", "node-0", "sa-a", "10.0.0.1", "a");
    let b = pod("b", "node-1", "sa-b", "10.0.0.2", "b");
    let meshd = Meshd::start(&[
        ("00-ns.yaml", NAMESPACES),
        ("10-a.yaml", &a),
        ("20-b.yaml", &b),
    ])
    .await;
    let mut client = ConfigServiceClient::new(meshd.channel().await);
    let token = meshd.token("node-0");
    let mut stream = client
        .subscribe(request(
            SubscribeRequest {
                node: "node-0".into(),
                ..Default::default()
            },
            Some(&token),
        ))
        .await
        .unwrap()
        .into_inner();

    let snap = next(&mut stream).await;
    assert!(snap.snapshot);
    assert_eq!(
        uids(&snap),
        vec!["shop/a", "shop/b"],
        "every node sees all workloads (to route to them)"
    );
    assert!(
        snap.workloads
            .iter()
            .all(|w| w.captured && w.trust_domain == TRUST_DOMAIN)
    );
    let tb = snap
        .trust_bundle
        .as_ref()
        .expect("snapshot carries the trust bundle");
    assert_eq!(tb.trust_domain, TRUST_DOMAIN);
    assert!(tb.roots_pem[0].contains("BEGIN CERTIFICATE"));

    // An edit sends just that change.
    meshd.write("10-a.yaml", &pod("a", "node-0", "sa-a", "10.0.0.1", "a2"));
    let d = next(&mut stream).await;
    assert!(!d.snapshot);
    assert!(d.version > snap.version);
    assert_eq!(uids(&d), vec!["shop/a"]);
    assert_eq!(
        d.workloads[0].labels.get("app").map(String::as_str),
        Some("a2")
    );
    assert!(d.removed_workloads.is_empty() && d.services.is_empty() && d.trust_bundle.is_none());

    // A broken new file and an existing file broken in place change nothing. A valid edit made
    // after them is the next update, and it holds only its own change: had the bad files been
    // applied, their effect would have arrived first or with it.
    meshd.write(
        "99-broken.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: [oops\n",
    );
    meshd.write(
        "20-b.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: b\n  labels: [\n",
    );
    meshd.write("30-c.yaml", &pod("c", "node-1", "sa-c", "10.0.0.3", "c"));
    let d2 = next(&mut stream).await;
    assert_eq!(uids(&d2), vec!["shop/c"], "{d2:?}");
    assert!(
        d2.removed_workloads.is_empty(),
        "last good content of 20-b.yaml stays: {d2:?}"
    );
    assert!(d2.version > d.version);

    // Deleting a file removes its resources; fixing a broken file applies it.
    std::fs::remove_file(meshd.config.join("10-a.yaml")).unwrap();
    let d3 = next(&mut stream).await;
    assert_eq!(d3.removed_workloads, vec!["shop/a"]);
    assert!(d3.workloads.is_empty());
    meshd.write("20-b.yaml", &pod("b", "node-1", "sa-b", "10.0.0.22", "b"));
    let d4 = next(&mut stream).await;
    assert_eq!(uids(&d4), vec!["shop/b"]);
    assert_eq!(d4.workloads[0].ips, vec!["10.0.0.22"]);

    // A second subscriber's snapshot reflects the current state.
    let mut s2 = client
        .subscribe(request(
            SubscribeRequest {
                node: "node-0".into(),
                ..Default::default()
            },
            Some(&token),
        ))
        .await
        .unwrap()
        .into_inner();
    let snap2 = next(&mut s2).await;
    assert!(snap2.snapshot);
    assert_eq!(uids(&snap2), vec!["shop/b", "shop/c"]);
    assert_eq!(snap2.version, d4.version);

    // Shutdown ends open streams instead of hanging on them.
    meshd.stop().await.unwrap();
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("stream did not end");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_requires_the_nodes_token() {
    let meshd = Meshd::start(&[("00-ns.yaml", NAMESPACES)]).await;
    let mut client = ConfigServiceClient::new(meshd.channel().await);
    let req = |token: Option<&str>| {
        request(
            SubscribeRequest {
                node: "node-0".into(),
                ..Default::default()
            },
            token,
        )
    };

    let err = client.subscribe(req(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("authorization: Bearer"), "{err:?}");

    let foreign = meshcore::nodeauth::NodeAuthority::new(b"some other secret")
        .token("node-0", std::time::Duration::from_secs(3600));
    let err = client.subscribe(req(Some(&foreign))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let other_node = meshd.token("node-1");
    let err = client.subscribe(req(Some(&other_node))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    meshd.stop().await.unwrap();
}

fn policy(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec: {{action: DENY, rules: [{{to: [{{operation: {{ports: [\"9090\"]}}}}]}}]}}
"
    )
}

fn pod_in(ns: &str, name: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, annotations: {{mesh.local/netns: /run/netns/{name}, x/knob: secret}}}}
spec: {{nodeName: {node}}}
status: {{podIP: {ip}}}
"
    )
}

fn policy_keys(u: &ConfigUpdate) -> Vec<&str> {
    u.policies.iter().map(|p| p.key.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_sent_only_what_it_needs() {
    let namespaces = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: billing, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
";
    let meshd = Meshd::start(&[
        ("00-ns.yaml", namespaces),
        ("10-a.yaml", &pod_in("shop", "a", "node-0", "10.0.0.1")),
        ("20-b.yaml", &pod_in("billing", "b", "node-1", "10.0.0.2")),
        ("30-p-shop.yaml", &policy("shop", "p-shop")),
        ("31-p-billing.yaml", &policy("billing", "p-billing")),
        ("32-p-mesh.yaml", &policy("istio-system", "p-mesh")),
    ])
    .await;
    let mut client = ConfigServiceClient::new(meshd.channel().await);
    let token = meshd.token("node-0");
    let mut stream = client
        .subscribe(request(
            SubscribeRequest {
                node: "node-0".into(),
                ..Default::default()
            },
            Some(&token),
        ))
        .await
        .unwrap()
        .into_inner();
    let snap = next(&mut stream).await;

    // Every workload, to route to it; only this node's keep where they live and their knobs.
    assert_eq!(uids(&snap), vec!["billing/b", "shop/a"]);
    let a = &snap.workloads[1];
    assert_eq!(a.netns, "/run/netns/a");
    assert_eq!(
        a.annotations.get("x/knob").map(String::as_str),
        Some("secret")
    );
    let b = &snap.workloads[0];
    assert!(b.netns.is_empty(), "another node's netns path: {b:?}");
    assert!(
        b.annotations.is_empty(),
        "another node's annotations: {b:?}"
    );
    assert_eq!(b.ips, vec!["10.0.0.2"], "what routing needs stays");
    assert_eq!(b.service_account, "default");
    // Policies of namespaces with a pod here, and the root namespace's.
    assert_eq!(
        policy_keys(&snap),
        vec![
            "AuthorizationPolicy/istio-system/p-mesh",
            "AuthorizationPolicy/shop/p-shop"
        ]
    );

    // A billing pod scheduled here brings billing's policies, in the next update.
    meshd.write("40-c.yaml", &pod_in("billing", "c", "node-0", "10.0.0.3"));
    let d = next(&mut stream).await;
    assert_eq!(uids(&d), vec!["billing/c"]);
    assert_eq!(d.workloads[0].netns, "/run/netns/c");
    assert_eq!(
        policy_keys(&d),
        vec!["AuthorizationPolicy/billing/p-billing"]
    );
    // And leaving takes them away again.
    std::fs::remove_file(meshd.config.join("40-c.yaml")).unwrap();
    let d = next(&mut stream).await;
    assert_eq!(d.removed_workloads, vec!["billing/c"]);
    assert_eq!(
        d.removed_policies,
        vec!["AuthorizationPolicy/billing/p-billing"]
    );

    // node-1 sees the mirror image.
    let token1 = meshd.token("node-1");
    let mut s1 = client
        .subscribe(request(
            SubscribeRequest {
                node: "node-1".into(),
                ..Default::default()
            },
            Some(&token1),
        ))
        .await
        .unwrap()
        .into_inner();
    let snap1 = next(&mut s1).await;
    assert_eq!(
        policy_keys(&snap1),
        vec![
            "AuthorizationPolicy/billing/p-billing",
            "AuthorizationPolicy/istio-system/p-mesh"
        ]
    );
    let a1 = snap1.workloads.iter().find(|w| w.uid == "shop/a").unwrap();
    assert!(a1.netns.is_empty() && a1.annotations.is_empty(), "{a1:?}");
    meshd.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_old_format_tokens_are_refused_clearly() {
    let meshd = Meshd::start(&[("00-ns.yaml", NAMESPACES)]).await;
    let mut client = ConfigServiceClient::new(meshd.channel().await);
    let req = |token: &str| {
        request(
            SubscribeRequest {
                node: "node-0".into(),
                ..Default::default()
            },
            Some(token),
        )
    };
    let auth = meshd::state::node_authority(&meshd.state).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = auth.token_expiring_at("node-0", now - 1);
    let err = client.subscribe(req(&expired)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{err:?}");
    assert!(err.message().contains("meshd node-token"), "{err:?}");

    // The first format (`node:<name>:<mac>`) proved a name forever: refused, saying what to do.
    let (head, mac) = expired.rsplit_once(':').unwrap();
    let old = format!("{}:{mac}", head.rsplit_once(':').unwrap().0);
    let err = client.subscribe(req(&old)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("old format"), "{err:?}");

    let valid = auth.token_expiring_at("node-0", now + 600);
    client.subscribe(req(&valid)).await.expect("a valid token");
    meshd.stop().await.unwrap();
}
