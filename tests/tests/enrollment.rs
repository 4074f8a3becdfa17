//! Race-free enrollment end to end (issue 11's "Done when"), in local mode with real processes:
//! the local kubelet runs each node's CNI chain (our veth wiring, then the `mesh-cni` plugin,
//! which asks the node's `mesh-cni agent`, which hands the pod's netns to ztunnel over ZDS)
//! before a pod's app starts. Run as root, in both capture modes.

use std::net::IpAddr;
use std::time::Duration;

use localmesh::wire::WireCapture;
use localmesh::{Enrollment, LocalMesh, MeshOptions, wait_for};
use mesh_tests::manifests::{echo_pod, namespace};
use mesh_tests::{WhoConn, privileged, served_by};

fn mesh() -> LocalMesh {
    let mesh = LocalMesh::start(MeshOptions {
        enrollment: Enrollment::Cni,
        ..MeshOptions::default()
    })
    .expect("start local mesh");
    let manifests = namespace("a", true) + &echo_pod("a", "server", 1, "server", &[8080]);
    mesh.apply("00-all.yaml", &manifests).unwrap();
    mesh.wait_listening("a", "server", 8080).unwrap();
    mesh.wait_enrolled("a", "server").unwrap();
    mesh
}

/// A pod whose only container is a client that connects as it starts (mesh-echo who).
fn connecting_pod(name: &str, target: &str, marker: &str) -> String {
    format!(
        "\n---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: {name}, namespace: a, labels: {{app: {name}}}}}\n\
         spec:\n  nodeName: node-0\n  serviceAccountName: client\n  \
         containers: [{{name: c, command: [mesh-echo, who, --addr, \"{target}\", --message, {marker}]}}]\n"
    )
}

/// The log of a pod's first container (it exists once the kubelet started the container).
fn container_log(mesh: &LocalMesh, name: &str) -> std::path::PathBuf {
    mesh.dir().join(format!("a-{name}-0.log"))
}

#[test]
fn first_outbound_connection_is_captured() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let server = mesh.pod("a", "server").unwrap();
    let target = format!("{}:8080", server.ip4);
    let node0 = mesh.cluster.nodes()[0].clone();
    // Every interface of node 0, including the veth the new pod gets: its first packets.
    let wire = WireCapture::start(&mesh.cluster, &node0.netns, "any", "first-packet").unwrap();
    let marker = format!("FIRST-{}", mesh.cluster.run_id());
    mesh.apply(
        "10-client.yaml",
        &connecting_pod("client", &target, &marker),
    )
    .unwrap();
    let client = mesh.pod("a", "client").unwrap();
    let log = container_log(&mesh, "client");
    wait_for(Duration::from_secs(20), "the client's reply", || {
        Ok(std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("served_by"))
    })
    .unwrap();
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(out.contains("\"served_by\":\"server\""), "{out}");
    let segments = wire.finish().unwrap();
    let from_pod: Vec<_> = segments
        .iter()
        .filter(|s| s.src == IpAddr::from(client.ip4))
        .collect();
    assert!(
        from_pod.iter().any(|s| s.dport == meshcore::HBONE_PORT),
        "no HBONE from the pod: {from_pod:?}"
    );
    let plain: Vec<_> = from_pod
        .iter()
        .filter(|s| s.dport != meshcore::HBONE_PORT)
        .collect();
    assert!(
        plain.is_empty(),
        "the pod sent outside HBONE (its first connection was not captured): {plain:?}"
    );
    assert!(
        !localmesh::wire::payload_contains(&segments, marker.as_bytes()),
        "the app's plaintext crossed the node's links"
    );
}

/// The pod's ADD fails with `expected` in the error; it has no process and no sandbox.
fn add_fails(mesh: &LocalMesh, name: &str, expected: &[&str]) {
    let err = mesh
        .apply(
            &format!("20-{name}.yaml"),
            &connecting_pod(name, "10.2.0.2:8080", "never"),
        )
        .expect_err("the pod must not start");
    let msg = format!("{err:#}");
    for e in expected {
        assert!(msg.contains(e), "error does not say {e:?}: {msg}");
    }
    assert!(mesh.pod("a", name).is_err(), "the pod is still there");
    assert!(
        !container_log(mesh, name).exists(),
        "its container was started"
    );
    assert!(
        !mesh
            .cluster
            .pods()
            .iter()
            .any(|p| p.name == format!("a-{name}")),
        "its network namespace is left"
    );
}

#[test]
fn add_fails_and_the_app_never_runs_without_agent_or_ztunnel() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    mesh.stop_agent(0, true);
    add_fails(&mesh, "no-agent", &["mesh-cni", "agent"]);
    mesh.start_agent(0).unwrap();
    mesh.stop_ztunnel(0, true);
    add_fails(&mesh, "no-ztunnel", &["ztunnel"]);
    // Both back: the same pod starts, enrolled before its app ran.
    mesh.start_ztunnel(0).unwrap();
    mesh.apply(
        "20-no-ztunnel.yaml",
        &connecting_pod("no-ztunnel", "10.2.0.2:8080", "later"),
    )
    .unwrap();
    mesh.wait_enrolled("a", "no-ztunnel").unwrap();
}

