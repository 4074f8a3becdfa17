//! The local controller-manager: turns each Deployment into pods (scale, rolling update,
//! removal) run by the local kubelet (`kubelet`), decides when a new pod is ready, and writes
//! an applied file back with its Deployments' pods for meshd.
//!
//! Readiness, as a cluster would see it: the containers listen on their declared
//! `containerPort`s, their HTTP readiness probes pass, and, if meshd says the pod is captured,
//! its node's ztunnel has enrolled it.
//! Until then the pod is in the config only with its Istio labels (so ztunnel enrolls it) and
//! not selected by any Service (Kubernetes leaves unready pods out of endpoints; meshd has no
//! readiness of its own). A pod that goes is first taken out of the config, then stopped once
//! every ztunnel has forgotten it and its connections have drained (no ztunnel has one routed
//! to it, none is open on its app's ports).
//! Owns the pod table's Deployment side and the written file; sandboxes and processes are the
//! kubelet's, the file's other documents `apply`'s (lib.rs).

use std::collections::BTreeSet;
use std::io::Read;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::deployments::{self, Deployment};
use crate::{Mesh, ScheduledPod, pod_ips, render, write_atomically};

/// How long a new pod may take to become ready before its rollout stalls.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long a leaving pod's connections may take to finish (Kubernetes' grace period is 30 s;
/// ours is short because nothing here needs longer).
const GRACE: Duration = Duration::from_secs(5);
/// How long the ztunnels may take to forget a leaving pod.
const FORGET_DEADLINE: Duration = Duration::from_secs(10);
/// The program name that means "the waypoint binary" in a container's command.
pub const WAYPOINT_COMMAND: &str = "mesh-waypoint";

/// What a Deployment's pod carries besides its process.
#[derive(Clone, Debug)]
pub struct Owned {
    /// "ns/name" of the Deployment.
    pub deployment: String,
    pub hash: String,
    /// The Pod document (from the template), without status.
    pub doc: Value,
    pub ready: bool,
    /// Ready and known to every ztunnel as such (or given up waiting for that).
    pub serving: bool,
}

impl Mesh {
    /// Validates every Deployment of a file before anything changes.
    pub(crate) fn validate_deployments(
        &self,
        file: &str,
        docs: &[Value],
    ) -> anyhow::Result<Vec<Deployment>> {
        let mut out: Vec<Deployment> = Vec::new();
        for (i, doc) in docs.iter().enumerate() {
            if render::kind(doc) != "Deployment" {
                continue;
            }
            let d = deployments::parse(file, i, doc)?;
            if out.iter().any(|o| o.key() == d.key()) {
                bail!(
                    "{file}: document {i}: Deployment {} is declared twice",
                    d.key()
                );
            }
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(other) = pods.values().find(|p| {
                p.file != file && p.owner.as_ref().is_some_and(|o| o.deployment == d.key())
            }) {
                bail!(
                    "{file}: document {i}: Deployment {} is already applied from {}",
                    d.key(),
                    other.file
                );
            }
            out.push(d);
        }
        Ok(out)
    }

