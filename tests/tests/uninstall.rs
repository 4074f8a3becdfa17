//! `meshctl uninstall` end to end (run as root), in both capture modes: the real `meshctl`
//! against the API double, each node's real `mesh-cni agent` reading the double as its own
//! DaemonSet pod (`--view kube`, over the fabric), real ztunnels holding real pods. After
//! the uninstall — and the stop of the node components that deleting their DaemonSets means —
//! nothing of the mesh is left on any node or in any pod: no eBPF pin or link, no nft table
//! (ztunnel's in the pods, the agent's probe SNAT in the nodes), no policy rule or route, no
//! changed sysctl, no CNI entry, no redirection annotation; the apps still talk, and a pod
//! created afterwards in the ambient namespace starts without the mesh.

use std::process::Command;
use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::leftovers::{
    ebpf_dir, link_exists, link_ids, node_leftovers, pod_leftovers, run_in, sysctl,
};
use mesh_tests::manifests::{echo_pod, namespace};
use mesh_tests::{WhoConn, privileged, served_by};

/// The sysctls enrollment changes in a pod (restored on unenroll).
const CHANGED: [&str; 3] = [
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_fwmark_accept",
    "net.ipv4.tcp_migrate_req",
];
const REDIRECTION: &str = "ambient.istio.io/redirection";

