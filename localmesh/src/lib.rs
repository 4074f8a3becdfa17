//! Local mode: the whole mesh on one Linux box — meshd, one ztunnel per node, and pods as
//! network namespaces built by the testbed. The demo, the integration tests and the bench all
//! drive the mesh through [`LocalMesh`], so they exercise one implementation. Local mode is
//! also the cluster's kubelet and controller-manager: Pods run, Deployments become pods
//! (`workloads`), and what meshd renders for waypoints is applied like a user's file
//! (`controller`).
//!
//! Layout of a run (under the testbed's run directory):
//! `config/` is what meshd watches (rendered manifests), `state/` is meshd's CA and node
//! secret, `meshd.sock` its API, `meshd-out/` what meshd renders (`objects/`, `status/`),
//! `node-N.token` each node's credentials, `sa.<ns>.<sa>.token` a waypoint pod's,
//! `controller.log` what the controller applied, `cni/<node>/` each node's CNI conf and bin
//! dirs and its `mesh-cni` agent's sockets (`cni`, `node_cni`), `*.log` every process.
//! Credentials are root's alone: the run directory and `state/` are 0700, tokens 0600, and
//! meshd's socket admits only root.
//! Owns processes and manifests; the network itself is the testbed's.
mod api_mode;
mod apply;
pub mod bench;
pub mod bench_control_plane;
pub mod bench_l4;
pub mod bench_policy;
pub mod bench_relay;
pub mod bench_restart;
pub mod bench_rounds;
pub mod bench_stats;
pub mod bench_waypoint;
pub mod bins;
pub mod client;
pub mod cni;
mod controller;
pub mod demo;
pub mod deployments;
mod fs_util;
mod kubelet;
mod meshd;
mod node_cni;
mod observe;
mod options;
pub mod render;
mod wait;
pub mod wire;
mod workloads;
mod ztunnels;

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
pub use bins::Bins;
use fs_util::{make_private_dir, write_atomically, write_private};
pub use meshd::MESHD_TLS_ADDR;
use meshd::meshd_has_write_dir;
pub use options::{Enrollment, MeshOptions};
use serde_json::Value;
use testbed::{Cluster, ClusterConfig, Proc};
use wait::DEADLINE;
pub use wait::wait_for;
use ztunnels::sweep_orphaned_ebpf;
pub use ztunnels::{AdminPorts, BESIDE_ADMIN_PORTS, ISTIO_ADMIN_PORTS, orphan_sweep_lock};

/// A pod the local kubelet started.
pub struct ScheduledPod {
    pub namespace: String,
    pub name: String,
    pub file: String,
    pub pod: testbed::Pod,
    pub node_name: String,
    /// `metadata.uid` (what the CNI chain gets as K8S_POD_UID).
    pub uid: String,
    /// The sandbox as the CNI chain saw it and the chain's ADD result (DEL gets it back);
    /// `None` until the chain ran.
    pub sandbox: Option<(cni::Sandbox, Value)>,
    /// Empty until the chain's ADD succeeded: then its containers.
    pub procs: Vec<Proc>,
    /// Set for a pod of a Deployment (bare Pods are rendered from the user's document).
    pub owner: Option<workloads::Owned>,
    /// Creation order (a scale-down removes the newest first).
    pub seq: u64,
}

/// A running local-mode mesh. Dropping it stops everything and removes every trace.
///
/// Dereferences to [`Mesh`], which the background controller (realizing what meshd renders)
/// shares; it is stopped first on drop.
pub struct LocalMesh {
    controller: Option<controller::Controller>,
    mesh: Arc<Mesh>,
}

