//! Shared test harness: an in-process meshd on a unix socket in a temp dir, and gRPC clients.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshd::daemon::{self, RunConfig, RunError, RunOptions};
use meshd::settings::Listen;
use meshd::translate::Settings;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub const DEADLINE: Duration = Duration::from_secs(15);
pub const TRUST_DOMAIN: &str = "test.local";

pub struct Meshd {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
    pub sock: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RunError>>>,
}

impl Meshd {
    /// Writes `files` into a fresh config dir, starts meshd and waits until it accepts.
    pub async fn start(files: &[(&str, &str)]) -> Meshd {
        Self::start_with(files, |_| RunOptions::default()).await
    }

    /// [`Meshd::start`] with options made from the test's temp dir (e.g. a write dir in it).
    pub async fn start_with(
        files: &[(&str, &str)],
        opts: impl FnOnce(&Path) -> RunOptions,
    ) -> Meshd {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir(&config).unwrap();
        for (name, text) in files {
            std::fs::write(config.join(name), text).unwrap();
        }
        let state = dir.path().join("state");
        let sock = dir.path().join("meshd.sock");
        let cfg = RunConfig {
            config_dir: config.clone(),
            state_dir: state.clone(),
            listen: Listen::Unix(sock.clone()),
            settings: Settings {
                trust_domain: TRUST_DOMAIN.into(),
                cluster_domain: "cluster.local".into(),
            },
            root_namespace: "istio-system".into(),
            cert_lifetime: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(50),
        };
        let opts = opts(dir.path());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run_with(cfg, opts, async move {
            let _ = stopped.await;
        }));
        let s = sock.clone();
        wait_for("meshd to listen", move || {
            let s = s.clone();
            async move { std::os::unix::net::UnixStream::connect(&s).is_ok() }
        })
        .await;
        Meshd {
            dir,
            config,
            state,
            sock,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn token(&self, node: &str) -> String {
        meshd::state::node_authority(&self.state)
            .unwrap()
            .token(node, Duration::from_secs(3600))
    }

    /// A service-account token, as `meshd workload-token` prints it.
    pub fn sa_token(&self, namespace: &str, sa: &str) -> String {
        meshd::state::node_authority(&self.state).unwrap().sa_token(
            namespace,
            sa,
            Duration::from_secs(3600),
        )
    }

    pub fn write(&self, name: &str, text: &str) {
        // Write-then-rename, as editors and local mode do, so a half-written file is never seen.
        let tmp = self.config.join(format!("{name}.tmp~"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config.join(name)).unwrap();
    }

    pub async fn channel(&self) -> Channel {
        channel(&self.sock).await
    }

    /// Stops meshd gracefully and returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), RunError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.task.take() {
            Some(t) => tokio::time::timeout(DEADLINE, t)
                .await
                .expect("meshd did not stop")
                .unwrap(),
            None => Ok(()),
        }
    }
}

pub async fn channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

pub fn request<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// Polls `cond` until it holds; panics naming `what` after [`DEADLINE`].
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const NAMESPACES: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
";

pub fn pod(name: &str, node: &str, sa: &str, ip: &str, app: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}}}
status: {{podIP: {ip}}}
"
    )
}

/// A waypoint Gateway `shop/<name>` (listener mesh/15008/HBONE) with extra labels.
pub fn waypoint_gateway(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: shop, uid: uid-{name}, labels: {{{labels}}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"
    )
}
