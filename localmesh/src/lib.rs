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
pub mod bench;
pub mod bench_control_plane;
pub mod bench_policy;
pub mod bench_restart;
pub mod bench_waypoint;
pub mod bins;
pub mod client;
pub mod cni;
mod controller;
pub mod demo;
pub mod deployments;
mod kubelet;
mod node_cni;
pub mod render;
pub mod wire;
mod workloads;

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
pub use bins::Bins;
use serde_json::Value;
use testbed::{Cluster, ClusterConfig, Netns, Proc};

/// How to bring the mesh up.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    pub nodes: usize,
    pub ipv6: bool,
    pub trust_domain: String,
    /// meshd's `--cert-lifetime` (e.g. "24h", "10s").
    pub cert_lifetime: String,
    /// Extra `RUST_LOG` for mesh processes.
    pub log: String,
    /// ztunnel's `--capture` mode; `$MESH_CAPTURE` overrides the default.
    pub capture: String,
    /// ztunnel's `--fast-path` (same-node sockmap splice; eBPF capture only).
    pub fast_path: bool,
    /// ztunnel's `--unenroll-on-exit`: a graceful stop then removes capture from its pods
    /// (uninstall) instead of keeping them captured, failing closed (restart).
    pub unenroll_on_exit: bool,
    /// More ztunnel arguments (e.g. `--ebpf-log debug`).
    pub ztunnel_args: Vec<String>,
    /// Run meshd as on a real cluster: in node-0's network namespace, serving gRPC over TLS on
    /// its fabric address ([`MESHD_TLS_ADDR`]), every ztunnel verifying it with `--meshd-ca`
    /// (the mesh root). Otherwise meshd listens on a root-only unix socket.
    pub meshd_tls: bool,
    /// API mode: meshd reads the Kubernetes API double (started with the mesh) instead of
    /// `config/`, and what local mode renders is written there (`api_mode`).
    pub api: bool,
    /// How ztunnel learns pods' network namespaces ([`Enrollment`]); `$MESH_ENROLLMENT`
    /// (`cni` or `config`) overrides the default, `cni`.
    pub enrollment: Enrollment,
    /// The agents rewrite the node's own connections to enrolled pods to the kubelet-probe
    /// source (`mesh-cni agent` without `--no-probe-snat`), as on Kubernetes. Off by default:
    /// local mode's kubelet probes from inside the pod, and tests use the node's netns as an
    /// outside client that STRICT must refuse.
    pub probe_snat: bool,
    /// API mode with CNI enrollment: each node's agent reads the double (`--view kube`, over
    /// the fabric, as its own mesh-cni pod with that ServiceAccount's token) instead of
    /// `config/`. Off by default, when API mode enrolls from meshd's config: local mode's pods
    /// have no cgroup of their own, so a Kube-view agent cannot find a running pod's netns in
    /// host /proc, and a pod whose namespace is labelled after it started is not enrolled
    /// (pods created in an ambient namespace are: their CNI ADD carries the netns).
    pub api_cni: bool,
}

/// How pods are enrolled with their node's ztunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrollment {
    /// As on Kubernetes: the kubelet runs the node's CNI chain (our veth wiring, then
    /// `mesh-cni`) before a pod's apps start; each node's `mesh-cni agent` hands the pod's
    /// netns to ztunnel over ZDS (`ztunnel --enrollment zds`). A pod that cannot be enrolled
    /// does not start.
    Cni,
    /// The pre-CNI path: ztunnel enrolls the pods meshd's config says are captured, finding
    /// their netns from local mode's `mesh.local/netns` annotation (no agent, no plugin).
    Config,
}

impl Enrollment {
    /// `$MESH_ENROLLMENT`, else [`Enrollment::Cni`].
    pub fn from_env() -> Enrollment {
        match std::env::var("MESH_ENROLLMENT").as_deref() {
            Ok("config") => Enrollment::Config,
            _ => Enrollment::Cni,
        }
    }
}

/// Where meshd listens when [`MeshOptions::meshd_tls`] is set: node-0's fabric address and
/// istiod's TLS port.
pub const MESHD_TLS_ADDR: &str = "10.254.0.1:15012";

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            nodes: 2,
            ipv6: true,
            trust_domain: "cluster.local".into(),
            cert_lifetime: "24h".into(),
            log: "info".into(),
            capture: std::env::var("MESH_CAPTURE").unwrap_or_else(|_| "ebpf".into()),
            fast_path: false,
            unenroll_on_exit: false,
            ztunnel_args: Vec::new(),
            meshd_tls: false,
            probe_snat: false,
            api: false,
            api_cni: false,
            enrollment: Enrollment::from_env(),
        }
    }
}

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

