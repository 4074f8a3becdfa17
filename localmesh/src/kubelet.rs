//! The local kubelet: runs a pod as a Kubernetes node does. Creating it: the sandbox (network
//! namespace and veth: the chain's primary plugin, which the testbed wires) — then the caller
//! writes the pod where the cluster reads it (IPs, netns, unready) — then the rest of the
//! node's CNI chain (`cni`: ADD, e.g. `mesh-cni`, which returns only once ztunnel holds the
//! pod) — then the containers. A pod whose chain fails is torn down and never runs a process;
//! the error is the plugin's. Removing it: containers stopped, chain DEL, sandbox gone.
//! Owns sandboxes and pod processes; when a pod is written is the caller's (apply, rollouts).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;

use anyhow::{Context, bail};

use crate::cni::{self, Op};
use crate::workloads::{Owned, WAYPOINT_COMMAND};
use crate::{MESHD_TLS_ADDR, Mesh, ScheduledPod, pod_ips, render, write_private};

/// Where a pod's sandbox is, for its document.
pub(crate) struct Placed {
    pub node: String,
    pub ips: Vec<String>,
    pub netns: String,
    pub uid: String,
    /// False when the pod already existed (it is left as it is).
    pub new: bool,
}

impl Mesh {
    /// The sandbox of a pod on its node (its `spec.nodeName`, else round-robin): netns, veth,
    /// IPs and a UID; no process yet ([`Mesh::run_pods`] starts them). A pod that exists is
    /// left as it is.
    pub(crate) fn create_sandbox(
        &self,
        file: &str,
        spec: &render::PodDoc,
        owner: Option<Owned>,
    ) -> anyhow::Result<Placed> {
        let key = format!("{}/{}", spec.namespace, spec.name);
        let nodes = self.cluster.nodes();
        if let Some(p) = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(Placed {
                node: p.node_name.clone(),
                ips: pod_ips(&p.pod),
                netns: p.pod.netns.path.display().to_string(),
                uid: p.uid.clone(),
                new: false,
            });
        }
        let node = match &spec.node {
            Some(name) => nodes.iter().find(|n| &n.name == name)
                .with_context(|| format!("{file}: pod {key}: spec.nodeName {name:?} is not a node of this cluster ({})",
                    nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")))?.clone(),
            None => nodes[self.next_node.fetch_add(1, Ordering::Relaxed) % nodes.len()].clone(),
        };
        let uid = cni::new_pod_uid()?;
        let pod = self
            .cluster
            .add_pod(node.index, &format!("{}-{}", spec.namespace, spec.name))?;
        let placed = Placed {
            node: node.name.clone(),
            ips: pod_ips(&pod),
            netns: pod.netns.path.display().to_string(),
            uid: uid.clone(),
            new: true,
        };
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).insert(
            key,
            ScheduledPod {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                file: file.to_string(),
                pod,
                node_name: node.name,
                uid,
                sandbox: None,
                procs: Vec::new(),
                owner,
                seq,
            },
        );
        Ok(placed)
    }

    /// Runs the CNI chain and then the containers of each sandboxed pod, once the caller has
    /// written them where the cluster reads them. Returns the pods that failed (each already
    /// gone: no process, no netns) with why.
    pub(crate) fn run_pods(
        &self,
        file: &str,
        pods: &[render::PodDoc],
    ) -> Vec<(String, anyhow::Error)> {
        let mut failed = Vec::new();
        for spec in pods {
            let key = format!("{}/{}", spec.namespace, spec.name);
            if let Err(e) = self.run_pod(&key, spec) {
                failed.push((key.clone(), e.context(format!("{file}: pod {key}"))));
            }
        }
        failed
    }

