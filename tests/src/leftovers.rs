//! What of the mesh is left in a pod or on a node, as the cleanup and uninstall tests look for
//! it: our nft tables, policy rules and routes, changed sysctls, pinned eBPF state and its
//! links, our entry in the CNI chain. Each function reports what it finds as a line a failing
//! assertion can print; none changes anything.

use std::path::Path;
use std::process::Command;

use localmesh::LocalMesh;

/// Runs argv in `netns`; (success, stdout + stderr).
pub fn run_in(mesh: &LocalMesh, netns: &testbed::Netns, argv: &[&str]) -> (bool, String) {
    match mesh.cluster.run(netns, argv) {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ),
        Err(e) => (false, format!("running {argv:?}: {e}")),
    }
}

/// `sysctl -n key` in the pod.
pub fn sysctl(mesh: &LocalMesh, pod: &testbed::Pod, key: &str) -> String {
    let (ok, out) = run_in(mesh, &pod.netns, &["sysctl", "-n", key]);
    assert!(ok, "sysctl {key}: {out}");
    out.trim().to_string()
}

/// What of ours is in the pod: ztunnel's nft table, ip rules/routes of table 1338, and each
/// sysctl of `pre` whose value is not the one it had before enrollment.
pub fn pod_leftovers(mesh: &LocalMesh, pod: &testbed::Pod, pre: &[(&str, &str)]) -> Vec<String> {
    let mut left = Vec::new();
    if run_in(
        mesh,
        &pod.netns,
        &["nft", "list", "table", "inet", "ztunnel"],
    )
    .0
    {
        left.push("nft table inet ztunnel".to_string());
    }
    for fam in ["-4", "-6"] {
        let (_, rules) = run_in(
            mesh,
            &pod.netns,
            &["ip", fam, "rule", "show", "pref", "1338"],
        );
        if !rules.trim().is_empty() {
            left.push(format!("ip {fam} rule: {}", rules.trim()));
        }
        let (ok, routes) = run_in(
            mesh,
            &pod.netns,
            &["ip", fam, "route", "show", "table", "1338"],
        );
        // A table never used does not exist (a pod never enrolled): nothing of ours.
        let never_made = !ok && routes.contains("FIB table does not exist");
        if !never_made && !routes.trim().is_empty() {
            left.push(format!("ip {fam} route table 1338: {}", routes.trim()));
        }
    }
    for (key, want) in pre {
        let got = sysctl(mesh, pod, key);
        if got != *want {
            left.push(format!("{key} = {got} (was {want} before enrollment)"));
        }
    }
    left
}

/// What of ours is in node `i`'s namespace and files: the agent's probe SNAT table, our entry
/// in the node's CNI chain.
pub fn node_leftovers(mesh: &LocalMesh, i: usize) -> Vec<String> {
    let mut left = Vec::new();
    let node = &mesh.cluster.nodes()[i];
    let table = mesh_cni::probe_snat::TABLE;
    if run_in(mesh, &node.netns, &["nft", "list", "table", "inet", table]).0 {
        left.push(format!("{}: nft table inet {table}", node.name));
    }
    for conf in mesh.cni_conf_files(i) {
        let text = std::fs::read_to_string(&conf).unwrap_or_default();
        if text.contains("\"mesh-cni\"") {
            left.push(format!("{}: mesh-cni in {}", node.name, conf.display()));
        }
    }
    left
}

/// The bpffs dir node `i`'s ztunnel logged it loaded (eBPF capture).
pub fn ebpf_dir(mesh: &LocalMesh, i: usize) -> Option<String> {
    mesh.ztunnel_log(i)
        .lines()
        .rev()
        .filter(|l| l.contains("eBPF capture loaded"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["fields"]["dir"].as_str().map(str::to_string))
}

/// Ids of the eBPF links pinned in `dir` (cgroup hooks and per-pod sk_lookup).
pub fn link_ids(dir: &str) -> Vec<u64> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("link_") || name.starts_with("sklookup_")) {
            continue;
        }
        let Ok(out) = Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(e.path())
            .output()
        else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = v["id"].as_u64() {
            ids.push(id);
        }
    }
    ids
}

/// Whether the kernel still has eBPF link `id`.
pub fn link_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether a path exists (for pinned dirs, in assertions).
pub fn exists(path: &str) -> bool {
    Path::new(path).exists()
}
