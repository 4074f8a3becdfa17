//! The CA service over a real unix socket: who may obtain which identity.

mod common;

use common::*;
use meshcore::Identity;
use meshcore::proto::ca::CertificateRequest;
use meshcore::proto::ca::certificate_service_client::CertificateServiceClient;
use tonic::Code;
use x509_parser::prelude::*;

fn csr(identity: &str) -> String {
    let id: Identity = identity.parse().unwrap();
    meshcore::ca::generate_csr(&id).unwrap().1
}

fn req(
    identity: &str,
    validity_seconds: i64,
    token: Option<&str>,
) -> tonic::Request<CertificateRequest> {
    request(
        CertificateRequest {
            csr_pem: csr(identity),
            identity: identity.into(),
            validity_seconds,
        },
        token,
    )
}

/// (URI SANs, lifetime in seconds) of a PEM certificate.
fn inspect(pem: &str) -> (Vec<String>, i64) {
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let uris = cert
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let v = cert.validity();
    (uris, v.not_after.timestamp() - v.not_before.timestamp())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_certificates_only_for_their_pods() {
    let files = [
        ("00-ns.yaml", NAMESPACES.to_string()),
        ("10-a.yaml", pod("a", "node-0", "sa-a", "10.0.0.1", "a")),
        ("20-b.yaml", pod("b", "node-1", "sa-b", "10.0.0.2", "b")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let meshd = Meshd::start(&files).await;
    let mut client = CertificateServiceClient::new(meshd.channel().await);
    let token = meshd.token("node-0");
    let mine = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/sa-a");

    let resp = client
        .create_certificate(req(&mine, 0, Some(&token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.cert_chain_pem.len(), 1);
    assert_eq!(resp.trust_bundle_pem.len(), 1);
    let (uris, lifetime) = inspect(&resp.cert_chain_pem[0]);
    assert_eq!(uris, vec![mine.clone()]);
    // Default lifetime (1 h in the harness), plus the CA's small backdating.
    assert!((3600..3600 + 600).contains(&lifetime), "{lifetime}");
    // Shorter requests are honoured, longer ones capped.
    let short = client
        .create_certificate(req(&mine, 60, Some(&token)))
        .await
        .unwrap()
        .into_inner();
    assert!(inspect(&short.cert_chain_pem[0]).1 < 600);
    let long = client
        .create_certificate(req(&mine, 999_999, Some(&token)))
        .await
        .unwrap()
        .into_inner();
    assert!(inspect(&long.cert_chain_pem[0]).1 < 3600 + 600);

    // A pod on another node.
    let theirs = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/sa-b");
    let err = client
        .create_certificate(req(&theirs, 0, Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("node node-0 may not obtain identity"),
        "{err:?}"
    );

    // Other trust domains and malformed identities.
    let err = client
        .create_certificate(req("spiffe://elsewhere/ns/shop/sa/sa-a", 0, Some(&token)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut bad = req(&mine, 0, Some(&token));
    bad.get_mut().identity = "shop/sa-a".into();
    let err = client.create_certificate(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Without credentials, or with a token of another meshd's secret.
    let err = client
        .create_certificate(req(&mine, 0, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("meshd node-token"), "{err:?}");
    let foreign = meshcore::nodeauth::NodeAuthority::new(b"another state dir")
        .token("node-0", std::time::Duration::from_secs(3600));
    let err = client
        .create_certificate(req(&mine, 0, Some(&foreign)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // A pod moving onto the node makes its identity available without restarts.
    meshd.write("20-b.yaml", &pod("b", "node-0", "sa-b", "10.0.0.2", "b"));
    let c = client.clone();
    let t = token.clone();
    let theirs2 = theirs.clone();
    wait_for("sa-b to be issuable on node-0", move || {
        let mut c = c.clone();
        let (t, id) = (t.clone(), theirs2.clone());
        async move { c.create_certificate(req(&id, 0, Some(&t))).await.is_ok() }
    })
    .await;
    meshd.stop().await.unwrap();
}