impl Deref for LocalMesh {
    type Target = Mesh;
    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

/// Everything of a [`LocalMesh`]: processes, pods and manifests.
pub struct Mesh {
    pub cluster: Cluster,
    pub bins: Bins,
    pub opts: MeshOptions,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Where meshd writes what it renders for waypoints (its `--write-dir`); the controller
    /// applies `objects/*.yaml` from here.
    pub meshd_out: PathBuf,
    /// Whether this meshd has `--write-dir` (newer than the rest of local mode's use of it).
    meshd_writes: bool,
    meshd: Mutex<Option<Proc>>,
    ztunnels: Mutex<Vec<Option<(Proc, AdminPorts)>>>,
    /// Each node's CNI dirs and agent sockets, by node index.
    pub cni: Vec<cni::NodeCni>,
    /// Each node's `mesh-cni agent` ([`Enrollment::Cni`]).
    agents: Mutex<Vec<Option<Proc>>>,
    pods: Mutex<HashMap<String, ScheduledPod>>,
    /// Each applied file's documents as rendered (Pods scheduled, Services with VIPs), without
    /// its Deployments' pods: a rollout re-writes the file from these and the current pods.
    files: Mutex<HashMap<String, Vec<Value>>>,
    /// VIPs given to Services ("ns/name"), kept across re-applies as Kubernetes keeps them.
    vips: Mutex<HashMap<String, Vec<String>>>,
    /// One apply at a time (the user's and the controller's), as one API server would order them.
    apply_lock: Mutex<()>,
    stopping: AtomicBool,
    next_vip: AtomicU32,
    next_node: AtomicUsize,
    next_seq: AtomicU64,
    /// Extra environment for waypoint pods started from now on (e.g. `TRACE_COLLECTOR`): what
    /// Istio sets for its proxies through meshConfig.
    waypoint_env: Mutex<Vec<(String, String)>>,
    /// The API double and what was written to it, in API mode.
    api: Option<api_mode::ApiMode>,
}

impl LocalMesh {
    /// Builds the cluster and starts meshd and every node's ztunnel.
    pub fn start(mut opts: MeshOptions) -> anyhow::Result<LocalMesh> {
        // API mode enrolls from meshd's config unless asked for its agents ([`MeshOptions::api_cni`]):
        // the directory view would not see what is written to the API.
        if opts.api {
            opts.enrollment = if opts.api_cni {
                Enrollment::Cni
            } else {
                Enrollment::Config
            };
        }
        let bins = Bins::locate()?;
        testbed::sweep_stale();
        sweep_orphaned_ebpf(&bins);
        let cluster = Cluster::new(ClusterConfig {
            nodes: opts.nodes,
            ipv6: opts.ipv6,
        })
        .context("building the testbed cluster")?;
        let dir = cluster.dir().to_path_buf();
        let config_dir = dir.join("config");
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&config_dir)?;
        for private in [&dir, &state_dir] {
            make_private_dir(private)?;
        }
        let meshd_writes = meshd_has_write_dir(&bins);
        if !meshd_writes {
            eprintln!("localmesh: this meshd has no --write-dir: it renders no waypoints");
        }
        let meshd_out = dir.join("meshd-out");
        make_private_dir(&meshd_out)?;
        std::fs::create_dir_all(meshd_out.join("objects"))?;
        let api = api_mode::start_if(&opts, &cluster)?;
        let cni = cluster
            .nodes()
            .iter()
            .map(|n| cni::NodeCni::create(&dir, &n.name))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let installs = node_cni::start_installs(&bins, &opts, &cni)?;
        let mesh = Arc::new(Mesh {
            socket: dir.join("meshd.sock"),
            cluster,
            bins,
            opts,
            config_dir,
            state_dir,
            meshd_out,
            meshd_writes,
            meshd: Mutex::new(None),
            ztunnels: Mutex::new(Vec::new()),
            cni,
            agents: Mutex::new(Vec::new()),
            pods: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            vips: Mutex::new(HashMap::new()),
            apply_lock: Mutex::new(()),
            stopping: AtomicBool::new(false),
            next_vip: AtomicU32::new(10),
            next_node: AtomicUsize::new(0),
            next_seq: AtomicU64::new(0),
            waypoint_env: Mutex::new(Vec::new()),
            api,
        });
        mesh.start_meshd()?;
        let n = mesh.cluster.nodes().len();
        *mesh.ztunnels.lock().unwrap_or_else(|p| p.into_inner()) = (0..n).map(|_| None).collect();
        *mesh.agents.lock().unwrap_or_else(|p| p.into_inner()) = (0..n).map(|_| None).collect();
        mesh.start_node_cni(installs)?;
        let mut launched = Vec::new();
        for i in 0..n {
            let proc = mesh.spawn_ztunnel(i, ISTIO_ADMIN_PORTS)?;
            mesh.ztunnels.lock().unwrap_or_else(|p| p.into_inner())[i] =
                Some((proc, ISTIO_ADMIN_PORTS));
            launched.push(i);
        }
        for i in launched {
            mesh.wait_ztunnel_connected(i)?;
        }
        let objects = mesh.meshd_out.join("objects");
        let controller = Some(controller::Controller::start(mesh.clone(), objects)?);
        Ok(LocalMesh { controller, mesh })
    }
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        // The controller holds the mesh too: stop it first, so the mesh's teardown runs now.
        self.mesh.stopping.store(true, Ordering::Relaxed);
        self.controller.take();
    }
}

impl Mesh {
    pub fn dir(&self) -> &Path {
        self.cluster.dir()
    }

    /// Runs `meshctl` against this mesh (its config directory and meshd's status), as a user
    /// of local mode would: `mesh.meshctl(&["waypoint", "apply", "-n", "shop"])`.
    pub fn meshctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        if !self.bins.meshctl.exists() {
            bail!(
                "{} is missing: run `cargo build --bins`",
                self.bins.meshctl.display()
            );
        }
        Command::new(&self.bins.meshctl)
            .arg("--config-dir")
            .arg(&self.config_dir)
            .arg("--status-dir")
            .arg(self.meshd_out.join("status"))
            .args(args)
            .output()
            .context("running meshctl")
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Workloads first: their connections end, so the ztunnels have nothing left to drain.
        for (_, mut p) in self.pods.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            for proc in p.procs.iter_mut() {
                proc.kill();
            }
        }
        let n = self
            .ztunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        for i in 0..n {
            self.stop_ztunnel(i, true);
        }
        for i in 0..self.cni.len() {
            self.stop_agent(i, true);
        }
        // A stopped ztunnel keeps its pinned eBPF state (so its pods fail closed until it
        // returns): the documented cleanup command removes it.
        for node in self.cluster.nodes() {
            let ztunnel = self.bins.ztunnel.display().to_string();
            let _ = self
                .cluster
                .run(&node.netns, &[&ztunnel, "cleanup", "--node", &node.name]);
        }
        if let Some(mut p) = self.meshd.lock().unwrap_or_else(|p| p.into_inner()).take() {
            p.terminate(Duration::from_secs(5));
        }
    }
}

pub fn pod_ips(p: &testbed::Pod) -> Vec<String> {
    let mut v = vec![p.ip4.to_string()];
    if let Some(ip6) = p.ip6 {
        v.push(ip6.to_string());
    }
    v
}

impl Mesh {
    /// Sets `key=value` in the environment of every waypoint pod started after this call.
    pub fn set_waypoint_env(&self, key: &str, value: &str) {
        let mut env = self.waypoint_env.lock().unwrap_or_else(|p| p.into_inner());
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.to_owned()));
    }
}
