//! The node agent (`mesh-cni agent`). Owns the plugin socket, the ZDS server, the enrolled-pod
//! cache and the reconcile loop; which pods are ambient is read from the cluster through
//! [`view`]. Start order: read the view, (uninstall if asked), find the already-enrolled pods
//! again (restart recovery), only then serve ZDS (so a reconnecting ztunnel's snapshot holds
//! them) and the plugin socket. Never touches the pods' traffic itself: ztunnel does.
//!
//! Modules: [`view`] (+ `kube_view`, `dir_view`): the cluster; `netns`: opening pods'
//! namespaces safely; `ztunnels`: cache + ZDS sessions; `handle`: ADD/DEL/CHECK; `reconcile`:
//! view changes; `server`: the sockets; `uninstall`.

mod dir_view;
mod handle;
mod kube_view;
mod netns;
mod reconcile;
mod server;
mod uninstall;
pub mod view;
mod ztunnels;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::probe_snat::ProbeSnat;
use view::{PodFacts, View};

pub use kube_view::UNINSTALL_ANNOTATION;
pub use reconcile::DIRECTORY_GONE_GRACE;
pub use uninstall::{UNINSTALL_FILE, UNINSTALLED_ANNOTATION, UNINSTALLED_FILE};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ViewKind {
    /// The Kubernetes API (in-cluster, or --kubeconfig).
    Kube,
    /// Local mode's config directory (--config-dir).
    Directory,
}

/// `mesh-cni agent` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// This node's name (pods are watched with spec.nodeName=<node>).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    #[arg(long, value_enum, default_value = "kube")]
    pub view: ViewKind,
    /// The config directory local mode writes (with --view directory).
    #[arg(long, required_if_eq("view", "directory"))]
    pub config_dir: Option<PathBuf>,
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = crate::event::DEFAULT_PLUGIN_SOCKET)]
    pub plugin_socket: PathBuf,
    #[arg(long, default_value = dataplane::zds::DEFAULT_SOCKET)]
    pub zds_socket: PathBuf,
    /// Namespaces whose pods are never enrolled (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "mesh-system")]
    pub exclude_namespaces: Vec<String>,
    /// The host's /proc (mounted into the agent's container), to find pods' namespaces.
    #[arg(long, default_value = "/proc")]
    pub host_proc: PathBuf,
    /// The mesh's namespace (where the agent's DaemonSet is).
    #[arg(long, env = "POD_NAMESPACE", default_value = "mesh-system")]
    pub mesh_namespace: String,
    /// The agent's own DaemonSet: its annotation `mesh.dev/uninstall: "true"` starts the
    /// uninstall (Kube view).
    #[arg(long, default_value = "mesh-cni")]
    pub daemonset: String,
    /// The agent's own pod (annotated when an uninstall is done).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The agent's state directory (local mode's uninstall trigger and marker).
    #[arg(long, default_value = "/var/run/mesh-cni")]
    pub state_dir: PathBuf,
    /// The CNI conf dir our entry was installed into (removed from it on uninstall).
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// Do not install the probe SNAT table (kubelet probes to STRICT pods then fail).
    #[arg(long)]
    pub no_probe_snat: bool,
}

/// The agent's shared state.
pub struct Agent {
    view: View,
    state: tokio::sync::Mutex<ztunnels::Enrolled>,
    snat: Option<ProbeSnat>,
    node: String,
    exclude: Vec<String>,
    host_proc: PathBuf,
    forbidden: netns::Forbidden,
    args: AgentArgs,
    uninstalling: AtomicBool,
    /// (namespace, name) → ADDs running for it (reconcile leaves those pods alone).
    inflight: Mutex<HashMap<(String, String), usize>>,
}

