//! ztunnel's meshd client against a real meshd on TCP: TLS with meshd's certificate from the
//! mesh CA, verified against the root given out of band; anything else is refused.
//!
//! Owns the tests of [`ztunnel::meshd`]'s transport. Listens on 127.0.0.1 only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshcore::proto::config::SubscribeRequest;
use meshcore::proto::config::config_service_client::ConfigServiceClient;
use meshd::daemon::{self, RunConfig};
use meshd::settings::Listen;
use meshd::translate::Settings;
use tokio::sync::oneshot;
use ztunnel::meshd::{Meshd, MeshdError, MeshdTls};

const DEADLINE: Duration = Duration::from_secs(15);
const TRUST_DOMAIN: &str = "test.local";

/// An in-process meshd listening on TCP; stopped when dropped.
struct TcpMeshd {
    dir: tempfile::TempDir,
    addr: String,
    _stop: oneshot::Sender<()>,
}

impl TcpMeshd {
    async fn start() -> TcpMeshd {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir(&config).unwrap();
        // A port the kernel just handed out and released: free unless someone races us for it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cfg = RunConfig {
            config_dir: config,
            state_dir: dir.path().join("state"),
            listen: Listen::Tcp(addr),
            settings: Settings {
                trust_domain: TRUST_DOMAIN.into(),
                cluster_domain: "cluster.local".into(),
            },
            root_namespace: "istio-system".into(),
            cert_lifetime: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(50),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(daemon::run(cfg, async move {
            let _ = stopped.await;
        }));
        let start = std::time::Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(start.elapsed() < DEADLINE, "meshd did not listen on {addr}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TcpMeshd {
            dir,
            addr: addr.to_string(),
            _stop: stop,
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("state/ca/root-cert.pem")
    }

    fn token(&self) -> String {
        meshd::state::node_authority(&self.dir.path().join("state"))
            .unwrap()
            .token("node-0", Duration::from_secs(600))
    }

    fn client(&self, ca_file: &Path, server_name: &str) -> Meshd {
        let tls = MeshdTls {
            ca_file: ca_file.to_path_buf(),
            server_name: server_name.into(),
        };
        Meshd::new(&self.addr, &self.token(), Some(tls)).unwrap()
    }
}

/// Subscribes as node-0: the first update, or the call's error.
async fn subscribe(meshd: &Meshd) -> Result<bool, tonic::Status> {
    let mut client = ConfigServiceClient::new(meshd.channel.clone());
    let call = client.subscribe(meshd.request(SubscribeRequest {
        node: "node-0".into(),
        ..Default::default()
    }));
    let mut stream = tokio::time::timeout(DEADLINE, call)
        .await
        .expect("meshd answered")?
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("a snapshot")?;
    Ok(first.is_some_and(|u| u.snapshot))
}

/// Every message in an error's source chain, to see why a connection failed.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_stream_over_tls_verified_against_the_mesh_root() {
    let meshd = TcpMeshd::start().await;
    let client = meshd.client(&meshd.root(), "meshd.test.local");
    assert_eq!(subscribe(&client).await.map_err(|e| chain(&e)), Ok(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshd_that_does_not_chain_to_the_given_root_is_refused() {
    let meshd = TcpMeshd::start().await;
    // Another mesh's root: what a man in the middle's certificate would chain to, at best.
    let other = tempfile::tempdir().unwrap();
    let other_root = other.path().join("root.pem");
    let ca = meshcore::ca::CertAuthority::new_in_memory(TRUST_DOMAIN).unwrap();
    std::fs::write(&other_root, ca.root_pem()).unwrap();
    let err = subscribe(&meshd.client(&other_root, "meshd.test.local"))
        .await
        .expect_err("an unknown issuer must be refused");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{}", chain(&err));
    // (BadSignature: the impostor root has the same name as the real one, so the chain is
    // built and then fails on the signature; UnknownIssuer with any other name.)
    assert!(
        chain(&err).contains("invalid peer certificate"),
        "{}",
        chain(&err)
    );

    // The right root but another name: refused too.
    let err = subscribe(&meshd.client(&meshd.root(), "meshd.elsewhere.local"))
        .await
        .expect_err("a certificate for another name must be refused");
    assert!(chain(&err).contains("NotValidForName"), "{}", chain(&err));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn there_is_no_plaintext_tcp() {
    let meshd = TcpMeshd::start().await;
    // The client will not even try without a root to verify meshd with.
    let err = Meshd::new(&meshd.addr, &meshd.token(), None).err();
    assert!(
        matches!(err, Some(MeshdError::NoTls(_))),
        "{:?}",
        err.map(|e| e.to_string())
    );

    // And meshd does not speak gRPC to a plaintext client.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", meshd.addr))
        .unwrap()
        .connect_lazy();
    let mut client = ConfigServiceClient::new(channel);
    let mut req = tonic::Request::new(SubscribeRequest {
        node: "node-0".into(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", meshd.token()).parse().unwrap(),
    );
    let res = tokio::time::timeout(DEADLINE, client.subscribe(req))
        .await
        .expect("the plaintext call ends");
    assert!(res.is_err(), "plaintext TCP was served");
}

/// A TLS handshake with meshd as its clients make it (the connection is kept, unused).
async fn handshake(
    meshd: &TcpMeshd,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tls = MeshdTls {
        ca_file: meshd.root(),
        server_name: "meshd.test.local".into(),
    };
    let config = tls.client_config().unwrap();
    let name = rustls::pki_types::ServerName::try_from("meshd.test.local").unwrap();
    let tcp = tokio::net::TcpStream::connect(&meshd.addr).await?;
    tokio::time::timeout(
        DEADLINE,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    let meshd = TcpMeshd::start().await;
    // meshd admits 32 connections per peer address (listener::MAX_CONNECTIONS_PER_PEER).
    let mut held = Vec::new();
    for i in 0..32 {
        held.push(
            handshake(&meshd)
                .await
                .unwrap_or_else(|e| panic!("#{i}: {e}")),
        );
    }
    assert!(
        handshake(&meshd).await.is_err(),
        "a 33rd connection from one address must be refused"
    );
    // Closing one frees its place.
    held.pop();
    let start = std::time::Instant::now();
    while handshake(&meshd).await.is_err() {
        assert!(start.elapsed() < DEADLINE, "a freed place was not reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
