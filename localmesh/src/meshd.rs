//! meshd's process in local mode: starting it (unix socket or TLS on node-0), stopping it,
//! its log, and the node tokens it issues. Must not touch ztunnels or pods.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use testbed::Netns;

use crate::{Bins, DEADLINE, Mesh, wait_for, write_private};

/// Where meshd listens when [`MeshOptions::meshd_tls`](crate::MeshOptions::meshd_tls) is set:
/// node-0's fabric address and istiod's TLS port.
pub const MESHD_TLS_ADDR: &str = "10.254.0.1:15012";

impl Mesh {
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

    pub(crate) fn node_token(&self, node: &str) -> anyhow::Result<PathBuf> {
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

    pub fn meshd_log(&self) -> String {
        let m = self.meshd.lock().unwrap_or_else(|p| p.into_inner());
        m.as_ref()
            .and_then(|p| std::fs::read_to_string(p.log_path()).ok())
            .unwrap_or_default()
    }
}

/// Whether this meshd writes what it renders (`meshd run --write-dir`); the flag is newer
/// than local mode's other uses of meshd.
pub(crate) fn meshd_has_write_dir(bins: &Bins) -> bool {
    Command::new(&bins.meshd)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("--write-dir"))
}