/// Removes an in-flight mark when dropped.
pub(crate) struct Inflight<'a> {
    agent: &'a Agent,
    key: (String, String),
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut map = self
            .agent
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Agent {
    fn excluded(&self, namespace: &str) -> bool {
        self.exclude.iter().any(|n| n == namespace)
    }

    fn uninstalling(&self) -> bool {
        self.uninstalling.load(Ordering::SeqCst)
    }

    fn inflight(&self, namespace: &str, name: &str) -> Inflight<'_> {
        let key = (namespace.to_string(), name.to_string());
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(key.clone()).or_default() += 1;
        Inflight { agent: self, key }
    }

    fn is_inflight(&self, namespace: &str, name: &str) -> bool {
        let map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        map.contains_key(&(namespace.to_string(), name.to_string()))
    }

    /// After ztunnel acked: probe SNAT for the pod's IPs, and (Kube, in the background) the
    /// redirection annotation.
    async fn enrolled_side_effects(self: &Arc<Self>, pod: &PodFacts, ips: &[IpAddr]) {
        if let Some(snat) = &self.snat
            && let Err(e) = snat.add(ips)
        {
            tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e, "probe SNAT not set up for the pod");
        }
        if !pod.redirection_enabled && matches!(self.view, View::Kube(_)) {
            let agent = self.clone();
            let (ns, name) = (pod.namespace.clone(), pod.name.clone());
            tokio::spawn(async move {
                let key = meshcore::enrollment::REDIRECTION_ANNOTATION;
                agent.view.annotate(&ns, &name, key, Some("enabled")).await;
            });
        }
    }

    fn snat_remove(&self, ips: &[IpAddr]) {
        if let Some(snat) = &self.snat
            && let Err(e) = snat.remove(ips)
        {
            tracing::warn!(error = %e, "removing pod addresses from the probe SNAT set");
        }
    }
}

/// `mesh-cni agent`: runs until SIGTERM/SIGINT; the process's exit code.
pub fn run(args: AgentArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-cni agent: starting the runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "mesh-cni agent failed");
            eprintln!("mesh-cni agent: {e:#}");
            1
        }
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| anyhow::anyhow!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!("no Kubernetes credentials (pass --kubeconfig, or run in-cluster): {e}")
        })?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn serve(args: AgentArgs) -> anyhow::Result<()> {
    let view = match args.view {
        ViewKind::Kube => {
            let client = client(args.kubeconfig.as_ref()).await?;
            let v = kube_view::KubeView::start(
                client,
                args.node.clone(),
                args.mesh_namespace.clone(),
                args.daemonset.clone(),
            );
            View::Kube(v)
        }
        ViewKind::Directory => {
            let dir = args
                .config_dir
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--view directory needs --config-dir"))?;
            View::Directory(dir_view::DirView::start(dir, args.node.clone()).await)
        }
    };
    let snat = if args.no_probe_snat {
        None
    } else {
        Some(ProbeSnat::new().map_err(|e| {
            anyhow::anyhow!(
                "{e} (or pass --no-probe-snat; kubelet probes to STRICT pods then fail)"
            )
        })?)
    };
    let agent = Arc::new(Agent {
        view,
        state: Default::default(),
        snat,
        node: args.node.clone(),
        exclude: args.exclude_namespaces.clone(),
        host_proc: args.host_proc.clone(),
        forbidden: netns::Forbidden::new(&args.host_proc),
        args: args.clone(),
        uninstalling: AtomicBool::new(false),
        inflight: Default::default(),
    });
    tracing::info!(node = %args.node, view = ?args.view, "waiting for the view's first read");
    agent.view.ready().await;
    let mut reconciler = reconcile::Reconciler::default();
    if agent.view.uninstall_requested(&args.state_dir).await {
        uninstall::run(&agent).await;
    } else {
        uninstall::clear_stale_pause(&agent);
        // Restart recovery, before ZDS is served.
        reconciler.pass(&agent).await;
    }
    let zds = dataplane::zds::ZdsListener::bind(&args.zds_socket)?;
    tokio::spawn(server::serve_zds(agent.clone(), zds));
    let plugin = server::bind_plugin(&args.plugin_socket).await?;
    tokio::spawn(server::serve_plugin(agent.clone(), plugin));
    tokio::spawn(reconciler.run(agent.clone()));
    tokio::spawn(uninstall::watch(agent.clone()));
    tracing::info!(plugin_socket = %args.plugin_socket.display(), zds_socket = %args.zds_socket.display(), "mesh-cni agent serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // Pods stay enrolled: ztunnel keeps them, the next agent finds them again.
    let _ = std::fs::remove_file(&args.plugin_socket);
    tracing::info!("mesh-cni agent stopping");
    Ok(())
}
