//! Node identity in Kubernetes mode, against the API server double: callers present projected
//! service-account tokens, meshd reviews them (TokenReview) and maps a ztunnel's to the node of
//! the pod it is bound to; the CA keeps refusing identities of pods on other nodes; gRPC is
//! TLS only on TCP, verified with the root meshd publishes in its ConfigMap; the CA root lives
//! in a Secret that every replica follows, rotation included.

#[path = "common/kube_h5.rs"]
mod kube_h5;

use kube_h5::*;
use testbed::kubeapi::TokenSpec;
use tonic::Code;

fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, says: &str, token: &str) {
    let e = r.expect_err("must be refused");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(says),
        "{:?} lacks {says:?}",
        e.message()
    );
    assert!(!e.message().contains(token), "the token was echoed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_grants_a_nodes_own_pods_and_refuses_every_other_token() {
    let api = cluster();
    let meshd = Replica::start(&api, "meshd-0").await;
    let root = configmap_root(&api).await;
    let ch = tls_channel(&meshd.addr, &root);
    let za = ztunnel_a(&api);

    // ztunnel-a's token: node-a's pods, not node-b's.
    let cert = certificate(&ch, Some(&za), "app", "web")
        .await
        .expect("node-a's ztunnel gets the identity of a pod on node-a");
    assert!(signed_by(&cert.cert_chain_pem[0], &root));
    let e = certificate(&ch, Some(&za), "app", "db").await;
    refused(e, Code::PermissionDenied, "node node-a may not", &za);

    // A token of ztunnel-a's pod for another audience (Istio's, say).
    let istio = pod_token(&api, NS, "ztunnel-a", "ztunnel", "istio-ca");
    let e = certificate(&ch, Some(&istio), "app", "web").await;
    refused(e, Code::Unauthenticated, "audience: mesh-ca", &istio);

    // An expired one.
    let expired = api.issue_token(TokenSpec {
        namespace: NS.into(),
        service_account: "ztunnel".into(),
        audiences: vec!["mesh-ca".into()],
        pod: Some(("ztunnel-a".into(), uid(&api, NS, "ztunnel-a"))),
        node: Some("node-a".into()),
        expires_at: now() - 1,
    });
    let e = certificate(&ch, Some(&expired), "app", "web").await;
    refused(e, Code::Unauthenticated, "expired", &expired);

    // ztunnel's service account, but not bound to a pod: it proves no node.
    let unbound = api.issue_token(TokenSpec {
        namespace: NS.into(),
        service_account: "ztunnel".into(),
        audiences: vec!["mesh-ca".into()],
        pod: None,
        node: None,
        expires_at: now() + 600,
    });
    let e = certificate(&ch, Some(&unbound), "app", "web").await;
    refused(e, Code::Unauthenticated, "bound to ztunnel's pod", &unbound);

    // A token of a ztunnel pod that was deleted; a new pod has its name (and another uid).
    let stale = pod_token(&api, NS, "ztunnel-b", "ztunnel", "mesh-ca");
    let old_uid = uid(&api, NS, "ztunnel-b");
    api.delete("v1", "Pod", Some(NS), "ztunnel-b").unwrap();
    wait(DEADLINE, "ztunnel-b deleted", || {
        api.get("v1", "Pod", Some(NS), "ztunnel-b").is_none()
    })
    .await;
    api.create(pod(NS, "ztunnel-b", "ztunnel", "node-b", "10.0.1.10"))
        .unwrap();
    assert_ne!(uid(&api, NS, "ztunnel-b"), old_uid);
    let e = certificate(&ch, Some(&stale), "app", "db").await;
    refused(e, Code::Unauthenticated, "was deleted", &stale);
    let zb = pod_token(&api, NS, "ztunnel-b", "ztunnel", "mesh-ca");
    certificate(&ch, Some(&zb), "app", "db")
        .await
        .expect("the new ztunnel-b pod's own token works");

    // Any other service account proves only itself, never a node.
    let web = pod_token(&api, "app", "web", "web", "mesh-ca");
    let e = certificate(&ch, Some(&web), "app", "db").await;
    refused(e, Code::PermissionDenied, "only its own identity", &web);
    certificate(&ch, Some(&web), "app", "web")
        .await
        .expect("a service account gets its own identity");

    // No token at all.
    let e = certificate(&ch, None, "app", "web").await;
    refused(e, Code::Unauthenticated, "no credentials", "(no token)");

    // meshd's own node tokens keep working next to Kubernetes tokens.
    let own = meshd::state::node_authority(&meshd.dir.path().join("state"))
        .unwrap()
        .token("node-a", std::time::Duration::from_secs(600));
    certificate(&ch, Some(&own), "app", "web")
        .await
        .expect("a meshd node token");

    // The config stream authenticates the same way.
    let (first, _stream) = subscribe(&ch, Some(&za), "node-a")
        .await
        .expect("node-a's ztunnel subscribes as node-a");
    assert!(first.snapshot);
    let e = subscribe(&ch, Some(&za), "node-b").await.map(|_| ());
    refused(e, Code::PermissionDenied, "node-b", &za);
    let e = subscribe(&ch, Some(&istio), "node-a").await.map(|_| ());
    refused(e, Code::Unauthenticated, "audience: mesh-ca", &istio);

    // With the API unreachable, a token meshd has not seen cannot be judged: UNAVAILABLE (the
    // caller retries), not a refusal it would take as final.
    let fresh = ztunnel_a(&api);
    api.go_down();
    let e = certificate(&ch, Some(&fresh), "app", "web").await;
    api.come_back();
    refused(e, Code::Unavailable, "cannot verify the token now", &fresh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_grpc_is_not_offered_on_tcp() {
    let api = cluster();
    let meshd = Replica::start(&api, "meshd-0").await;
    let za = ztunnel_a(&api);
    // The same call with a valid token succeeds over TLS...
    let root = configmap_root(&api).await;
    certificate(&tls_channel(&meshd.addr, &root), Some(&za), "app", "web")
        .await
        .expect("over TLS");
    // ...and gets no service in plaintext (h2c).
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", meshd.addr))
        .unwrap()
        .connect_lazy();
    let e = certificate(&plain, Some(&za), "app", "web")
        .await
        .expect_err("plaintext TCP was served");
    // Failed in the transport (the connection), not answered by meshd.
    assert!(std::error::Error::source(&e).is_some(), "{e:?}");
}

/// Runs `meshd ca <step> --kubernetes` against the double.
async fn ca_step(api: &testbed::kubeapi::ApiServer, step: &str) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args([
            "ca",
            step,
            "--kubernetes",
            "--namespace",
            NS,
            "--trust-domain",
            TD,
        ])
        .arg("--kubeconfig")
        .arg(api.kubeconfig())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "meshd ca {step}: {out:?}");
}

