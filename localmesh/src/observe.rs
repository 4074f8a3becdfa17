//! What tests and tools observe of a running mesh: a pod's netns and commands in it,
//! listeners, ztunnels' config dumps, and waits on enrollment. Read-only: must not change
//! processes or manifests.

use std::process::Output;

use anyhow::Context;

use crate::{DEADLINE, Mesh, wait_for};

impl Mesh {
    /// The testbed pod behind `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> anyhow::Result<testbed::Pod> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&format!("{namespace}/{name}"))
            .map(|p| p.pod.clone())
            .with_context(|| format!("no pod {namespace}/{name}"))
    }

    /// The pids of a pod's running containers, in the order its spec lists them (empty until
    /// its network is set up; the bench reads their counters).
    pub fn container_pids(&self, namespace: &str, name: &str) -> anyhow::Result<Vec<u32>> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&format!("{namespace}/{name}"))
            .map(|p| p.procs.iter().map(|c| c.pid()).collect())
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