fn annotation(mesh: &LocalMesh, ns: &str, name: &str, key: &str) -> Option<String> {
    let pod = mesh
        .api()
        .expect("API mode")
        .get("v1", "Pod", Some(ns), name)?;
    pod["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_string)
}

fn talks(client: &testbed::Pod, server: &testbed::Pod) -> Result<(), String> {
    let mut conn =
        WhoConn::connect(client, (server.ip4, 8080).into()).map_err(|e| e.to_string())?;
    let reply = conn.who("hello").map_err(|e| e.to_string())?;
    match served_by(&reply) {
        "server" => Ok(()),
        other => Err(format!("served by {other:?}")),
    }
}

fn uninstall_leaves_nothing(capture: &str) {
    let mesh = LocalMesh::start(MeshOptions {
        capture: capture.into(),
        api: true,
        api_cni: true,
        probe_snat: true,
        ..MeshOptions::default()
    })
    .expect("start mesh");
    // A pod that never joins the mesh, on the same node as each mesh pod: the values the
    // sysctls must have again after the uninstall (the testbed's, not the kernel's defaults).
    let yaml = namespace("plain", false)
        + &echo_pod("plain", "ref", 1, "ref", &[8080])
        + &namespace("u", true)
        + &echo_pod("u", "server", 1, "server", &[8080])
        + &echo_pod("u", "client", 0, "client", &[8081]);
    mesh.apply("00-u.yaml", &yaml).expect("apply");
    for name in ["server", "client"] {
        mesh.wait_enrolled("u", name)
            .expect("enrolled by the CNI chain");
    }
    let reference = mesh.pod("plain", "ref").unwrap();
    let pre: Vec<(&str, String)> = CHANGED
        .iter()
        .map(|k| (*k, sysctl(&mesh, &reference, k)))
        .collect();
    let pre: Vec<(&str, &str)> = pre.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let pods = [
        mesh.pod("u", "server").unwrap(),
        mesh.pod("u", "client").unwrap(),
    ];
    talks(&pods[1], &pods[0]).expect("client reaches server through the mesh");

    // What the uninstall must take away is there (else the test could not fail).
    let nodes = mesh.cluster.nodes().len();
    let dirs: Vec<Option<String>> = (0..nodes).map(|i| ebpf_dir(&mesh, i)).collect();
    let links: Vec<u64> = dirs.iter().flatten().flat_map(|d| link_ids(d)).collect();
    if capture == "ebpf" {
        assert!(
            dirs.iter().all(Option::is_some),
            "eBPF dirs logged: {dirs:?}"
        );
        assert!(
            links.len() >= 2 * 6,
            "cgroup and sk_lookup links: {links:?}"
        );
    }
    for pod in &pods {
        assert!(
            !pod_leftovers(&mesh, pod, &pre).is_empty(),
            "{capture}: {} shows no capture while enrolled",
            pod.name
        );
        let (ns, name) = ("u", pod.name.trim_start_matches("u-"));
        assert_eq!(
            annotation(&mesh, ns, name, REDIRECTION).as_deref(),
            Some("enabled"),
            "{name}'s redirection annotation"
        );
    }
    for i in 0..nodes {
        assert_eq!(
            node_leftovers(&mesh, i).len(),
            2,
            "node {i}: probe SNAT table and CNI entry expected: {:?}",
            node_leftovers(&mesh, i)
        );
    }

    let out = Command::new(&mesh.bins.meshctl)
        .arg("uninstall")
        .arg("--kubeconfig")
        .arg(mesh.api().unwrap().kubeconfig())
        .args(["--timeout", "30s"])
        .output()
        .expect("run meshctl");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "meshctl uninstall failed: {said}");
    assert!(
        said.contains(&format!(
            "every node agent removed capture ({nodes} node(s))"
        )),
        "{said}"
    );

    // Deleting the DaemonSets stops the node components (ztunnel gracefully, as the kubelet
    // does): with no pod left enrolled, a stopping ztunnel releases the node's eBPF state.
    for i in 0..nodes {
        mesh.stop_agent(i, true);
        mesh.stop_ztunnel(i, true);
    }
    for pod in &pods {
        wait_for(Duration::from_secs(10), "the pod restored", || {
            Ok(pod_leftovers(&mesh, pod, &pre).is_empty())
        })
        .unwrap_or_else(|e| {
            panic!(
                "{capture}: uninstall left in {}: {:?} ({e})",
                pod.name,
                pod_leftovers(&mesh, pod, &pre)
            )
        });
        let (ok, listening) = run_in(&mesh, &pod.netns, &["ss", "-Htln", "sport = :15008"]);
        assert!(
            ok && listening.trim().is_empty(),
            "{}: {listening}",
            pod.name
        );
        let name = pod.name.trim_start_matches("u-");
        assert_eq!(
            annotation(&mesh, "u", name, REDIRECTION),
            None,
            "{name}'s annotation"
        );
    }
    for i in 0..nodes {
        let left = node_leftovers(&mesh, i);
        assert!(
            left.is_empty(),
            "{capture}: uninstall left on node {i}: {left:?}"
        );
    }
    for dir in dirs.iter().flatten() {
        assert!(!std::path::Path::new(dir).exists(), "uninstall left {dir}");
    }
    wait_for(Duration::from_secs(10), "eBPF links to detach", || {
        Ok(links.iter().all(|id| !link_exists(*id)))
    })
    .unwrap_or_else(|e| panic!("{capture}: links still attached: {e}"));

    // The apps keep talking, now directly; a new pod in the still-ambient namespace starts
    // without the mesh (the plugin is out of the chain: with it in and no agent, its ADD
    // would fail).
    talks(&pods[1], &pods[0]).expect("client reaches server after the uninstall");
    let later = yaml + &echo_pod("u", "later", 0, "later", &[8080]);
    mesh.apply("00-u.yaml", &later)
        .expect("a pod after the uninstall starts");
    let later = mesh.pod("u", "later").unwrap();
    let captured = pod_leftovers(&mesh, &later, &pre);
    assert!(
        captured.is_empty(),
        "the new pod was captured: {captured:?}"
    );
    talks(&later, &pods[0]).expect("the new pod reaches server");
}

#[test]
fn meshctl_uninstall_leaves_nothing_ebpf() {
    if !privileged() {
        return;
    }
    uninstall_leaves_nothing("ebpf");
}

#[test]
fn meshctl_uninstall_leaves_nothing_nftables() {
    if !privileged() {
        return;
    }
    uninstall_leaves_nothing("nftables");
}
