//! Node-identity test support: a cluster in the API server double (ztunnel pods and app pods on
//! node-a and node-b), meshd replicas in Kubernetes mode on TCP, and gRPC clients that trust
//! only the root published in the `mesh-root-cert` ConfigMap.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshcore::Identity;
use meshcore::proto::ca::certificate_service_client::CertificateServiceClient;
use meshcore::proto::ca::{CertificateRequest, CertificateResponse};
use meshcore::proto::config::config_service_client::ConfigServiceClient;
use meshcore::proto::config::{ConfigUpdate, SubscribeRequest};
use meshd::daemon::{self, RunConfig, RunError, RunOptions};
use meshd::kube::KubeSettings;
use meshd::settings::Listen;
use meshd::translate::Settings;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use testbed::kubeapi::{ApiOptions, ApiServer, TokenSpec};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};

pub const TD: &str = "test.local";
pub const NS: &str = "mesh-system";
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The double with namespaces `mesh-system` and `app`; ztunnel pods `ztunnel-a` / `ztunnel-b`
/// and app pods `web` (node-a, service account web) and `db` (node-b, service account db).
pub fn cluster() -> ApiServer {
    let api = ApiServer::start(ApiOptions::default()).expect("API server double");
    api.install_mesh_crds().expect("mesh CRDs");
    for ns in [NS, "app"] {
        api.create(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns,
            "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        )
        .expect("namespace");
    }
    api.create(pod(NS, "ztunnel-a", "ztunnel", "node-a", "10.0.0.10"))
        .unwrap();
    api.create(pod(NS, "ztunnel-b", "ztunnel", "node-b", "10.0.1.10"))
        .unwrap();
    api.create(pod("app", "web", "web", "node-a", "10.0.0.11"))
        .unwrap();
    api.create(pod("app", "db", "db", "node-b", "10.0.1.11"))
        .unwrap();
    api
}

pub fn pod(ns: &str, name: &str, sa: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
           "spec": {"nodeName": node, "serviceAccountName": sa,
                    "containers": [{"name": "c", "image": "x"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

pub fn uid(api: &ApiServer, ns: &str, name: &str) -> String {
    api.get("v1", "Pod", Some(ns), name).expect("pod")["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string()
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token as kubelet projects it for `pod` (bound to it and its node), audience `audience`.
pub fn pod_token(api: &ApiServer, ns: &str, pod: &str, sa: &str, audience: &str) -> String {
    let p = api.get("v1", "Pod", Some(ns), pod).expect("pod");
    let node = p["spec"]["nodeName"].as_str().map(str::to_string);
    api.issue_token(TokenSpec {
        namespace: ns.into(),
        service_account: sa.into(),
        audiences: vec![audience.into()],
        pod: Some((pod.into(), uid(api, ns, pod))),
        node,
        expires_at: now() + 3600,
    })
}

/// ztunnel-a's token for meshd.
pub fn ztunnel_a(api: &ApiServer) -> String {
    pod_token(api, NS, "ztunnel-a", "ztunnel", "mesh-ca")
}

type MeshdTask = tokio::task::JoinHandle<Result<(), RunError>>;

/// A meshd replica in Kubernetes mode on 127.0.0.1; stopped when dropped.
pub struct Replica {
    pub addr: String,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: MeshdTask,
}

impl Replica {
    /// Starts meshd named `name` with an empty state directory; returns once it answers TLS
    /// with a certificate from its own CA. A port taken meanwhile (the free port is picked,
    /// released, then bound by meshd: another test process may win it) is retried with another.
    pub async fn start(api: &ApiServer, name: &str) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            if let Some((addr, stop, task)) = Self::try_start(api, name, &dir).await {
                return Replica {
                    addr,
                    dir,
                    stop: Some(stop),
                    task,
                };
            }
        }
        panic!("meshd {name} found no free port in 5 tries");
    }

    async fn try_start(
        api: &ApiServer,
        name: &str,
        dir: &tempfile::TempDir,
    ) -> Option<(String, oneshot::Sender<()>, MeshdTask)> {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut k = KubeSettings::new(NS, name);
        k.kubeconfig = Some(api.kubeconfig().to_path_buf());
        k.debounce = Duration::from_millis(20);
        let cfg = RunConfig {
            config_dir: PathBuf::new(),
            state_dir: dir.path().join("state"),
            listen: Listen::Tcp(addr),
            settings: Settings {
                trust_domain: TD.into(),
                cluster_domain: "cluster.local".into(),
            },
            root_namespace: "istio-system".into(),
            cert_lifetime: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(50),
        };
        let opts = RunOptions {
            kube: Some(k),
            ..Default::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run_with(cfg, opts, async move {
            let _ = stopped.await;
        }));
        let root = dir.path().join("state/ca/root-cert.pem");
        let start = std::time::Instant::now();
        loop {
            if task.is_finished() {
                match task.await {
                    Ok(Err(RunError::Listen { .. })) => return None,
                    other => panic!("meshd {name} stopped: {other:?}"),
                }
            }
            assert!(start.elapsed() < DEADLINE, "meshd {name} did not listen");
            if let Ok(pem) = std::fs::read_to_string(&root)
                && tls_handshake(&addr.to_string(), &pem).await
            {
                return Some((addr.to_string(), stop, task));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The signing root this replica's state directory holds.
    pub fn local_root(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/ca/root-cert.pem")).unwrap()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

/// The roots meshd published in its ConfigMap, once there.
pub async fn configmap_root(api: &ApiServer) -> String {
    let get = || {
        api.get("v1", "ConfigMap", Some(NS), "mesh-root-cert")
            .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_string))
    };
    wait(DEADLINE, "the mesh-root-cert ConfigMap", || get().is_some()).await;
    get().unwrap()
}

/// The CA Secret's entries, decoded.
pub fn ca_secret(api: &ApiServer) -> Option<BTreeMap<String, Vec<u8>>> {
    let v = api.get("v1", "Secret", Some(NS), "mesh-ca")?;
    let s: k8s_openapi::api::core::v1::Secret = serde_json::from_value(v).ok()?;
    Some(s.data?.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// Whether `addr` completes a TLS handshake as meshd against `roots_pem`.
async fn tls_handshake(addr: &str, roots_pem: &str) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let name = ServerName::try_from(format!("meshd.{TD}")).unwrap();
    let connect = tokio_rustls::TlsConnector::from(client_config(roots_pem)).connect(name, tcp);
    matches!(tokio::time::timeout(DEADLINE, connect).await, Ok(Ok(_)))
}

fn client_config(roots_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A channel to `addr` over TLS, verifying meshd as `meshd.test.local` against `roots_pem`
/// only.
pub fn tls_channel(addr: &str, roots_pem: &str) -> Channel {
    let config = client_config(roots_pem);
    let addr = addr.to_string();
    Endpoint::from_static("http://meshd.invalid").connect_with_connector_lazy(tower::service_fn(
        move |_| {
            let (addr, config) = (addr.clone(), config.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let name = ServerName::try_from(format!("meshd.{TD}")).unwrap();
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        },
    ))
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// Asks for a certificate for `ns/sa` with `token`.
pub async fn certificate(
    ch: &Channel,
    token: Option<&str>,
    ns: &str,
    sa: &str,
) -> Result<CertificateResponse, tonic::Status> {
    let id = Identity::new(TD, ns, sa);
    let (_key, csr_pem) = meshcore::ca::generate_csr(&id).unwrap();
    let req = CertificateRequest {
        csr_pem,
        identity: id.to_string(),
        validity_seconds: 600,
    };
    let mut client = CertificateServiceClient::new(ch.clone());
    let call = client.create_certificate(with_token(req, token));
    Ok(tokio::time::timeout(DEADLINE, call)
        .await
        .expect("the CA answered")?
        .into_inner())
}

/// Subscribes as `node` with `token`: the stream once its first update came.
pub async fn subscribe(
    ch: &Channel,
    token: Option<&str>,
    node: &str,
) -> Result<(ConfigUpdate, tonic::Streaming<ConfigUpdate>), tonic::Status> {
    let req = SubscribeRequest {
        node: node.into(),
        ..Default::default()
    };
    let mut client = ConfigServiceClient::new(ch.clone());
    let call = client.subscribe(with_token(req, token));
    let mut stream = tokio::time::timeout(DEADLINE, call)
        .await
        .expect("meshd answered")?
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("a first update")?
        .expect("the stream stays open");
    Ok((first, stream))
}

/// Whether the leaf certificate (PEM) is signed by the root (PEM).
pub fn signed_by(leaf_pem: &str, root_pem: &str) -> bool {
    use x509_parser::prelude::*;
    let (_, leaf) = x509_parser::pem::parse_x509_pem(leaf_pem.as_bytes()).unwrap();
    let (_, root) = x509_parser::pem::parse_x509_pem(root_pem.as_bytes()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&leaf.contents).unwrap();
    let (_, root) = X509Certificate::from_der(&root.contents).unwrap();
    leaf.verify_signature(Some(root.public_key())).is_ok()
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `limit`.
pub async fn wait(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