    fn run_pod(&self, key: &str, spec: &render::PodDoc) -> anyhow::Result<()> {
        let (pod, node_name, mut uid) = {
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            let p = pods.get(key).context("no sandbox")?;
            (p.pod.clone(), p.node_name.clone(), p.uid.clone())
        };
        // A kubelet runs the pod the API holds: its UID is the API server's, which the CNI
        // chain is given (and a Kube-view agent checks).
        if let Some(api) = self.api() {
            let held = api
                .get("v1", "Pod", Some(&spec.namespace), &spec.name)
                .with_context(|| format!("pod {key} is not in the API"))?;
            if let Some(api_uid) = held["metadata"]["uid"].as_str() {
                uid = api_uid.to_string();
                if let Some(p) = self
                    .pods
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(key)
                {
                    p.uid = uid.clone();
                }
            }
        }
        let node = self.cni.get(pod.node).context("pod on an unknown node")?;
        let sandbox = cni::Sandbox {
            container_id: cni::new_container_id()?,
            netns: pod.netns.path.clone(),
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            uid,
        };
        let primary = cni::primary_result(&pod, &pod.netns.path);
        let added = node
            .load()
            .and_then(|conf| cni::run_chained(node, &conf, Op::Add, &sandbox, primary.clone()));
        let result = match added {
            Ok(r) => r,
            Err(e) => {
                // As a runtime does after a failed ADD: DEL (plugins undo what they did), then
                // the sandbox goes.
                self.discard(key, Some((sandbox, primary)));
                return Err(anyhow::Error::new(e).context("creating its sandbox (CNI ADD)"));
            }
        };
        let uid = sandbox.uid.clone();
        if let Some(p) = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(key)
        {
            p.sandbox = Some((sandbox, result));
        }
        let ips = pod_ips(&pod);
        let mut procs = Vec::new();
        for (i, argv) in spec.containers.iter().enumerate() {
            let mut cmd = match argv[0].as_str() {
                "mesh-echo" => Command::new(&self.bins.echo),
                WAYPOINT_COMMAND => match self.waypoint_command(spec, &node_name) {
                    Ok(cmd) => cmd,
                    Err(e) => {
                        // One broken waypoint pod must not fail the file it came with.
                        tracing::error!("pod {key}: not starting its waypoint: {e:#}");
                        crate::controller::log(
                            self,
                            &format!("pod {key}: not starting its waypoint: {e:#}"),
                        );
                        continue;
                    }
                },
                other => Command::new(other),
            };
            cmd.args(&argv[1..])
                .env("POD_NAME", &spec.name)
                .env("POD_NAMESPACE", &spec.namespace)
                .env("POD_IP", &ips[0]);
            let label = format!("{}-{}-{i}", spec.namespace, spec.name);
            // In the pod's cgroup, named by its UID, as a kubelet's containers are: what finds
            // a running pod in host /proc (the mesh-cni agent) finds this one.
            match self
                .cluster
                .spawn_in_pod_cgroup(&pod.netns, &uid, cmd, &label)
            {
                Ok(p) => procs.push(p),
                Err(e) => {
                    for p in procs.iter_mut() {
                        p.kill();
                    }
                    let taken = self
                        .pods
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(key);
                    if let Some(p) = taken
                        && let Err(e) = self.stop_pod(p)
                    {
                        tracing::warn!("{e:#}");
                    }
                    return Err(anyhow::Error::new(e).context(format!("starting {:?}", argv[0])));
                }
            }
        }
        if let Some(p) = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(key)
        {
            p.procs = procs;
        }
        Ok(())
    }

    /// Removes a pod that never ran (or whose chain failed): chain DEL with `sandbox` when
    /// given, then its netns. Nothing is left of it.
    pub(crate) fn discard(&self, key: &str, sandbox: Option<(cni::Sandbox, serde_json::Value)>) {
        let taken = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if let Some(mut p) = taken {
            p.sandbox = sandbox.or(p.sandbox);
            if let Err(e) = self.stop_pod(p) {
                tracing::warn!("{e:#}");
            }
        }
    }

    /// Stops a pod: its containers, then the chain's DEL (a failing plugin is logged: a
    /// teardown does not stop half-way), then its sandbox.
    pub(crate) fn stop_pod(&self, mut p: ScheduledPod) -> anyhow::Result<()> {
        for proc in p.procs.iter_mut() {
            proc.kill();
        }
        if let Some((sandbox, result)) = p.sandbox.take()
            && let Some(node) = self.cni.get(p.pod.node)
        {
            let deleted = node
                .load()
                .and_then(|conf| cni::run_chained(node, &conf, Op::Del, &sandbox, result));
            if let Err(e) = deleted {
                tracing::warn!(
                    "pod {}/{}: CNI DEL: {e} (removing the sandbox anyway)",
                    p.namespace,
                    p.name
                );
            }
        }
        Ok(self.cluster.remove_pod(&p.pod.name)?)
    }

    /// The waypoint binary with what it needs to reach meshd as its service account.
    fn waypoint_command(&self, spec: &render::PodDoc, node: &str) -> anyhow::Result<Command> {
        anyhow::ensure!(
            self.bins.waypoint.exists(),
            "{} is missing: run `cargo build -p waypoint`",
            self.bins.waypoint.display()
        );
        let token = self.workload_token(&spec.namespace, &spec.service_account)?;
        let mut cmd = Command::new(&self.bins.waypoint);
        if self.opts.meshd_tls {
            cmd.env("MESHD_ADDRESS", MESHD_TLS_ADDR)
                .env("MESHD_CA", self.mesh_root());
        } else {
            cmd.env("MESHD_ADDRESS", format!("unix:{}", self.socket.display()));
        }
        cmd.env("MESH_TOKEN_FILE", token)
            .env("NODE_NAME", node)
            .env("RUST_LOG", &self.opts.log);
        for (k, v) in self
            .waypoint_env
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            cmd.env(k, v);
        }
        Ok(cmd)
    }

    /// A service-account token from `meshd workload-token`, in a root-only file.
    fn workload_token(&self, namespace: &str, sa: &str) -> anyhow::Result<PathBuf> {
        if let Some(api) = &self.api {
            return api.workload_token(self.dir(), namespace, sa);
        }
        let out = Command::new(&self.bins.meshd)
            .args([
                "workload-token",
                "--namespace",
                namespace,
                "--service-account",
                sa,
                "--state-dir",
            ])
            .arg(&self.state_dir)
            .output()
            .context("running meshd workload-token")?;
        if !out.status.success() {
            bail!(
                "meshd workload-token --namespace {namespace} --service-account {sa} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let path = self.dir().join(format!("sa.{namespace}.{sa}.token"));
        write_private(&path, &out.stdout)?;
        Ok(path)
    }
}
