//! Each node's ztunnel process: spawning it with local mode's flags, starting one beside a
//! running one (rolling update), stopping it, its log and admin port; and the sweep of eBPF
//! state orphaned by killed runs. Must not touch meshd or pods.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use testbed::Proc;

use crate::{Bins, Enrollment, MESHD_TLS_ADDR, Mesh};

/// A ztunnel's (admin, metrics, readiness) ports.
pub type AdminPorts = (u16, u16, u16);
/// Istio's: 127.0.0.1:15000, 15020, 15021.
pub const ISTIO_ADMIN_PORTS: AdminPorts = (15000, 15020, 15021);
/// Those of a ztunnel started beside a running one ([`Mesh::start_ztunnel_beside`]).
pub const BESIDE_ADMIN_PORTS: AdminPorts = (15100, 15120, 15121);

impl Mesh {
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

    pub(crate) fn spawn_ztunnel(&self, i: usize, ports: AdminPorts) -> anyhow::Result<Proc> {
        let node = self
            .cluster
            .nodes()
            .get(i)
            .cloned()
            .context("no such node")?;
        let token = self.node_token(&node.name)?;
        let bin = self.opts.ztunnel_bin.as_ref().unwrap_or(&self.bins.ztunnel);
        let mut cmd = Command::new(bin);
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
        cmd.args(&self.opts.ztunnel_args)
            .envs(self.opts.ztunnel_env.iter().map(|(k, v)| (k, v)));
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
    pub(crate) fn admin_port(&self, i: usize) -> u16 {
        let z = self.ztunnels.lock().unwrap_or_else(|p| p.into_inner());
        z.get(i)
            .and_then(|z| z.as_ref().map(|(_, ports)| ports.0))
            .unwrap_or(ISTIO_ADMIN_PORTS.0)
    }

    /// The pid of node `i`'s current ztunnel, if one runs (the bench reads its counters).
    pub fn ztunnel_pid(&self, i: usize) -> Option<u32> {
        let z = self.ztunnels.lock().unwrap_or_else(|p| p.into_inner());
        z.get(i).and_then(|z| z.as_ref().map(|(p, _)| p.pid()))
    }

    /// Log of node `i`'s current ztunnel.
    pub fn ztunnel_log(&self, i: usize) -> String {
        let z = self.ztunnels.lock().unwrap_or_else(|p| p.into_inner());
        z.get(i)
            .and_then(|p| p.as_ref())
            .and_then(|(p, _)| std::fs::read_to_string(p.log_path()).ok())
            .unwrap_or_default()
    }
}

/// Removes the pinned eBPF state of ztunnels whose namespace is gone (a run that was killed
/// before it could clean up, whose namespaces `sweep_stale` just removed). Never touches a live
/// mesh's state, so it is safe next to other runs; a failure only leaves the orphans.
pub(crate) fn sweep_orphaned_ebpf(bins: &Bins) {
    // Without the lock the sweep still runs: it is safe next to live meshes.
    let _sweeping = orphan_sweep_lock()
        .inspect_err(|e| eprintln!("localmesh: {e:#}; sweeping without it"))
        .ok();
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

/// Taken by every orphan sweep of a starting mesh. A test that checks what
/// `ztunnel cleanup --orphans` itself removes holds it meanwhile, so that a mesh starting
/// beside it cannot sweep the orphan first. Released when the file is dropped.
pub fn orphan_sweep_lock() -> anyhow::Result<std::fs::File> {
    let path = std::env::temp_dir().join("localmesh-orphan-sweep.lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}
