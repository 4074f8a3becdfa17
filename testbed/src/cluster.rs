//! Owns the cluster: node namespaces joined by a bridged fabric namespace, pod namespaces
//! wired to their node with a veth and routes (IPv4 and optionally IPv6), the processes
//! started in them, and tearing all of it down on drop (also while panicking).
//!
//! Addressing (node i, pod slot k in 2..=254):
//! - fabric: node i has `fab0` = 10.254.0.(i+1)/24, fd00:fe::(i+1)/64; the fabric netns bridges
//!   the peers (`n<i>`) on `br0`, which holds [`FABRIC_HOST_V4`] (the cluster's services that
//!   run outside any node, e.g. an API server, listen there).
//! - pods: 10.(i+1).0.k/32 and fd00:(i+1)::k/128 on the pod's `eth0`; the node side `p<k>`
//!   holds the gateway 10.(i+1).0.1/32, fd00:(i+1)::1/128 and a host route to the pod.
//! - nodes route other nodes' pod 10.(j+1).0.0/24 and fd00:(j+1)::/64 via their fabric IPs.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::TestbedError;
use crate::netns::{self, Netns, ip};
use crate::proc::{self, Proc, ProcShared};
use crate::runs::{self, KEPT_MARKER, NETNS_PREFIX};

/// Most nodes a cluster can have (pod subnets are 10.(i+1).0.0/24).
const MAX_NODES: usize = 200;
/// Longest pod name accepted (it becomes part of a netns name).
const MAX_POD_NAME: usize = 100;

/// Sysctls for every namespace of ours: no reverse-path filtering, no IPv6 DAD (addresses
/// usable at once). Set before any interface exists so `default` applies to all of them.
const COMMON_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];
/// Additionally for node namespaces: they route.
const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
];

#[derive(Clone, Copy, Debug)]
pub struct ClusterConfig {
    pub nodes: usize,
    pub ipv6: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nodes: 2,
            ipv6: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub index: usize,
    /// The Kubernetes node name: `node-<index>`.
    pub name: String,
    pub netns: Netns,
    /// Its interface on the node-to-node fabric (for tcpdump).
    pub fabric_if: String,
    pub ip4: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// Index of the node it runs on.
    pub node: usize,
    pub netns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
}

/// A pod plus what the cluster needs to take it apart.
struct PodEntry {
    pod: Pod,
    slot: u8,
}

impl PodEntry {
    fn node_if(&self) -> String {
        format!("p{}", self.slot)
    }
}

/// A Kubernetes-like cluster of network namespaces on this machine. Everything it created is
/// removed when it drops.
pub struct Cluster {
    run_id: String,
    dir: PathBuf,
    cfg: ClusterConfig,
    fabric: Option<Netns>,
    nodes: Vec<Node>,
    pods: Mutex<Vec<PodEntry>>,
    procs: Mutex<Vec<Arc<ProcShared>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fabric namespace's own address on `br0`: reachable from every node, never a node's.
pub const FABRIC_HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 254);

fn node_ip4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 254, 0, (i + 1) as u8)
}
fn node_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xfe, 0, 0, 0, 0, 0, (i + 1) as u16)
}
fn pod_ip4(i: usize, k: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, (i + 1) as u8, 0, k)
}
fn pod_ip6(i: usize, k: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, (i + 1) as u16, 0, 0, 0, 0, 0, k as u16)
}

impl Cluster {
    /// Builds the fabric and `cfg.nodes` nodes. On failure everything created so far is removed.
    pub fn new(cfg: ClusterConfig) -> Result<Cluster, TestbedError> {
        if cfg.nodes == 0 || cfg.nodes > MAX_NODES {
            return Err(TestbedError::Invalid(format!(
                "nodes must be 1..={MAX_NODES}, got {}",
                cfg.nodes
            )));
        }
        let (run_id, dir) = runs::new_run()?;
        let mut cluster = Cluster {
            run_id,
            dir,
            cfg,
            fabric: None,
            nodes: Vec::new(),
            pods: Mutex::new(Vec::new()),
            procs: Mutex::new(Vec::new()),
        };
        cluster.build()?; // on error, Drop removes what exists
        Ok(cluster)
    }