    /// Writes the file, then brings each Deployment to its spec. Pods of Deployments the file
    /// no longer declares go first.
    pub(crate) fn reconcile_deployments(
        &self,
        file: &str,
        wanted: &[Deployment],
    ) -> anyhow::Result<()> {
        let keys: Vec<String> = wanted.iter().map(Deployment::key).collect();
        let orphans = self.take_pods(|p| {
            p.file == file
                && p.owner
                    .as_ref()
                    .is_some_and(|o| !keys.contains(&o.deployment))
        });
        self.write_file(file)?;
        self.retire(orphans);
        let mut first_err = None;
        for d in wanted {
            if let Err(e) = self.reconcile(file, d) {
                first_err.get_or_insert(e.context(format!("{file}: Deployment {}", d.key())));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// One Deployment to `replicas` ready pods of its current template: Kubernetes' defaults
    /// (maxSurge 25% rounded up, maxUnavailable 25% rounded down, so 0 below 4 replicas).
    fn reconcile(&self, file: &str, d: &Deployment) -> anyhow::Result<()> {
        let unready = self.owned(&d.key(), |o| o.hash == d.hash && !o.ready);
        self.make_ready(file, &unready)?;
        let surge = d.replicas.div_ceil(4).max(1);
        let unavailable = d.replicas / 4;
        loop {
            let current = self.owned(&d.key(), |o| o.hash == d.hash);
            let old = self.owned(&d.key(), |o| o.hash != d.hash);
            if current.len() > d.replicas {
                // Newest first, as a scale-down does.
                let extra = current[d.replicas..].to_vec();
                let leaving = self.take_pods(|p| extra.contains(&key(p)));
                self.write_file(file)?;
                self.retire(leaving);
                continue;
            }
            if old.is_empty() {
                if current.len() < d.replicas {
                    self.start_pods(file, d, d.replicas - current.len())?;
                }
                return Ok(());
            }
            let add = (d.replicas - current.len()).min(surge);
            if add > 0 {
                self.start_pods(file, d, add)?;
            }
            // Keep at least replicas - maxUnavailable pods ready while the old ones go.
            let ready = current.len() + add + old.len();
            let go = ready.saturating_sub(d.replicas.saturating_sub(unavailable));
            let go = go.min(old.len()).max(usize::from(add == 0));
            let leaving_keys: Vec<String> = old.iter().rev().take(go).cloned().collect();
            let leaving = self.take_pods(|p| leaving_keys.contains(&key(p)));
            self.write_file(file)?;
            self.retire(leaving);
        }
    }

    /// Keys of Deployment `deployment`'s pods matching `f`, oldest first.
    fn owned(&self, deployment: &str, f: impl Fn(&Owned) -> bool) -> Vec<String> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(u64, String)> = pods
            .values()
            .filter(|p| {
                p.owner
                    .as_ref()
                    .is_some_and(|o| o.deployment == deployment && f(o))
            })
            .map(|p| (p.seq, key(p)))
            .collect();
        v.sort();
        v.into_iter().map(|(_, k)| k).collect()
    }

    /// Starts `n` new pods of `d` and waits until they are ready: sandboxes first, then the
    /// file with them (unready), then each pod's CNI chain and containers. A pod whose chain
    /// fails is gone again and the rollout stops with its error.
    fn start_pods(&self, file: &str, d: &Deployment, n: usize) -> anyhow::Result<()> {
        let mut specs = Vec::new();
        for _ in 0..n {
            let sandboxed = self.new_pod_name(d).and_then(|name| {
                let doc = d.pod_doc(&name);
                let spec = render::pod_doc(&doc)?;
                let owner = Owned {
                    deployment: d.key(),
                    hash: d.hash.clone(),
                    doc,
                    ready: false,
                    serving: false,
                };
                self.create_sandbox(file, &spec, Some(owner))?;
                Ok(spec)
            });
            match sandboxed {
                Ok(spec) => specs.push(spec),
                Err(e) => {
                    for s in &specs {
                        self.discard(&format!("{}/{}", s.namespace, s.name), None);
                    }
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.write_file(file) {
            for s in &specs {
                self.discard(&format!("{}/{}", s.namespace, s.name), None);
            }
            return Err(e);
        }
        let failed = self.run_pods(file, &specs);
        let started: Vec<String> = specs
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .filter(|k| !failed.iter().any(|(f, _)| f == k))
            .collect();
        if let Some((_, e)) = failed.into_iter().next() {
            // The failed pods left the table: the file goes without them.
            self.write_file(file)?;
            return Err(e);
        }
        self.make_ready(file, &started)
    }

    fn new_pod_name(&self, d: &Deployment) -> anyhow::Result<String> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..100 {
            let mut random = [0u8; 5];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut random))
                .context("reading /dev/urandom")?;
            let name = format!("{}-{}-{}", d.name, d.hash, deployments::name_suffix(random));
            if !pods.contains_key(&format!("{}/{name}", d.namespace)) {
                return Ok(name);
            }
        }
        bail!("no free pod name for Deployment {}", d.key())
    }

    /// Waits for the pods' containers to listen, puts them in the config unready (so ztunnel
    /// can enroll them), waits for enrollment where meshd says they are captured, then marks
    /// them ready (Service selectors see them from now on).
    fn make_ready(&self, file: &str, keys: &[String]) -> anyhow::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let listening = self.wait_until(
            READY_DEADLINE,
            &format!(
                "{} to listen and pass their readiness probes",
                keys.join(", ")
            ),
            || {
                for k in keys {
                    if !self.containers_ready(k)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        );
        self.write_file(file)?;
        listening?;
        self.wait_until(
            READY_DEADLINE,
            &format!("{} to be enrolled by ztunnel", keys.join(", ")),
            || {
                for k in keys {
                    if !self.enrolled_or_uncaptured(k)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        {
            let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            for k in keys {
                if let Some(o) = pods.get_mut(k).and_then(|p| p.owner.as_mut()) {
                    o.ready = true;
                }
            }
        }
        self.write_file(file)?;
        // Return once clients can be sent to them, as a user of `apply` expects.
        let shown = self.wait_until(FORGET_DEADLINE, "the ztunnels to learn ready pods", || {
            for i in 0..self.cluster.nodes().len() {
                let Ok(dump) = self.config_dump(i) else {
                    continue;
                };
                for k in keys {
                    let labels = self
                        .pods
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(k)
                        .and_then(|p| p.owner.as_ref())
                        .map(|o| o.doc["metadata"]["labels"].clone());
                    let listed = dump["workloads"]
                        .as_array()
                        .and_then(|ws| ws.iter().find(|w| w["uid"] == k.as_str()));
                    if listed.map(|w| &w["labels"]) != labels.as_ref() {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        });
        if let Err(e) = shown {
            tracing::warn!("{e:#}");
        }
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            if let Some(o) = pods.get_mut(k).and_then(|p| p.owner.as_mut()) {
                o.serving = true;
            }
        }
        Ok(())
    }

    /// The kubelet's view: every declared container port listens and every HTTP readiness
    /// probe answers 2xx/3xx (from inside the pod, to its IP).
    fn containers_ready(&self, key: &str) -> anyhow::Result<bool> {
        let (ns, name) = split(key);
        let spec = {
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            pods.get(key)
                .and_then(|p| p.owner.as_ref())
                .map(|o| o.doc["spec"].clone())
                .unwrap_or_default()
        };
        for port in deployments::container_ports(&spec) {
            if !self.listening(ns, name, port)? {
                return Ok(false);
            }
        }
        let pod = self.pod(ns, name)?;
        for (port, path) in deployments::http_probes(&spec) {
            let url = format!("http://{}:{port}{path}", pod.ip4);
            let out = self.cluster.run(
                &pod.netns,
                &["curl", "-sf", "-o", "/dev/null", "--max-time", "2", &url],
            )?;
            if !out.status.success() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the pod's node's ztunnel has the pod as a workload and, if meshd says it is
    /// captured, has enrolled it.
    fn enrolled_or_uncaptured(&self, key: &str) -> anyhow::Result<bool> {
        let (ns, name) = split(key);
        let node = self.pod(ns, name)?.node;
        let dump = self.config_dump(node)?;
        let workload = dump["workloads"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["uid"] == key));
        match workload.map(|w| w["captured"].as_bool()) {
            None => Ok(false),
            Some(Some(false)) => Ok(true),
            Some(_) => {
                Ok(self.captured(ns, name)? && self.listening(ns, name, meshcore::HBONE_PORT)?)
            }
        }
    }

    /// Removes from the pod table (so the next write leaves them out) the pods matching `f`.
    pub(crate) fn take_pods(&self, f: impl Fn(&ScheduledPod) -> bool) -> Vec<ScheduledPod> {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<String> = pods.values().filter(|p| f(p)).map(key).collect();
        keys.iter().filter_map(|k| pods.remove(k)).collect()
    }

    /// Stops pods already left out of the config: once no ztunnel lists them and their
    /// connections have finished (each bounded), so no client is sent to a pod that is gone.
    pub(crate) fn retire(&self, pods: Vec<ScheduledPod>) {
        if pods.is_empty() {
            return;
        }
        let keys: BTreeSet<String> = pods.iter().map(key).collect();
        let forgotten = self.wait_until(
            FORGET_DEADLINE,
            "the ztunnels to forget leaving pods",
            || {
                for i in 0..self.cluster.nodes().len() {
                    // A ztunnel that does not answer has not shown it forgot them (until the
                    // deadline, when they are stopped anyway).
                    let Ok(dump) = self.config_dump(i) else {
                        return Ok(false);
                    };
                    let listed = dump["workloads"].as_array().is_some_and(|ws| {
                        ws.iter()
                            .any(|w| w["uid"].as_str().is_some_and(|u| keys.contains(u)))
                    });
                    if listed {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        );
        if let Err(e) = forgotten {
            tracing::warn!("stopping pods anyway: {e:#}");
        }
        let drained = self.wait_until(GRACE, "leaving pods' connections to finish", || {
            // A connection routed to a leaving pod just before its ztunnel forgot it may still
            // be on its way (its stream opening, the app not yet dialled): every ztunnel counts
            // those until they end.
            for i in 0..self.cluster.nodes().len() {
                let Ok(dump) = self.config_dump(i) else {
                    return Ok(false);
                };
                let routed = dump["routed"]
                    .as_object()
                    .is_some_and(|r| r.keys().any(|uid| keys.contains(uid)));
                if routed {
                    return Ok(false);
                }
            }
            for p in &pods {
                let ports = p
                    .owner
                    .as_ref()
                    .map(|o| deployments::container_ports(&o.doc["spec"]))
                    .unwrap_or_default();
                if established_on(self, &p.pod, &ports)? {
                    return Ok(false);
                }
            }
            Ok(true)
        });
        if let Err(e) = drained {
            tracing::info!("stopping pods with connections open: {e:#}");
        }
        for p in pods {
            if let Err(e) = self.stop_pod(p) {
                tracing::warn!("{e:#}");
            }
        }
    }

    /// Writes `file` for meshd: its rendered documents, then its Deployments' pods (oldest
    /// first), unready ones without the labels Services select on.
    pub(crate) fn write_file(&self, file: &str) -> anyhow::Result<()> {
        let mut docs = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(file)
            .cloned()
            .unwrap_or_default();
        {
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            let mut owned: Vec<&ScheduledPod> = pods
                .values()
                .filter(|p| p.file == file && p.owner.is_some())
                .collect();
            owned.sort_by_key(|p| p.seq);
            for p in owned {
                let Some(o) = &p.owner else { continue };
                let mut doc = o.doc.clone();
                if !o.ready
                    && let Some(labels) = doc.pointer_mut("/metadata/labels")
                {
                    let kept = labels
                        .as_object()
                        .map(deployments::unready_labels)
                        .unwrap_or_default();
                    *labels = Value::Object(kept);
                }
                render::set_pod_status(
                    &mut doc,
                    &p.node_name,
                    &pod_ips(&p.pod),
                    &p.pod.netns.path.display().to_string(),
                );
                render::set_pod_uid(&mut doc, &p.uid);
                if let Some(status) = doc.get_mut("status").and_then(Value::as_object_mut) {
                    let ready = if o.ready { "True" } else { "False" };
                    status.insert(
                        "conditions".into(),
                        json!([{"type": "Ready", "status": ready}]),
                    );
                }
                docs.push(doc);
            }
        }
        if let Some(api) = &self.api {
            // API mode: the API is meshd's source; config/<file> stays as a record of it.
            api.sync_file(file, &mut docs)?;
        }
        let out = render::to_yaml(&docs).with_context(|| file.to_string())?;
        write_atomically(&self.config_dir.join(file), &out)
    }

    /// Names of Deployment `namespace/deployment`'s pods (ready or not), oldest first.
    pub fn pods_of(&self, namespace: &str, deployment: &str) -> Vec<String> {
        self.owned(&format!("{namespace}/{deployment}"), |_| true)
            .iter()
            .map(|k| split(k).1.to_string())
            .collect()
    }

    /// Waits until Deployment `namespace/deployment` has exactly `n` pods, all ready and known
    /// as such to every ztunnel; returns their names.
    pub fn wait_for_pods(
        &self,
        namespace: &str,
        deployment: &str,
        n: usize,
    ) -> anyhow::Result<Vec<String>> {
        let key = format!("{namespace}/{deployment}");
        crate::wait_for(
            READY_DEADLINE + FORGET_DEADLINE,
            &format!("{n} ready pods of Deployment {key}"),
            || {
                Ok(self.owned(&key, |_| true).len() == n
                    && self.owned(&key, |o| o.serving).len() == n)
            },
        )?;
        Ok(self.pods_of(namespace, deployment))
    }

    /// `wait_for` that gives up at once when the mesh is being torn down.
    fn wait_until(
        &self,
        deadline: Duration,
        what: &str,
        mut cond: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        crate::wait_for(deadline, what, || {
            if self.stopping.load(Ordering::Relaxed) {
                return Ok(true);
            }
            cond()
        })?;
        if self.stopping.load(Ordering::Relaxed) {
            bail!("local mesh stopping while waiting for {what}");
        }
        Ok(())
    }
}

/// Whether any TCP connection to one of `ports` is established inside the pod.
fn established_on(mesh: &Mesh, pod: &testbed::Pod, ports: &[u16]) -> anyhow::Result<bool> {
    if ports.is_empty() {
        return Ok(false);
    }
    let out = mesh
        .cluster
        .run(&pod.netns, &["ss", "-Htn", "state", "established"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().any(|l| {
        // Columns: Recv-Q Send-Q Local:Port Peer:Port
        l.split_whitespace()
            .nth(2)
            .and_then(|local| local.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_some_and(|p| ports.contains(&p))
    }))
}

fn key(p: &ScheduledPod) -> String {
    format!("{}/{}", p.namespace, p.name)
}

fn split(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("default", key))
}