/// Reads `stream` until an update carries a trust bundle of `n` roots.
async fn bundle_of(stream: &mut tonic::Streaming<meshcore::proto::config::ConfigUpdate>, n: usize) {
    let until = async {
        while let Some(u) = stream.message().await.expect("the stream stays up") {
            if u.trust_bundle.is_some_and(|b| b.roots_pem.len() == n) {
                return;
            }
        }
        panic!("the stream ended");
    };
    tokio::time::timeout(DEADLINE, until)
        .await
        .unwrap_or_else(|_| panic!("no trust bundle of {n} roots"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sign_with_the_root_in_the_secret_and_follow_its_rotation() {
    let api = cluster();
    assert!(ca_secret(&api).is_none());
    // Two replicas with empty state directories, started at once: one creates the Secret, the
    // other uses it (whichever way the race goes).
    let (a, b) = tokio::join!(
        Replica::start(&api, "meshd-0"),
        Replica::start(&api, "meshd-1")
    );
    let secret = ca_secret(&api).expect("the CA Secret was created");
    let root = String::from_utf8(secret["root-cert.pem"].clone()).unwrap();
    assert_eq!(a.local_root(), root);
    assert_eq!(b.local_root(), root);
    let published = configmap_root(&api).await;
    assert_eq!(published.trim(), root.trim());

    // Clients trusting only the ConfigMap's root reach both; both sign with that root.
    let za = ztunnel_a(&api);
    let (cha, chb) = (
        tls_channel(&a.addr, &published),
        tls_channel(&b.addr, &published),
    );
    for ch in [&cha, &chb] {
        let cert = certificate(ch, Some(&za), "app", "web").await.unwrap();
        assert!(signed_by(&cert.cert_chain_pem[0], &root));
    }
    let (first_a, mut stream_a) = subscribe(&cha, Some(&za), "node-a").await.unwrap();
    let (first_b, mut stream_b) = subscribe(&chb, Some(&za), "node-a").await.unwrap();
    for first in [&first_a, &first_b] {
        assert_eq!(
            first.trust_bundle.as_ref().map(|b| b.roots_pem.len()),
            Some(1)
        );
    }

    // Step 1 on the Secret reaches both replicas' config streams, and the ConfigMap.
    ca_step(&api, "prepare-rotation").await;
    bundle_of(&mut stream_a, 2).await;
    bundle_of(&mut stream_b, 2).await;
    let next = ca_secret(&api).unwrap()["next-root-cert.pem"].clone();
    let next = String::from_utf8(next).unwrap();
    wait(DEADLINE, "both roots in the ConfigMap", || {
        root_configmap_now(&api)
            .is_some_and(|pem| pem.contains(next.trim()) && pem.contains(root.trim()))
    })
    .await;

    // Step 2: both replicas now sign with the new root.
    ca_step(&api, "activate").await;
    let both = format!("{root}{next}");
    for r in [&a, &b] {
        let ch = tls_channel(&r.addr, &both);
        let mut signed_by_next = false;
        for _ in 0..200 {
            let cert = certificate(&ch, Some(&za), "app", "web").await.unwrap();
            signed_by_next = signed_by(&cert.cert_chain_pem[0], &next);
            if signed_by_next {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            signed_by_next,
            "replica at {} still signs with the old root",
            r.addr
        );
    }

    // Step 3: the old root is no longer trusted anywhere.
    ca_step(&api, "retire").await;
    bundle_of(&mut stream_a, 1).await;
    bundle_of(&mut stream_b, 1).await;
    wait(DEADLINE, "only the new root in the ConfigMap", || {
        root_configmap_now(&api).is_some_and(|pem| pem.trim() == next.trim())
    })
    .await;
    // A deleted CA Secret comes back with the root in use, not a new one.
    api.delete("v1", "Secret", Some(NS), "mesh-ca").unwrap();
    wait(DEADLINE, "the CA Secret recreated", || {
        ca_secret(&api).is_some_and(|s| s["root-cert.pem"] == next.as_bytes())
    })
    .await;
}

fn root_configmap_now(api: &testbed::kubeapi::ApiServer) -> Option<String> {
    api.get("v1", "ConfigMap", Some(NS), "mesh-root-cert")
        .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_step_without_a_ca_secret_says_to_start_meshd_first() {
    let api = cluster();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args(["ca", "activate", "--kubernetes", "--namespace", NS])
        .arg("--kubeconfig")
        .arg(api.kubeconfig())
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "Secret mesh-system/mesh-ca does not exist: start meshd with --kubernetes once first"
        ),
        "{err}"
    );
    assert!(ca_secret(&api).is_none(), "a failed step creates nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_step_never_overwrites_a_concurrent_change_of_the_secret() {
    use meshd::kube::ca_secret::{RotationStep, rotate};
    use testbed::kubeapi::RequestMatch;
    let api = cluster();
    let _meshd = Replica::start(&api, "meshd-0").await;
    let path = format!("/api/v1/namespaces/{NS}/secrets/mesh-ca");
    let gets = |api: &testbed::kubeapi::ApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path)
            .count()
    };
    let before = gets(&api);
    // The step reads the Secret, then its write waits while someone else changes the Secret.
    api.hold_requests(RequestMatch {
        method: Some("PUT".into()),
        path_prefix: path.clone(),
    });
    let mut k = meshd::kube::KubeSettings::new(NS, "operator");
    k.kubeconfig = Some(api.kubeconfig().to_path_buf());
    let client = meshd::kube::client(&k).await.unwrap();
    let step = tokio::spawn(rotate(client, NS, TD, RotationStep::Prepare));
    wait(DEADLINE, "the step to read the Secret", || {
        gets(&api) > before
    })
    .await;
    let extra = meshcore::ca::CertAuthority::new_in_memory(TD)
        .unwrap()
        .root_pem()
        .to_string();
    let mut secret = api.get("v1", "Secret", Some(NS), "mesh-ca").unwrap();
    secret["data"]["trusted-extra.pem"] =
        serde_json::to_value(k8s_openapi::ByteString(extra.clone().into_bytes())).unwrap();
    api.put(secret).unwrap();
    api.clear_hooks();

    let said = tokio::time::timeout(DEADLINE, step)
        .await
        .expect("the step finished")
        .unwrap()
        .expect("the step succeeded after reading again");
    assert!(said.contains("new root created"), "{said}");
    let data = ca_secret(&api).unwrap();
    assert!(data.contains_key("next-root-cert.pem"), "the step is in");
    assert_eq!(
        data["trusted-extra.pem"],
        extra.as_bytes(),
        "the other change is too"
    );
    let conflicts = api
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path == path && r.code == 409)
        .count();
    assert_eq!(
        conflicts, 1,
        "the stale write was refused by its resourceVersion"
    );
}
