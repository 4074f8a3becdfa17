//! A connection to a Service whose first endpoint cannot take it is served by another, as long
//! as nothing of the app's has gone through: the endpoint's app refuses (its pod's ztunnel
//! answers 503), or the endpoint leaves the Service while the stream is being opened (a pod
//! that is going or no longer ready; here its 15008 drops every packet, so its answer would
//! never come). The client sees an answer from the healthy pod, never an error, and node-0's
//! ztunnel counts each retry by reason, and lists the connection as routed to a pod until it
//! ends (its config dump's `routed`). Real traffic from a pod through the Service VIPs.
//!
//! One mesh for both cases; torn down even when an assertion fails.

use std::net::SocketAddr;
use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{WhoConn, manifests, privileged, served_by};

/// An echo pod in namespace `b` on node-1 with `labels`, its app listening on `port` only.
fn pod(name: &str, labels: &str, port: u16) -> String {
    format!(
        r#"
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: b, labels: {labels}}}
spec:
  nodeName: node-1
  serviceAccountName: web
  containers: [{{name: echo, command: [mesh-echo, serve, --port, "{port}"], ports: [{{containerPort: {port}}}]}}]
"#
    )
}

/// Services `web` (every `app: web` pod) and `slow` (pods matching `slow_selector`), both
/// port 80 → 8080.
fn services(slow_selector: &str) -> String {
    format!(
        r#"
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: b}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: slow, namespace: b}}
spec:
  selector: {slow_selector}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"#
    )
}

/// The IPv4 VIP of Service `name`, at port 80, as rendered for meshd.
fn vip(mesh: &LocalMesh, name: &str) -> SocketAddr {
    let text = std::fs::read_to_string(mesh.config_dir.join("20-services.yaml")).unwrap();
    let docs = localmesh::render::parse_docs("20-services.yaml", &text).unwrap();
    let svc = docs
        .iter()
        .find(|d| localmesh::render::kind(d) == "Service" && d["metadata"]["name"] == name)
        .unwrap();
    let ip = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    SocketAddr::new(ip, 80)
}

/// Waits until node-0's ztunnel has Service `b/<name>` with exactly the endpoints `pods`.
fn wait_endpoints(mesh: &LocalMesh, name: &str, pods: &[&str]) {
    let key = format!("b/{name}");
    let mut want: Vec<String> = pods.iter().map(|p| format!("b/{p}")).collect();
    want.sort();
    wait_for(
        Duration::from_secs(20),
        &format!("node-0 to have {key} with endpoints {want:?}"),
        || {
            let dump = mesh.config_dump(0)?;
            let Some(svc) = dump["services"]
                .as_array()
                .and_then(|ss| ss.iter().find(|s| s["key"] == key.as_str()))
            else {
                return Ok(false);
            };
            let mut have: Vec<String> = svc["endpoints"]
                .as_array()
                .map(|es| {
                    es.iter()
                        .filter_map(|e| e["workload"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            have.sort();
            Ok(have == want)
        },
    )
    .unwrap();
}

/// node-0's ztunnel's count of outbound retries for `reason`.
fn retries(mesh: &LocalMesh, reason: &str) -> u64 {
    let node = mesh.cluster.nodes()[0].clone();
    let out = mesh
        .cluster
        .run(
            &node.netns,
            &[
                "curl",
                "-sf",
                "--max-time",
                "5",
                "http://127.0.0.1:15020/metrics",
            ],
        )
        .unwrap();
    assert!(out.status.success(), "scrape failed: {out:?}");
    let series = format!("mesh_outbound_retries_total{{reason=\"{reason}\"}} ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn a_service_connection_is_served_by_another_endpoint_when_its_first_cannot_take_it() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions::default()).expect("start local mesh");
    mesh.apply(
        "00-ns.yaml",
        &(manifests::namespace("a", true) + &manifests::namespace("b", true)),
    )
    .unwrap();
    let mut pods = manifests::pod("a", "client", 0, "client", &[]);
    pods += &pod("good", "{app: web, role: good}", 8080);
    pods += &pod("broken", "{app: web, role: broken}", 9090);
    pods += &pod("stuck", "{app: other, slow: \"yes\"}", 8080);
    mesh.apply("10-pods.yaml", &pods).unwrap();
    mesh.apply("20-services.yaml", &services("{slow: \"yes\"}"))
        .unwrap();
    for (p, port) in [("good", 8080), ("broken", 9090), ("stuck", 8080)] {
        mesh.wait_listening("b", p, port).unwrap();
        mesh.wait_enrolled("b", p).unwrap();
    }
    mesh.wait_enrolled("a", "client").unwrap();
    wait_endpoints(&mesh, "web", &["good", "broken"]);
    wait_endpoints(&mesh, "slow", &["stuck"]);
    let client = mesh.pod("a", "client").unwrap();

    // `broken`'s app does not listen on 8080: about half the connections pick it first, and
    // every one is answered by `good`.
    let web = vip(&mesh, "web");
    for i in 0..20 {
        let answer = WhoConn::connect(&client, web)
            .and_then(|mut c| c.who("hi"))
            .unwrap_or_else(|e| panic!("connection {i} to {web}: {e:#}"));
        assert_eq!(served_by(&answer), "good", "connection {i}");
    }
    assert!(
        retries(&mesh, "open_failed") > 0,
        "20 connections never tried `broken` first: the retry was not exercised"
    );

    // `stuck`'s 15008 drops every packet: the stream to it would never open. While it is being
    // opened, `slow` is changed to select `good` instead: the connection goes there.
    let stuck = mesh.pod("b", "stuck").unwrap();
    let blackhole = "add table inet blackhole; \
                     add chain inet blackhole input { type filter hook input priority -300; }; \
                     add rule inet blackhole input tcp dport 15008 drop";
    let out = mesh.cluster.run(&stuck.netns, &["nft", blackhole]).unwrap();
    assert!(out.status.success(), "nft: {out:?}");
    let slow = vip(&mesh, "slow");
    let asking =
        std::thread::spawn(move || WhoConn::connect(&client, slow).and_then(|mut c| c.who("hi")));
    // ztunnel dials from inside the client's pod.
    let syn_to_stuck = format!("{}:15008", stuck.ip4);
    wait_for(
        Duration::from_secs(10),
        "node-0's ztunnel to be dialling stuck's 15008",
        || {
            let out = mesh.exec("a", "client", &["ss", "-Htn", "state", "syn-sent"])?;
            Ok(String::from_utf8_lossy(&out.stdout).contains(&syn_to_stuck))
        },
    )
    .unwrap();
    // Until it ends, node-0 counts the connection as routed to `stuck`: what local mode's
    // kubelet waits on before it stops a leaving pod.
    let routed = mesh.config_dump(0).unwrap()["routed"].clone();
    assert_eq!(routed, serde_json::json!({"b/stuck": 1}), "{routed}");
    mesh.apply("20-services.yaml", &services("{role: good}"))
        .unwrap();
    let answer = asking
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the connection to {slow}: {e:#}"));
    assert_eq!(served_by(&answer), "good");
    assert_eq!(retries(&mesh, "endpoint_left"), 1);
    wait_for(
        Duration::from_secs(10),
        "node-0 to count no connection routed anywhere",
        || Ok(mesh.config_dump(0)?["routed"] == serde_json::json!({})),
    )
    .unwrap();
}
