//! The cluster meshctl's tests run against: the API server double (testbed::kubeapi) with
//! nodes, meshctl as the real binary with the double's kubeconfig, and what the double does not
//! do itself — kubelets and controllers. A test plays those: it creates the pods a DaemonSet or
//! Deployment would run and writes the status their controllers would write, with the field
//! names and counting rules of the real API (`kubelet_ready`).

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testbed::kubeapi::{ApiOptions, ApiServer};

pub const NS: &str = "mesh-system";

pub struct Env {
    pub api: ApiServer,
    pub nodes: Vec<String>,
}

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Env {
    /// The double with `nodes` (name, kernel release).
    pub fn start(nodes: &[(&str, &str)]) -> Env {
        let api = ApiServer::start(ApiOptions::default()).unwrap();
        for (name, kernel) in nodes {
            api.create(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name},
                "status": {"nodeInfo": {"kernelVersion": kernel}},
            }))
            .unwrap();
        }
        Env {
            api,
            nodes: nodes.iter().map(|(n, _)| n.to_string()).collect(),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_meshctl"));
        c.env_remove("MESH_CONFIG_DIR")
            .env_remove("MESH_STATUS_DIR")
            .env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(self.api.kubeconfig())
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap())
    }

    /// meshctl running in the background (stdout and stderr piped).
    pub fn spawn(&self, args: &[&str]) -> Background {
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Background(Some(child))
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        self.api.get(api_version, kind, ns, name)
    }

    /// Plays the kubelets and controllers of the mesh's namespace: every Deployment gets its
    /// replicas as ready pods, every DaemonSet a ready pod on each node, and both the status
    /// their controllers write (observedGeneration, updated/ready/available counts).
    pub fn kubelet_ready(&self) {
        for d in self.list_in("apps/v1", "Deployment", NS) {
            let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
            for i in 0..replicas {
                let node = &self.nodes[i as usize % self.nodes.len()];
                self.pod_for(&d, &format!("{}-{i}", name(&d)), node, Readiness::Ready);
            }
            let mut d = d;
            d["status"] = json!({
                "observedGeneration": d["metadata"]["generation"],
                "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": replicas, "availableReplicas": replicas,
            });
            self.api.put(d).unwrap();
        }
        for ds in self.list_in("apps/v1", "DaemonSet", NS) {
            for node in &self.nodes {
                self.pod_for(
                    &ds,
                    &format!("{}-{node}", name(&ds)),
                    node,
                    Readiness::Ready,
                );
            }
            self.daemonset_status(&ds, self.nodes.len() as i64);
        }
    }

    /// Writes a DaemonSet's status with `ready` of the nodes ready.
    pub fn daemonset_status(&self, ds: &Value, ready: i64) {
        let n = self.nodes.len() as i64;
        let mut ds = ds.clone();
        ds["status"] = json!({
            "observedGeneration": ds["metadata"]["generation"],
            "desiredNumberScheduled": n, "currentNumberScheduled": n,
            "updatedNumberScheduled": n, "numberReady": ready, "numberAvailable": ready,
            "numberMisscheduled": 0,
        });
        self.api.put(ds).unwrap();
    }

    /// A pod of `owner` (its selector's labels, an ownerReference: deleting the owner
    /// collects it) on `node`.
    pub fn pod_for(&self, owner: &Value, pod: &str, node: &str, state: Readiness) -> Value {
        let labels = owner["spec"]["selector"]["matchLabels"].clone();
        let (phase, conditions, containers) = match state {
            Readiness::Ready => (
                "Running",
                json!([{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]),
                json!([{"name": "main", "ready": true, "restartCount": 0, "state": {"running": {}}}]),
            ),
            Readiness::Unschedulable(msg) => (
                "Pending",
                json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg}]),
                json!([]),
            ),
            Readiness::Waiting(reason, msg) => (
                "Pending",
                json!([{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}]),
                json!([{"name": "main", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": reason, "message": msg}}}]),
            ),
        };
        let mut spec = json!({"containers": [{"name": "main", "image": "x"}]});
        if !matches!(state, Readiness::Unschedulable(_)) {
            spec["nodeName"] = json!(node);
        }
        let obj = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": pod, "namespace": NS, "labels": labels,
                "ownerReferences": [{
                    "apiVersion": owner["apiVersion"], "kind": owner["kind"],
                    "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
                }],
            },
            "spec": spec,
            "status": {"phase": phase, "conditions": conditions, "containerStatuses": containers},
        });
        self.api.put(obj).unwrap()
    }

    pub fn list_in(&self, api_version: &str, kind: &str, ns: &str) -> Vec<Value> {
        self.api
            .list(api_version, kind)
            .into_iter()
            .filter(|o| o["metadata"]["namespace"] == ns)
            .collect()
    }
}

#[derive(Clone, Copy)]
pub enum Readiness {
    Ready,
    Unschedulable(&'static str),
    Waiting(&'static str, &'static str),
}

pub fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

/// Waits for `cond` (polling), panicking with `what` after 30 s.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A meshctl process killed if the test fails before it is waited for.
pub struct Background(Option<Child>);

impl Background {
    pub fn wait(mut self) -> Run {
        let child = self.0.take().unwrap();
        Run::from(child.wait_with_output().unwrap())
    }

    pub fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A node's root filesystem as `meshctl check --host-root` reads it.
pub struct HostRoot {
    pub dir: tempfile::TempDir,
}

impl HostRoot {
    /// A node with kernel `release`, and BTF, cgroup2 and bpffs as asked.
    pub fn new(release: &str, btf: bool, cgroup2: bool, bpffs: bool) -> HostRoot {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "proc/sys/kernel/osrelease", &format!("{release}\n"));
        if btf {
            write(root, "sys/kernel/btf/vmlinux", "BTF");
        }
        let mut mounts = String::from(
            "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\nproc /proc proc rw 0 0\n",
        );
        if cgroup2 {
            mounts.push_str("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n");
        }
        if bpffs {
            mounts.push_str("bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0\n");
        }
        write(root, "proc/mounts", &mounts);
        HostRoot { dir }
    }

    pub fn path(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}
