//! Each node's half of enrollment in local mode, set up as the mesh-cni DaemonSet sets up a
//! Kubernetes node: `mesh-cni install` chains our plugin into the node's conflist, and
//! `mesh-cni agent` runs in the node's network namespace, reading the config directory (the
//! same YAML meshd reads; `--view directory`) or, in API mode with [`MeshOptions::api_cni`],
//! the API double (`--view kube`), and serving ZDS to the node's ztunnel.
//! Owns the agent processes and the install step; the chain's execution is `cni`'s, ztunnel's
//! process is lib.rs's.

use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::api_mode::MESH_NAMESPACE;
use crate::cni::NodeCni;
use crate::{Bins, DEADLINE, Enrollment, Mesh, MeshOptions, wait_for};

/// `mesh-cni install` runs, one per node, started before meshd so they overlap its start.
pub(crate) struct Installs(Vec<(String, Child)>);

/// Starts `mesh-cni install --once` for every node (nothing in [`Enrollment::Config`]).
pub(crate) fn start_installs(
    bins: &Bins,
    opts: &MeshOptions,
    nodes: &[NodeCni],
) -> anyhow::Result<Installs> {
    if opts.enrollment != Enrollment::Cni {
        return Ok(Installs(Vec::new()));
    }
    if !bins.cni.exists() {
        bail!(
            "{} is missing: run `cargo build --bins` (or set MESH_ENROLLMENT=config)",
            bins.cni.display()
        );
    }
    let mut out = Vec::new();
    for n in nodes {
        let child = Command::new(&bins.cni)
            .arg("install")
            .arg("--once")
            .arg("--cni-bin-dir")
            .arg(&n.bin_dir)
            .arg("--cni-conf-dir")
            .arg(&n.conf_dir)
            .arg("--agent-socket")
            .arg(n.plugin_socket())
            .args(["--exclude-namespaces", MESH_NAMESPACE])
            .env("RUST_LOG", &opts.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {} install", bins.cni.display()))?;
        out.push((n.node.clone(), child));
    }
    Ok(Installs(out))
}

impl Installs {
    /// Waits for every install; the first failure names its node and says why.
    fn finish(self) -> anyhow::Result<()> {
        for (node, child) in self.0 {
            let out = child
                .wait_with_output()
                .with_context(|| format!("waiting for mesh-cni install on {node}"))?;
            if !out.status.success() {
                bail!(
                    "mesh-cni install on {node} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }
}

impl Mesh {
    /// Starts every node's agent, then waits for the installs and for the agents to listen.
    pub(crate) fn start_node_cni(&self, installs: Installs) -> anyhow::Result<()> {
        if self.opts.enrollment != Enrollment::Cni {
            return Ok(());
        }
        for i in 0..self.cni.len() {
            let proc = self.spawn_agent(i)?;
            self.agents.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(proc);
        }
        installs.finish()?;
        for i in 0..self.cni.len() {
            self.wait_agent_listening(i)?;
        }
        Ok(())
    }

    /// Starts node `i`'s agent (again) and waits until it serves the plugin and ZDS sockets.
    pub fn start_agent(&self, i: usize) -> anyhow::Result<()> {
        let proc = self.spawn_agent(i)?;
        self.agents.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(proc);
        self.wait_agent_listening(i)
    }

    fn spawn_agent(&self, i: usize) -> anyhow::Result<testbed::Proc> {
        let node = self
            .cluster
            .nodes()
            .get(i)
            .cloned()
            .context("no such node")?;
        let n = self.cni.get(i).context("no such node")?;
        // A socket left by a killed agent would pass for a listening one.
        for s in [n.plugin_socket(), n.zds_socket.clone()] {
            let _ = std::fs::remove_file(s);
        }
        let mut cmd = Command::new(&self.bins.cni);
        cmd.arg("agent").arg("--node").arg(&node.name);
        match &self.api {
            // As the DaemonSet runs it: the Kube view, as its own pod.
            Some(api) => {
                let (pod, kubeconfig) = api.agent_credentials(&node.name)?;
                cmd.args(["--view", "kube", "--kubeconfig"])
                    .arg(kubeconfig)
                    .args(["--mesh-namespace", MESH_NAMESPACE, "--pod-name", &pod]);
            }
            None => {
                cmd.args(["--view", "directory", "--config-dir"])
                    .arg(&self.config_dir);
            }
        }
        cmd.arg("--plugin-socket")
            .arg(n.plugin_socket())
            .arg("--zds-socket")
            .arg(&n.zds_socket)
            .arg("--state-dir")
            .arg(&n.agent_dir)
            .arg("--cni-conf-dir")
            .arg(&n.conf_dir)
            .args(["--exclude-namespaces", MESH_NAMESPACE])
            .env("RUST_LOG", &self.opts.log);
        if !self.opts.probe_snat {
            cmd.arg("--no-probe-snat");
        }
        Ok(self
            .cluster
            .spawn(&node.netns, cmd, &format!("mesh-cni-{}", node.name))?)
    }

    fn wait_agent_listening(&self, i: usize) -> anyhow::Result<()> {
        let n = self.cni.get(i).context("no such node")?;
        wait_for(
            DEADLINE,
            &format!("the mesh-cni agent on {}", n.node),
            || {
                if let Some(p) = self
                    .agents
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(i)
                    .and_then(Option::as_mut)
                    && let Ok(Some(status)) = p.try_wait()
                {
                    bail!("it exited ({status}); see {}", p.log_path().display());
                }
                Ok(n.zds_socket.exists() && UnixStream::connect(n.plugin_socket()).is_ok())
            },
        )
    }

    /// Stops node `i`'s agent: SIGTERM (it keeps its pods enrolled: ztunnel holds them) or
    /// SIGKILL.
    pub fn stop_agent(&self, i: usize, graceful: bool) {
        let p = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(i)
            .and_then(Option::take);
        if let Some(mut p) = p {
            if graceful {
                p.terminate(Duration::from_secs(10));
            } else {
                p.kill();
            }
        }
    }

    /// The files of node `i`'s CNI config dir (`/etc/cni/net.d`), sorted.
    pub fn cni_conf_files(&self, i: usize) -> Vec<std::path::PathBuf> {
        let Some(n) = self.cni.get(i) else {
            return Vec::new();
        };
        let mut files: Vec<_> = std::fs::read_dir(&n.conf_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    }

    /// Log of node `i`'s agent (all its runs: one file per node).
    pub fn agent_log(&self, i: usize) -> String {
        let Some(node) = self.cluster.nodes().get(i).cloned() else {
            return String::new();
        };
        std::fs::read_to_string(self.dir().join(format!("mesh-cni-{}.log", node.name)))
            .unwrap_or_default()
    }

    /// [`Enrollment::Cni`]: waits until node `i`'s current ztunnel is connected to its agent
    /// and has processed the agent's snapshot (pods can be added from then on).
    pub fn wait_ztunnel_connected(&self, i: usize) -> anyhow::Result<()> {
        self.wait_connected_on(i, self.admin_port(i))
    }

    pub(crate) fn wait_connected_on(&self, i: usize, admin_port: u16) -> anyhow::Result<()> {
        if self.opts.enrollment != Enrollment::Cni {
            return Ok(());
        }
        wait_for(
            DEADLINE,
            &format!("node-{i}'s ztunnel to connect to its mesh-cni agent"),
            || {
                let dump = self.config_dump_on(i, admin_port)?;
                let e = &dump["enrollment"];
                Ok(e["connected"] == true && e["snapshotProcessed"] == true)
            },
        )
        // What the ztunnel said is usually the reason (it could not load capture, or crashed).
        .with_context(|| log_tail(&self.ztunnel_log(i), 30))
    }
}

/// The last `lines` lines of a log, headed for an error's context.
fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    format!("the ztunnel's log ends:\n{}", tail.join("\n"))
}