/// A live connection keeps flowing across an agent restart; the pods stay enrolled (the
/// restarted agent finds them again) and new pods are enrolled by it.
#[test]
fn agent_restart_keeps_pods_and_traffic() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    mesh.apply(
        "10-client.yaml",
        &echo_pod("a", "client", 0, "client", &[8080]),
    )
    .unwrap();
    mesh.wait_enrolled("a", "client").unwrap();
    let client = mesh.pod("a", "client").unwrap();
    let server = mesh.pod("a", "server").unwrap();
    let mut live = WhoConn::connect(&client, (server.ip4, 8080).into()).unwrap();
    assert_eq!(served_by(&live.who("before").unwrap()), "server");
    let before = mesh.ztunnel_log(0);
    mesh.stop_agent(0, false);
    mesh.start_agent(0).unwrap();
    mesh.wait_ztunnel_connected(0).unwrap();
    assert_eq!(served_by(&live.who("after").unwrap()), "server");
    assert!(mesh.captured("a", "client").unwrap());
    let after = mesh.ztunnel_log(0);
    let new = &after[before.len()..];
    assert!(
        !new.contains("unenroll"),
        "the agent restart unenrolled a pod: {new}"
    );
    mesh.apply("20-late.yaml", &echo_pod("a", "late", 0, "client", &[8080]))
        .unwrap();
    mesh.wait_enrolled("a", "late").unwrap();
}

/// The uids of the pods the ztunnel serving admin on `port` in node 0 has enrolled.
fn enrolled_on(mesh: &LocalMesh, port: u16) -> Vec<String> {
    let dump = mesh.config_dump_on(0, port).unwrap();
    dump["pods"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["uid"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// During a rolling update (a second ztunnel beside the first, as a DaemonSet with surge runs
/// them), a pod created in the overlap is handed to the newest ztunnel only, and is served.
#[test]
fn during_a_rolling_update_new_pods_go_to_the_newest_ztunnel() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    mesh.apply(
        "10-client.yaml",
        &echo_pod("a", "client", 0, "client", &[8080]),
    )
    .unwrap();
    mesh.wait_enrolled("a", "client").unwrap();
    let (old_port, new_port) = (
        localmesh::ISTIO_ADMIN_PORTS.0,
        localmesh::BESIDE_ADMIN_PORTS.0,
    );
    let mut old = mesh.start_ztunnel_beside(0).unwrap();
    // The new one adopts the existing pod (the agent's snapshot).
    wait_for(
        Duration::from_secs(20),
        "the new ztunnel to adopt the client",
        || Ok(enrolled_on(&mesh, new_port).contains(&"a/client".to_string())),
    )
    .unwrap();
    mesh.apply("20-late.yaml", &echo_pod("a", "late", 0, "client", &[8080]))
        .unwrap();
    mesh.wait_enrolled("a", "late").unwrap();
    assert!(
        enrolled_on(&mesh, new_port).contains(&"a/late".to_string()),
        "the newest ztunnel does not serve the pod created during the update"
    );
    assert!(
        !enrolled_on(&mesh, old_port).contains(&"a/late".to_string()),
        "the old ztunnel was handed the pod created during the update"
    );
    let server = mesh.pod("a", "server").unwrap();
    let who = mesh
        .who("a", "late", &format!("{}:8080", server.ip4), "late")
        .unwrap();
    assert_eq!(who.served_by, "server");
    old.request_stop();
    old.wait_timeout(Duration::from_secs(30))
        .expect("the old ztunnel exits");
}

/// From `netns`, one WHO line to `ip:8080` through bash's /dev/tcp: the reply's JSON, or None.
fn who_line(mesh: &LocalMesh, netns: &testbed::Netns, ip: &str) -> Option<serde_json::Value> {
    let script = format!("exec 3<>/dev/tcp/{ip}/8080 && echo 'WHO probe' >&3 && head -1 <&3");
    let out = mesh
        .cluster
        .run(netns, &["timeout", "5", "bash", "-c", &script])
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Kubelet probes, as on Kubernetes: with the agents' probe rewrite on, a connection the node
/// itself opens to a captured STRICT pod reaches the app, from the probe address; a non-mesh
/// pod's plaintext is still refused.
#[test]
fn the_kubelets_probe_reaches_a_strict_pod() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions {
        enrollment: Enrollment::Cni,
        probe_snat: true,
        ..MeshOptions::default()
    })
    .expect("start local mesh");
    let manifests = namespace("a", true)
        + &echo_pod("a", "server", 1, "server", &[8080])
        + &namespace("plain", false)
        + &echo_pod("plain", "outsider", 0, "outsider", &[8080])
        + "\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
           metadata: {name: strict, namespace: a}\nspec: {mtls: {mode: STRICT}}\n";
    mesh.apply("00-all.yaml", &manifests).unwrap();
    mesh.wait_listening("a", "server", 8080).unwrap();
    mesh.wait_enrolled("a", "server").unwrap();
    let server = mesh.pod("a", "server").unwrap().ip4.to_string();
    let outsider = mesh.pod("plain", "outsider").unwrap().netns;
    wait_for(Duration::from_secs(10), "STRICT in force", || {
        Ok(who_line(&mesh, &outsider, &server).is_none())
    })
    .unwrap();
    let node = mesh.cluster.nodes()[1].netns.clone();
    let reply = who_line(&mesh, &node, &server).expect("the node's probe is served");
    assert_eq!(reply["served_by"], "server", "{reply}");
    assert!(
        reply["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("169.254.7.127")),
        "the app saw the probe from {reply}"
    );
    assert!(
        who_line(&mesh, &outsider, &server).is_none(),
        "a non-mesh pod's plaintext reached the STRICT pod"
    );
}
