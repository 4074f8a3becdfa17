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
        "every node sees all workloads"
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
            },
            token,
        )
    };

    let err = client.subscribe(req(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("authorization: Bearer"), "{err:?}");

    let foreign = meshcore::nodeauth::NodeAuthority::new(b"some other secret").token("node-0");
    let err = client.subscribe(req(Some(&foreign))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let other_node = meshd.token("node-1");
    let err = client.subscribe(req(Some(&other_node))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    meshd.stop().await.unwrap();
}