    fn netns_name(&self, suffix: &str) -> String {
        format!("{NETNS_PREFIX}{}-{suffix}", self.run_id)
    }

    fn build(&mut self) -> Result<(), TestbedError> {
        let fab_name = self.netns_name("fab");
        let fabric = netns::create(&fab_name)?;
        self.fabric = Some(fabric.clone());
        fabric.sysctls(COMMON_SYSCTLS)?;
        ip(&[
            "-n",
            &fab_name,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &fab_name, "link", "set", "br0", "up"])?;
        ip(&[
            "-n",
            &fab_name,
            "addr",
            "add",
            &format!("{FABRIC_HOST_V4}/24"),
            "dev",
            "br0",
        ])?;

        for i in 0..self.cfg.nodes {
            let name = self.netns_name(&format!("n{i}"));
            let ns = netns::create(&name)?;
            let node = Node {
                index: i,
                name: format!("node-{i}"),
                netns: ns.clone(),
                fabric_if: "fab0".into(),
                ip4: node_ip4(i),
                ip6: self.cfg.ipv6.then(|| node_ip6(i)),
            };
            self.nodes.push(node.clone());
            ns.sysctls(COMMON_SYSCTLS)?;
            ns.sysctls(NODE_SYSCTLS)?;
            let peer = format!("n{i}");
            ip(&[
                "-n", &name, "link", "add", "fab0", "type", "veth", "peer", "name", &peer, "netns",
                &fab_name,
            ])?;
            ip(&["-n", &fab_name, "link", "set", &peer, "master", "br0", "up"])?;
            ip(&["-n", &name, "link", "set", "fab0", "up"])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/24", node.ip4),
                "dev",
                "fab0",
            ])?;
            if let Some(ip6) = node.ip6 {
                ip(&[
                    "-n",
                    &name,
                    "addr",
                    "add",
                    &format!("{ip6}/64"),
                    "dev",
                    "fab0",
                    "nodad",
                ])?;
            }
        }
        for node in &self.nodes {
            let ns = &node.netns.name;
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                let j = other.index;
                let cidr4 = format!("10.{}.0.0/24", j + 1);
                ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &cidr4,
                    "via",
                    &other.ip4.to_string(),
                    "dev",
                    "fab0",
                ])?;
                if let Some(via6) = other.ip6 {
                    let cidr6 = format!("fd00:{:x}::/64", j + 1);
                    ip(&[
                        "-n",
                        ns,
                        "-6",
                        "route",
                        "add",
                        &cidr6,
                        "via",
                        &via6.to_string(),
                        "dev",
                        "fab0",
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Short and unique per Cluster (`<pid>-<hex>`); part of every name the cluster creates.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Per-run scratch dir (logs, pidfile): /tmp/mesh-testbed/<run_id>. Removed on drop unless
    /// TESTBED_KEEP=1 or the dropping thread is panicking (then kept, and its path printed).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.nodes.clone()
    }

    /// The fabric namespace (a bridge joining the nodes' `fab0`).
    pub fn fabric(&self) -> Option<&Netns> {
        self.fabric.as_ref()
    }

    pub fn pods(&self) -> Vec<Pod> {
        lock(&self.pods).iter().map(|e| e.pod.clone()).collect()
    }

    /// Creates pod `name` (unique in this cluster; `[A-Za-z0-9_.-]`, not `fab` or `n<digits>`)
    /// on node `node`, wired and routed so it reaches every other pod.
    pub fn add_pod(&self, node: usize, name: &str) -> Result<Pod, TestbedError> {
        validate_pod_name(name)?;
        let node_info = self.nodes.get(node).ok_or_else(|| {
            TestbedError::Invalid(format!("no node {node} (cluster has {})", self.nodes.len()))
        })?;
        // Held for the whole setup: pod creation within one cluster is serialised.
        let mut pods = lock(&self.pods);
        if pods.iter().any(|e| e.pod.name == name) {
            return Err(TestbedError::Invalid(format!("pod {name} already exists")));
        }
        let slot = (2..=254u8)
            .find(|k| !pods.iter().any(|e| e.pod.node == node && e.slot == *k))
            .ok_or_else(|| TestbedError::Invalid(format!("node {node} is full (253 pods)")))?;
        let pod_ns = self.netns_name(name);
        let entry = PodEntry {
            pod: Pod {
                name: name.to_string(),
                node,
                netns: Netns::named(&pod_ns),
                ip4: pod_ip4(node, slot),
                ip6: self.cfg.ipv6.then(|| pod_ip6(node, slot)),
            },
            slot,
        };
        netns::create(&pod_ns)?;
        if let Err(e) = self.wire_pod(node_info, &entry) {
            let _ = ip(&["-n", &node_info.netns.name, "link", "del", &entry.node_if()]);
            let _ = netns::delete(&pod_ns);
            return Err(e);
        }
        let pod = entry.pod.clone();
        pods.push(entry);
        Ok(pod)
    }

    fn wire_pod(&self, node: &Node, entry: &PodEntry) -> Result<(), TestbedError> {
        let pod = &entry.pod;
        let (n, p) = (node.netns.name.as_str(), pod.netns.name.as_str());
        let host_if = entry.node_if();
        let host_if = host_if.as_str();
        let gw4 = pod_ip4(node.index, 1).to_string();
        pod.netns.sysctls(COMMON_SYSCTLS)?;
        ip(&[
            "-n", n, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", p,
        ])?;
        ip(&["-n", n, "link", "set", host_if, "up"])?;
        ip(&["-n", n, "addr", "add", &format!("{gw4}/32"), "dev", host_if])?;
        ip(&[
            "-n",
            n,
            "route",
            "add",
            &format!("{}/32", pod.ip4),
            "dev",
            host_if,
        ])?;
        ip(&["-n", p, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            p,
            "addr",
            "add",
            &format!("{}/32", pod.ip4),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", p, "route", "add", &gw4, "dev", "eth0"])?;
        ip(&[
            "-n", p, "route", "add", "default", "via", &gw4, "dev", "eth0",
        ])?;
        if let Some(ip6) = pod.ip6 {
            let gw6 = pod_ip6(node.index, 1).to_string();
            ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("{gw6}/128"),
                "dev",
                host_if,
                "nodad",
            ])?;
            ip(&[
                "-n",
                n,
                "-6",
                "route",
                "add",
                &format!("{ip6}/128"),
                "dev",
                host_if,
            ])?;
            ip(&[
                "-n",
                p,
                "addr",
                "add",
                &format!("{ip6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", p, "-6", "route", "add", &gw6, "dev", "eth0"])?;
            ip(&[
                "-n", p, "-6", "route", "add", "default", "via", &gw6, "dev", "eth0",
            ])?;
        }
        Ok(())
    }

    /// Kills the pod's processes and deletes its netns and veth.
    pub fn remove_pod(&self, name: &str) -> Result<(), TestbedError> {
        let mut pods = lock(&self.pods);
        let idx = pods
            .iter()
            .position(|e| e.pod.name == name)
            .ok_or_else(|| TestbedError::Invalid(format!("no pod {name}")))?;
        let entry = pods.remove(idx);
        self.kill_procs_in(&entry.pod.netns.name);
        let node_ns = &self.nodes[entry.pod.node].netns.name;
        let unlinked = ip(&["-n", node_ns, "link", "del", &entry.node_if()]).map(|_| ());
        let deleted = netns::delete(&entry.pod.netns.name);
        unlinked.and(deleted)
    }

    fn kill_procs_in(&self, netns: &str) {
        let victims: Vec<Arc<ProcShared>> = {
            let mut procs = lock(&self.procs);
            let (gone, keep) = procs.drain(..).partition(|p| p.netns == netns);
            *procs = keep;
            gone
        };
        for p in victims {
            p.kill_and_reap();
        }
    }

    /// Spawns `cmd` inside `netns` (setns in pre_exec; fd opened before fork), stdout+stderr to
    /// `<dir>/<label>.log` (appended), in its own process group. The process is also killed
    /// when the Cluster drops.
    pub fn spawn(&self, netns: &Netns, cmd: Command, label: &str) -> Result<Proc, TestbedError> {
        let proc = proc::spawn(&self.dir, netns, cmd, label)?;
        let mut procs = lock(&self.procs);
        // Forget processes that have exited and whose handles are gone.
        procs.retain(|p| Arc::strong_count(p) > 1 || !matches!(p.try_wait(), Ok(Some(_))));
        procs.push(proc.shared());
        Ok(proc)
    }

    /// [`Cluster::spawn`] for a container of pod `uid`: the process also starts in the pod's
    /// cgroup (`.../kubepods/pod<uid>`, made on first use; see `cgroups`).
    pub fn spawn_in_pod_cgroup(
        &self,
        netns: &Netns,
        uid: &str,
        cmd: Command,
        label: &str,
    ) -> Result<Proc, TestbedError> {
        let cgroup = crate::cgroups::pod_cgroup(&self.run_id, uid)?;
        let proc = proc::spawn_in(&self.dir, netns, Some(&cgroup), cmd, label)?;
        let mut procs = lock(&self.procs);
        procs.retain(|p| Arc::strong_count(p) > 1 || !matches!(p.try_wait(), Ok(Some(_))));
        procs.push(proc.shared());
        Ok(proc)
    }

    /// Runs argv inside netns to completion and returns its Output (error if it cannot start;
    /// a non-zero exit is returned, not an error).
    pub fn run(&self, netns: &Netns, argv: &[&str]) -> Result<Output, TestbedError> {
        proc::run(netns, argv)
    }
}

fn validate_pod_name(name: &str) -> Result<(), TestbedError> {
    let charset_ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let reserved = name == "fab"
        || (name.len() > 1
            && name.starts_with('n')
            && name[1..].bytes().all(|b| b.is_ascii_digit()));
    if name.is_empty()
        || name.len() > MAX_POD_NAME
        || !charset_ok
        || name.starts_with('.')
        || reserved
    {
        return Err(TestbedError::Invalid(format!(
            "bad pod name {name:?}: use 1..={MAX_POD_NAME} of [A-Za-z0-9_.-], not `fab` or `n<digits>`"
        )));
    }
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let procs = std::mem::take(&mut *lock(&self.procs));
        for p in procs {
            p.kill_and_reap();
        }
        let pods = std::mem::take(&mut *lock(&self.pods));
        let names = pods
            .iter()
            .map(|e| e.pod.netns.name.clone())
            .chain(self.nodes.iter().map(|n| n.netns.name.clone()))
            .chain(self.fabric.iter().map(|f| f.name.clone()));
        for name in names {
            if let Err(e) = netns::delete(&name) {
                eprintln!("testbed: cleaning up run {}: {e}", self.run_id);
            }
        }
        if let Err(e) = crate::cgroups::remove_run(&self.run_id) {
            eprintln!("testbed: cleaning up run {}: {e}", self.run_id);
        }
        let keep = std::env::var("TESTBED_KEEP").is_ok_and(|v| v == "1");
        if keep || std::thread::panicking() {
            let _ = std::fs::write(self.dir.join(KEPT_MARKER), "");
            eprintln!("testbed: kept run dir (logs) {}", self.dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("testbed: removing {}: {e}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names() {
        assert!(validate_pod_name("a-client").is_ok());
        assert!(validate_pod_name("node-1").is_ok());
        assert!(validate_pod_name("n").is_ok());
        for bad in ["", "fab", "n0", "n12", "a/b", "a b", ".x"] {
            assert!(validate_pod_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(pod_ip6(0, 10).to_string(), "fd00:1::a");
        assert_eq!(pod_ip4(1, 3).to_string(), "10.2.0.3");
        assert_eq!(node_ip6(1).to_string(), "fd00:fe::2");
    }
}
