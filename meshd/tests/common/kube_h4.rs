//! Leader and writer tests against the API server double: meshd replicas (each its own tokio
//! runtime, so that killing one is dropping its runtime: no release, no goodbye), each with its
//! own service-account token bound to its pod, and views built from what the API holds.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd::kube::{KubeSettings, LeaseTimings};
use meshd::translate::{MeshView, Settings, VersionedView};
use serde_json::{Value, json};
use testbed::kubeapi::{ApiOptions, ApiServer, RequestRecord, TokenSpec};
use tokio::sync::watch;

pub const NS: &str = "mesh-system";

/// The double with the mesh CRDs, meshd's namespace and an app namespace.
pub fn cluster() -> ApiServer {
    let api = ApiServer::start(ApiOptions::default()).expect("API server double");
    api.install_mesh_crds().expect("mesh CRDs");
    for ns in [NS, "app"] {
        api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            .expect("namespace");
    }
    api
}

/// Short timings, so that failover is seconds (client-go's proportions).
pub fn quick() -> LeaseTimings {
    LeaseTimings {
        duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(500),
    }
}

/// Settings for replica `pod`, with a kubeconfig carrying a token bound to that pod.
pub fn settings(api: &ApiServer, pod: &str, lease: LeaseTimings) -> KubeSettings {
    let token = api.issue_token(TokenSpec {
        namespace: NS.into(),
        service_account: "meshd".into(),
        audiences: vec!["https://kubernetes.default.svc".into()],
        pod: Some((pod.into(), format!("uid-{pod}"))),
        node: Some("node-a".into()),
        expires_at: u64::MAX / 2,
    });
    let kubeconfig: PathBuf = api.kubeconfig_for(&token).expect("kubeconfig");
    let mut s = KubeSettings::new(NS, pod);
    s.kubeconfig = Some(kubeconfig);
    s.lease = lease;
    s
}

/// One meshd replica's elector and writer, on a runtime of its own.
pub struct Replica {
    pub name: String,
    rt: Option<tokio::runtime::Runtime>,
    pub leader: watch::Receiver<bool>,
    views: Option<watch::Sender<Arc<VersionedView>>>,
    version: u64,
}

impl Replica {
    /// Elector only, or elector and writer (fed by [`Replica::show`]).
    pub fn start(settings: KubeSettings, with_writer: bool) -> Replica {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (views_tx, views_rx) = watch::channel(Arc::new(VersionedView {
            version: 0,
            view: MeshView::default(),
        }));
        let leader = rt.block_on(async {
            let client = meshd::kube::client(&settings).await.expect("client");
            let leader = meshd::kube::leader::spawn(client.clone(), &settings);
            if with_writer {
                meshd::kube::writer::spawn(client, &settings, views_rx, leader.clone());
            }
            leader
        });
        Replica {
            name: settings.identity.clone(),
            rt: Some(rt),
            leader,
            views: Some(views_tx),
            version: 0,
        }
    }

    pub fn leading(&self) -> bool {
        *self.leader.borrow()
    }

    /// Publishes `view` to the writer as a new version.
    pub fn show(&mut self, view: MeshView) {
        self.version += 1;
        if let Some(tx) = &self.views {
            tx.send_replace(Arc::new(VersionedView {
                version: self.version,
                view,
            }));
        }
    }

    /// The process dies: nothing runs any more, the Lease is left as it was.
    pub fn kill(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// meshd stops: its views end, the writer ends and the elector resigns.
    pub fn stop(&mut self) {
        self.views = None;
        meshd::kube::leader::resign(&self.leader);
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Polls `cond` until it holds or `within` passes.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The Lease's spec as stored.
pub fn lease(api: &ApiServer) -> Value {
    api.get("coordination.k8s.io/v1", "Lease", Some(NS), "meshd-leader")
        .map(|l| l["spec"].clone())
        .unwrap_or(Value::Null)
}

/// Writes (not reads, not the Lease) the double answered, in order.
pub fn writes(api: &ApiServer) -> Vec<RequestRecord> {
    api.requests()
        .into_iter()
        .filter(|r| r.method != "GET" && !r.path.contains("/leases"))
        .collect()
}

/// What meshd would see of the API: every object of the kinds the writer acts on, through the
/// same parser and translation as meshd's source.
pub fn view_of(api: &ApiServer) -> MeshView {
    let mut res = meshd::resources::ResourceSet::default();
    let kinds = [
        ("v1", "Namespace"),
        ("v1", "Pod"),
        ("v1", "Service"),
        ("security.istio.io/v1", "AuthorizationPolicy"),
        ("gateway.networking.k8s.io/v1", "Gateway"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ];
    for (api_version, kind) in kinds {
        for mut o in api.list(api_version, kind) {
            // Listed items lack apiVersion/kind, as in a real list.
            o["apiVersion"] = json!(api_version);
            o["kind"] = json!(kind);
            let parsed = meshd::parse::parse_object("Kubernetes API", o).expect("parses");
            for r in parsed.resources {
                res.insert(r);
            }
        }
    }
    let settings = Settings {
        trust_domain: "cluster.local".into(),
        cluster_domain: "cluster.local".into(),
    };
    meshd::translate::translate(&res, &settings, &Default::default())
}

/// A whole meshd (`daemon::run_with` in Kubernetes mode) on a runtime of its own.
pub struct Daemon {
    pub name: String,
    _dir: tempfile::TempDir,
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), meshd::daemon::RunError>>>,
}

impl Daemon {
    pub fn start(settings: KubeSettings) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let cfg = meshd::daemon::RunConfig {
            config_dir: dir.path().join("config"),
            state_dir: dir.path().join("state"),
            listen: meshd::settings::Listen::Unix(dir.path().join("meshd.sock")),
            settings: Settings {
                trust_domain: "cluster.local".into(),
                cluster_domain: "cluster.local".into(),
            },
            root_namespace: "istio-system".into(),
            cert_lifetime: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(50),
        };
        let opts = meshd::daemon::RunOptions {
            write_dir: None,
            kube: Some(settings.clone()),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let _in_runtime = rt.enter();
        let task = rt.spawn(meshd::daemon::run_with(cfg, opts, async move {
            let _ = stopped.await;
        }));
        drop(_in_runtime);
        Daemon {
            name: settings.identity,
            _dir: dir,
            rt: Some(rt),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops meshd as SIGTERM would and, once `run_with` returns, ends the process: nothing
    /// meshd left running gets to finish.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let (Some(rt), Some(task)) = (self.rt.take(), self.task.take()) {
            let r =
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), task).await });
            rt.shutdown_background();
            assert!(matches!(r, Ok(Ok(Ok(())))), "meshd stopped cleanly: {r:?}");
        }
    }

    /// The process dies.
    pub fn kill(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