const DEADLINE: Duration = Duration::from_secs(20);

/// A ztunnel's (admin, metrics, readiness) ports.
pub type AdminPorts = (u16, u16, u16);
/// Istio's: 127.0.0.1:15000, 15020, 15021.
pub const ISTIO_ADMIN_PORTS: AdminPorts = (15000, 15020, 15021);
/// Those of a ztunnel started beside a running one ([`Mesh::start_ztunnel_beside`]).
pub const BESIDE_ADMIN_PORTS: AdminPorts = (15100, 15120, 15121);

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

    /// Starts meshd (again) and waits until it accepts connections.
    pub fn start_meshd(&self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let listen = if self.opts.meshd_tls {
            MESHD_TLS_ADDR.to_string()
        } else {
            format!("unix:{}", self.socket.display())
        };
        let mut cmd = Command::new(&self.bins.meshd);
        cmd.arg("run");
        match &self.api {
            Some(api) => api.meshd_args(&mut cmd),
            None => {
                cmd.arg("--config-dir").arg(&self.config_dir);
            }
        }
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--listen")
            .arg(listen)
            .arg("--trust-domain")
            .arg(&self.opts.trust_domain)
            .arg("--cert-lifetime")
            .arg(&self.opts.cert_lifetime)
            .env("RUST_LOG", &self.opts.log);
        if self.meshd_writes && self.api.is_none() {
            cmd.arg("--write-dir").arg(&self.meshd_out);
        }
        if self.opts.meshd_tls {
            let node0 = self.cluster.nodes().first().cloned().context("no nodes")?;
            let proc = self.cluster.spawn(&node0.netns, cmd, "meshd")?;
            *self.meshd.lock().unwrap_or_else(|p| p.into_inner()) = Some(proc);
            let addr: std::net::SocketAddr = MESHD_TLS_ADDR.parse()?;
            return wait_for(DEADLINE, "meshd to listen", || {
                Ok(node0
                    .netns
                    .enter(move || {
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    })?
                    .is_ok())
            });
        }
        let host = Netns {
            name: "host".into(),
            path: "/proc/self/ns/net".into(),
        };
        let proc = self.cluster.spawn(&host, cmd, "meshd")?;
        *self.meshd.lock().unwrap_or_else(|p| p.into_inner()) = Some(proc);
        wait_for(DEADLINE, "meshd to listen", || {
            Ok(std::os::unix::net::UnixStream::connect(&self.socket).is_ok())
        })
    }

    /// The mesh root meshd's TLS certificate chains to (what ztunnels get as `--meshd-ca`).
    pub fn mesh_root(&self) -> PathBuf {
        self.state_dir.join("ca").join("root-cert.pem")
    }

    /// Stops meshd (SIGKILL: an outage, not a goodbye).
    pub fn kill_meshd(&self) {
        if let Some(mut p) = self.meshd.lock().unwrap_or_else(|p| p.into_inner()).take() {
            p.kill();
        }
    }

    fn node_token(&self, node: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir().join(format!("{node}.token"));
        if let Some(api) = &self.api {
            api.node_token(node, &path)?;
            return Ok(path);
        }
        if !path.exists() {
            let out = Command::new(&self.bins.meshd)
                .args(["node-token", "--node", node, "--state-dir"])
                .arg(&self.state_dir)
                .output()
                .context("running meshd node-token")?;
            if !out.status.success() {
                bail!(
                    "meshd node-token failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            write_private(&path, &out.stdout)?;
        }
        Ok(path)
    }

    /// Starts node `i`'s ztunnel inside the node's network namespace ([`Enrollment::Cni`]:
    /// and waits until it is connected to the node's agent, so pods can be added).
    pub fn start_ztunnel(&self, i: usize) -> anyhow::Result<()> {
        let proc = self.spawn_ztunnel(i, ISTIO_ADMIN_PORTS)?;
        self.ztunnels.lock().unwrap_or_else(|p| p.into_inner())[i] =
            Some((proc, ISTIO_ADMIN_PORTS));
        self.wait_ztunnel_connected(i)
    }

    /// A rolling update with surge: starts a second ztunnel for node `i` next to the running
    /// one and makes it node `i`'s ztunnel (its config dump and log from now on); returns the
    /// previous one, still running, for the caller to stop. The two serve their admin, metrics
    /// and readiness endpoints on different ports (Istio's and [`BESIDE_ADMIN_PORTS`]).
    pub fn start_ztunnel_beside(&self, i: usize) -> anyhow::Result<Proc> {
        let running = self
            .ztunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)
            .and_then(|z| z.as_ref().map(|(_, ports)| *ports))
            .context("node has no running ztunnel")?;
        let ports = if running == ISTIO_ADMIN_PORTS {
            BESIDE_ADMIN_PORTS
        } else {
            ISTIO_ADMIN_PORTS
        };
        let mut proc = self.spawn_ztunnel(i, ports)?;
        // Connected before it counts as the node's ztunnel: adds go to the newest connection.
        if let Err(e) = self.wait_connected_on(i, ports.0) {
            proc.kill();
            return Err(e);
        }
        let old = self.ztunnels.lock().unwrap_or_else(|p| p.into_inner())[i]
            .replace((proc, ports))
            .context("node has no running ztunnel")?;
        Ok(old.0)
    }

    fn spawn_ztunnel(&self, i: usize, ports: AdminPorts) -> anyhow::Result<Proc> {
        let node = self
            .cluster
            .nodes()
            .get(i)
            .cloned()
            .context("no such node")?;
        let token = self.node_token(&node.name)?;
        let mut cmd = Command::new(&self.bins.ztunnel);
        cmd.arg("--node").arg(&node.name);
        if self.opts.meshd_tls {
            cmd.arg("--meshd")
                .arg(MESHD_TLS_ADDR)
                .arg("--meshd-ca")
                .arg(self.mesh_root())
                .arg("--meshd-name")
                .arg(format!("meshd.{}", self.opts.trust_domain));
        } else {
            cmd.arg("--meshd")
                .arg(format!("unix:{}", self.socket.display()));
        }
        cmd.arg("--token-file")
            .arg(&token)
            .arg("--log-format")
            .arg("json")
            .arg("--capture")
            .arg(&self.opts.capture)
            .env("RUST_LOG", &self.opts.log);
        if self.opts.fast_path {
            cmd.arg("--fast-path");
        }
        if self.opts.unenroll_on_exit {
            cmd.arg("--unenroll-on-exit");
        }
        if self.opts.enrollment == Enrollment::Cni {
            let sock = &self.cni.get(i).context("no such node")?.zds_socket;
            cmd.args(["--enrollment", "zds", "--zds-socket"]).arg(sock);
        }
        cmd.args(&self.opts.ztunnel_args);
        let (admin, metrics, ready) = ports;
        cmd.arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin}"))
            .arg("--metrics-addr")
            .arg(format!("[::]:{metrics}"))
            .arg("--ready-addr")
            .arg(format!("[::]:{ready}"));
        // One log per admin-port set, so a ztunnel started beside another has its own.
        let label = if ports == ISTIO_ADMIN_PORTS {
            format!("ztunnel-{}", node.name)
        } else {
            format!("ztunnel-{}-{admin}", node.name)
        };
        Ok(self.cluster.spawn(&node.netns, cmd, &label)?)
    }

    /// Stops node `i`'s ztunnel: gracefully (SIGTERM: it closes its listeners, and unenrolls
    /// its pods if started with `unenroll_on_exit`) or not (SIGKILL).
    pub fn stop_ztunnel(&self, i: usize, graceful: bool) {
        let p = self
            .ztunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(i)
            .and_then(Option::take);
        if let Some((mut p, _)) = p {
            if graceful {
                p.terminate(Duration::from_secs(10));
            } else {
                p.kill();
            }
        }
    }

    /// The admin port of node `i`'s current ztunnel.
    fn admin_port(&self, i: usize) -> u16 {
        let z = self.ztunnels.lock().unwrap_or_else(|p| p.into_inner());
        z.get(i)
            .and_then(|z| z.as_ref().map(|(_, ports)| ports.0))
            .unwrap_or(ISTIO_ADMIN_PORTS.0)
    }

    /// Log of node `i`'s current ztunnel.
    pub fn ztunnel_log(&self, i: usize) -> String {
        let z = self.ztunnels.lock().unwrap_or_else(|p| p.into_inner());
        z.get(i)
            .and_then(|p| p.as_ref())
            .and_then(|(p, _)| std::fs::read_to_string(p.log_path()).ok())
            .unwrap_or_default()
    }

    pub fn meshd_log(&self) -> String {
        let m = self.meshd.lock().unwrap_or_else(|p| p.into_inner());
        m.as_ref()
            .and_then(|p| std::fs::read_to_string(p.log_path()).ok())
            .unwrap_or_default()
    }

    /// Applies a manifest file: schedules its pods (each runs once the node's CNI chain has
    /// set it up), gives its Services VIPs, runs its Deployments' pods, and writes the result
    /// where meshd watches. Re-applying the same file keeps pods that are still listed and
    /// removes those that are not; a Deployment scales or rolls out to its new template (new
    /// pods up before old ones go). An invalid Deployment refuses the whole file and changes
    /// nothing. A pod whose CNI chain fails does not run and is left out of the file; the
    /// rest is applied and the chain's error returned.
    pub fn apply(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut docs = render::parse_docs(file, yaml)?;
        let deployments = self.validate_deployments(file, &docs)?;
        let mut listed = Vec::new();
        let mut services = Vec::new();
        let mut new_pods: Vec<render::PodDoc> = Vec::new();
        let rendered = docs.iter_mut().try_for_each(|doc| {
            match render::kind(doc) {
                "Pod" => {
                    let spec = render::pod_doc(doc).with_context(|| file.to_string())?;
                    let key = format!("{}/{}", spec.namespace, spec.name);
                    listed.push(key.clone());
                    let placed = self.create_sandbox(file, &spec, None)?;
                    render::set_pod_status(doc, &placed.node, &placed.ips, &placed.netns);
                    render::set_pod_uid(doc, &placed.uid);
                    if placed.new {
                        new_pods.push(spec);
                    }
                }
                "Service" => {
                    let key = format!(
                        "{}/{}",
                        render::str_at(doc, &["metadata", "namespace"]).unwrap_or("default"),
                        render::str_at(doc, &["metadata", "name"]).unwrap_or("")
                    );
                    render::assign_cluster_ips(doc, &self.service_vips(&key));
                    services.push(key);
                }
                _ => {}
            }
            anyhow::Ok(())
        });
        if let Err(e) = rendered {
            for spec in &new_pods {
                self.discard(&format!("{}/{}", spec.namespace, spec.name), None);
            }
            return Err(e);
        }
        let gone: Vec<String> = {
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            pods.values()
                .filter(|p| p.file == file && p.owner.is_none())
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .filter(|k| !listed.contains(k))
                .collect()
        };
        for key in gone {
            self.delete_pod(&key)?;
        }
        let previous = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(file.to_string(), docs);
        self.forget_services(previous.as_deref(), &services);
        let started = self.run_new_pods(file, &new_pods);
        let reconciled = self.reconcile_deployments(file, &deployments);
        started.and(reconciled)
    }

    /// Runs pods just sandboxed for `file` (already in its documents): the file is written
    /// first, so the cluster knows them when their CNI chain asks. Pods that fail are taken
    /// out of the file's documents; the first failure is returned.
    fn run_new_pods(&self, file: &str, pods: &[render::PodDoc]) -> anyhow::Result<()> {
        if pods.is_empty() {
            return Ok(());
        }
        let failed = match self.write_file(file) {
            Ok(()) => self.run_pods(file, pods),
            Err(e) => {
                for spec in pods {
                    self.discard(&format!("{}/{}", spec.namespace, spec.name), None);
                }
                pods.iter()
                    .map(|s| {
                        (
                            format!("{}/{}", s.namespace, s.name),
                            anyhow::anyhow!("{e:#}"),
                        )
                    })
                    .collect()
            }
        };
        let Some((_, first)) = failed.first() else {
            return Ok(());
        };
        let err = anyhow::anyhow!("{first:#}");
        let keys: Vec<&String> = failed.iter().map(|(k, _)| k).collect();
        if let Some(docs) = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(file)
        {
            docs.retain(|d| {
                render::kind(d) != "Pod"
                    || !keys.contains(&&format!(
                        "{}/{}",
                        render::str_at(d, &["metadata", "namespace"]).unwrap_or("default"),
                        render::str_at(d, &["metadata", "name"]).unwrap_or("")
                    ))
            });
        }
        Err(err)
    }

    /// The VIPs of Service `key` ("ns/name"): those it already has, else new ones.
    fn service_vips(&self, key: &str) -> Vec<String> {
        let mut vips = self.vips.lock().unwrap_or_else(|p| p.into_inner());
        vips.entry(key.to_string())
            .or_insert_with(|| {
                let n = self.next_vip.fetch_add(1, Ordering::Relaxed);
                let mut v = vec![format!("10.96.{}.{}", n / 250, n % 250 + 1)];
                if self.opts.ipv6 {
                    v.push(format!("fd00:96::{n:x}"));
                }
                v
            })
            .clone()
    }

    /// Releases the VIPs of Services a file no longer lists (a later Service gets new ones).
    fn forget_services(&self, previous: Option<&[Value]>, still: &[String]) {
        let mut vips = self.vips.lock().unwrap_or_else(|p| p.into_inner());
        for doc in previous.unwrap_or_default() {
            if render::kind(doc) == "Service" {
                let key = format!(
                    "{}/{}",
                    render::str_at(doc, &["metadata", "namespace"]).unwrap_or("default"),
                    render::str_at(doc, &["metadata", "name"]).unwrap_or("")
                );
                if !still.contains(&key) {
                    vips.remove(&key);
                }
            }
        }
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

    /// Writes a file into meshd's config directory exactly as given (no rendering).
    pub fn write_raw(&self, file: &str, text: &str) -> anyhow::Result<()> {
        write_atomically(&self.config_dir.join(file), text)
    }

    /// Removes a manifest file and the pods it scheduled (its Deployments' pods leave the
    /// config before they stop, as in a scale-down).
    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<String> = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| p.file == file && p.owner.is_none())
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        let previous = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(file);
        self.forget_services(previous.as_deref(), &[]);
        let owned = self.take_pods(|p| p.file == file && p.owner.is_some());
        let _ = std::fs::remove_file(self.config_dir.join(file));
        if let Some(api) = &self.api
            && let Err(e) = api.sync_file(file, &mut [])
        {
            tracing::warn!("{e:#}");
        }
        for k in keys {
            self.delete_pod(&k)?;
        }
        self.retire(owned);
        Ok(())
    }

    fn delete_pod(&self, key: &str) -> anyhow::Result<()> {
        let taken = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if let Some(p) = taken {
            self.stop_pod(p)?;
        }
        Ok(())
    }

    /// The testbed pod behind `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> anyhow::Result<testbed::Pod> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&format!("{namespace}/{name}"))
            .map(|p| p.pod.clone())
            .with_context(|| format!("no pod {namespace}/{name}"))
    }

    /// Runs a command inside a pod's network namespace.
    pub fn exec(&self, namespace: &str, name: &str, argv: &[&str]) -> anyhow::Result<Output> {
        let pod = self.pod(namespace, name)?;
        Ok(self.cluster.run(&pod.netns, argv)?)
    }

    /// Whether something listens on TCP `port` inside the pod.
    pub fn listening(&self, namespace: &str, name: &str, port: u16) -> anyhow::Result<bool> {
        let out = self.exec(
            namespace,
            name,
            &["ss", "-Hltn", &format!("sport = :{port}")],
        )?;
        Ok(!String::from_utf8_lossy(&out.stdout).trim().is_empty())
    }

    /// Whether an nftables table of ztunnel's exists in the pod (nftables capture mode).
    pub fn nft_table_present(&self, namespace: &str, name: &str) -> anyhow::Result<bool> {
        let out = self.exec(
            namespace,
            name,
            &["nft", "list", "table", "inet", "ztunnel"],
        )?;
        Ok(out.status.success())
    }

    /// ztunnel's admin config dump on node `i` (its admin port is local to the node's netns).
    pub fn config_dump(&self, node: usize) -> anyhow::Result<serde_json::Value> {
        self.config_dump_on(node, self.admin_port(node))
    }

    /// The config dump of the ztunnel serving admin on `admin_port` in node `node`'s netns.
    pub fn config_dump_on(
        &self,
        node: usize,
        admin_port: u16,
    ) -> anyhow::Result<serde_json::Value> {
        let n = self
            .cluster
            .nodes()
            .get(node)
            .cloned()
            .context("no such node")?;
        let out = self.cluster.run(
            &n.netns,
            &[
                "curl",
                "-sf",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:{admin_port}/config_dump"),
            ],
        )?;
        anyhow::ensure!(
            out.status.success(),
            "config_dump on node-{node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Whether the pod's node's ztunnel reports it enrolled (capture on, whatever the mode).
    pub fn captured(&self, namespace: &str, name: &str) -> anyhow::Result<bool> {
        let node = self.pod(namespace, name)?.node;
        let uid = format!("{namespace}/{name}");
        let dump = match self.config_dump(node) {
            Ok(d) => d,
            Err(_) => return Ok(false), // ztunnel not up (yet): nothing is enrolled
        };
        let enrolled = dump["pods"]
            .as_array()
            .is_some_and(|pods| pods.iter().any(|p| p["uid"] == uid.as_str()));
        Ok(enrolled)
    }

    /// Waits until ztunnel has enrolled the pod (capture installed and HBONE listening) and
    /// every ztunnel's config says it is captured (clients send it HBONE).
    pub fn wait_enrolled(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        wait_for(
            DEADLINE,
            &format!("{namespace}/{name} to be enrolled"),
            || {
                Ok(self.captured(namespace, name)?
                    && self.listening(namespace, name, meshcore::HBONE_PORT)?
                    && self.mesh_says_captured(namespace, name, true)?)
            },
        )
    }

    /// Waits until nothing of ztunnel remains in the pod (not enrolled, no listener, no nft
    /// table) and no ztunnel's config says it is captured (clients send it plain TCP).
    pub fn wait_unenrolled(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        wait_for(
            DEADLINE,
            &format!("{namespace}/{name} to be unenrolled"),
            || {
                Ok(!self.captured(namespace, name)?
                    && !self.listening(namespace, name, meshcore::HBONE_PORT)?
                    && !self.nft_table_present(namespace, name)?
                    && self.mesh_says_captured(namespace, name, false)?)
            },
        )
    }

    /// Whether every running ztunnel's config agrees the workload is (not) captured. With CNI
    /// enrollment the node's agent may act on a label before meshd's config reaches clients.
    fn mesh_says_captured(&self, namespace: &str, name: &str, want: bool) -> anyhow::Result<bool> {
        let uid = format!("{namespace}/{name}");
        for i in 0..self.cluster.nodes().len() {
            let Ok(dump) = self.config_dump(i) else {
                continue; // no ztunnel there (stopped)
            };
            let captured = dump["workloads"]
                .as_array()
                .and_then(|ws| ws.iter().find(|w| w["uid"] == uid.as_str()))
                .is_some_and(|w| w["captured"] == true);
            if captured != want {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Waits until the pod's app listens on `port`.
    pub fn wait_listening(&self, namespace: &str, name: &str, port: u16) -> anyhow::Result<()> {
        wait_for(
            DEADLINE,
            &format!("{namespace}/{name} to listen on {port}"),
            || self.listening(namespace, name, port),
        )
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

/// Whether this meshd writes what it renders (`meshd run --write-dir`); the flag is newer
/// than local mode's other uses of meshd.
fn meshd_has_write_dir(bins: &Bins) -> bool {
    Command::new(&bins.meshd)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("--write-dir"))
}

/// Removes the pinned eBPF state of ztunnels whose namespace is gone (a run that was killed
/// before it could clean up, whose namespaces `sweep_stale` just removed). Never touches a live
/// mesh's state, so it is safe next to other runs; a failure only leaves the orphans.
fn sweep_orphaned_ebpf(bins: &Bins) {
    match Command::new(&bins.ztunnel)
        .args(["cleanup", "--orphans"])
        .output()
    {
        Ok(out) if out.status.success() => {
            for dir in String::from_utf8_lossy(&out.stdout).lines() {
                eprintln!("localmesh: removed orphaned eBPF state {dir}");
            }
        }
        Ok(out) => eprintln!(
            "localmesh: ztunnel cleanup --orphans failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("localmesh: running ztunnel cleanup --orphans: {e}"),
    }
}

pub fn pod_ips(p: &testbed::Pod) -> Vec<String> {
    let mut v = vec![p.ip4.to_string()];
    if let Some(ip6) = p.ip6 {
        v.push(ip6.to_string());
    }
    v
}

/// Creates `dir` if missing and makes it 0700 (root's alone) even if it existed.
fn make_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))
}

/// Writes a credential readable by root only (0600 from the first byte).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // A file left by an older run keeps its mode through `open`: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Polls `cond` until it holds or `deadline` passes (then the error names what was awaited).
pub fn wait_for(
    deadline: Duration,
    what: &str,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last_err = None;
    let mut pause = Duration::from_millis(5);
    while start.elapsed() < deadline {
        match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    match last_err {
        Some(e) => bail!("timed out after {deadline:?} waiting for {what} (last error: {e:#})"),
        None => bail!("timed out after {deadline:?} waiting for {what}"),
    }
}

impl Mesh {
    /// Sets `key=value` in the environment of every waypoint pod started after this call.
    pub fn set_waypoint_env(&self, key: &str, value: &str) {
        let mut env = self.waypoint_env.lock().unwrap_or_else(|p| p.into_inner());
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.to_owned()));
    }
}
