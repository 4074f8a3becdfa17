//! End-to-end L4 policy in local mode: PeerAuthentication (STRICT/PERMISSIVE at every level)
//! and AuthorizationPolicy, including re-checking live connections when policy changes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{WhoConn, privileged, served_by};

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
"#;

fn pod(ns: &str, name: &str, node: usize, sa: &str, ports: &[u16]) -> String {
    mesh_tests::manifests::echo_pod(ns, name, node, sa, ports)
}

fn mesh() -> LocalMesh {
    let mesh = LocalMesh::start(MeshOptions::default()).expect("start local mesh");
    mesh.apply("00-ns.yaml", BASE).unwrap();
    let mut pods = pod("a", "client", 0, "client", &[8080]);
    pods += &pod("a", "other", 0, "other", &[8080]);
    pods += &pod("b", "server", 1, "server", &[8080, 9090]);
    pods += &pod("b", "neighbour", 1, "neighbour", &[8080]);
    pods += &pod("plain", "legacy", 0, "default", &[8080]);
    mesh.apply("10-pods.yaml", &pods).unwrap();
    for (ns, p) in [
        ("a", "client"),
        ("a", "other"),
        ("b", "server"),
        ("b", "neighbour"),
        ("plain", "legacy"),
    ] {
        mesh.wait_listening(ns, p, 8080).unwrap();
    }
    for (ns, p) in [
        ("a", "client"),
        ("a", "other"),
        ("b", "server"),
        ("b", "neighbour"),
    ] {
        mesh.wait_enrolled(ns, p).unwrap();
    }
    mesh
}

/// Whether `from` reaches `to_pod:port` (a WHO exchange answered by that pod).
fn reaches(mesh: &LocalMesh, from: (&str, &str), to: (&str, &str), port: u16) -> bool {
    let dst = mesh.pod(to.0, to.1).unwrap();
    match mesh.who(from.0, from.1, &format!("{}:{port}", dst.ip4), "probe") {
        Ok(w) => w.served_by == to.1,
        Err(_) => false,
    }
}

/// Waits until reachability matches `want` (policy reaches ztunnel asynchronously).
fn eventually(mesh: &LocalMesh, from: (&str, &str), to: (&str, &str), port: u16, want: bool) {
    wait_for(
        Duration::from_secs(20),
        &format!("{from:?} → {to:?}:{port} reachable = {want}"),
        || Ok(reaches(mesh, from, to, port) == want),
    )
    .unwrap();
}

#[test]
fn peer_authentication_levels_override_as_istio_does() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let legacy = ("plain", "legacy");
    let (server, neighbour) = (("b", "server"), ("b", "neighbour"));
    // Default PERMISSIVE: plaintext is delivered.
    assert!(reaches(&mesh, legacy, server, 8080));
    // Mesh-wide STRICT (root namespace): plaintext refused everywhere, mesh traffic fine.
    mesh.apply(
        "20-pa.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#,
    )
    .unwrap();
    eventually(&mesh, legacy, server, 8080, false);
    assert!(!reaches(&mesh, legacy, neighbour, 8080));
    assert!(
        reaches(&mesh, ("a", "client"), server, 8080),
        "mesh traffic must pass STRICT"
    );
    // Namespace PERMISSIVE beats mesh STRICT; a workload STRICT beats the namespace; a port
    // level PERMISSIVE beats the workload.
    mesh.apply(
        "20-pa.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns-permissive, namespace: b}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: server-strict, namespace: b}
spec:
  selector: {matchLabels: {app: server}}
  mtls: {mode: STRICT}
  portLevelMtls:
    "9090": {mode: PERMISSIVE}
"#,
    )
    .unwrap();
    eventually(&mesh, legacy, neighbour, 8080, true);
    eventually(&mesh, legacy, server, 9090, true);
    assert!(
        !reaches(&mesh, legacy, server, 8080),
        "workload STRICT must beat namespace PERMISSIVE"
    );
    assert!(reaches(&mesh, ("a", "client"), server, 8080));
}

#[test]
fn authorization_policy_allows_denies_and_recloses_live_connections() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let (client, other, server) = (("a", "client"), ("a", "other"), ("b", "server"));
    let client_pod = mesh.pod("a", "client").unwrap();
    let server_pod = mesh.pod("b", "server").unwrap();
    // A live connection from a/client, before any policy.
    let mut live =
        WhoConn::connect(&client_pod, SocketAddr::new(server_pod.ip4.into(), 8080)).unwrap();
    assert_eq!(served_by(&live.who("before").unwrap()), "server");

    // ALLOW only sa/other on port 8080: client is denied (new connections), other allowed.
    mesh.apply(
        "30-authz.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-other, namespace: b}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/a/sa/other"]}}]
    to: [{operation: {ports: ["8080"]}}]
"#,
    )
    .unwrap();
    let changed = Instant::now();
    eventually(&mesh, client, server, 8080, false);
    assert!(reaches(&mesh, other, server, 8080));
    assert!(
        !reaches(&mesh, other, server, 9090),
        "port 9090 is not allowed"
    );
    // The live connection from client is now denied: ztunnel closes it, within bounded time.
    wait_for(
        Duration::from_secs(20),
        "the denied live connection to be closed",
        || Ok(live.who("after").is_err()),
    )
    .unwrap();
    eprintln!(
        "live connection closed {:?} after the policy was written",
        changed.elapsed()
    );
    // Other workloads in the namespace are not selected: still open to everyone.
    assert!(reaches(&mesh, client, ("b", "neighbour"), 8080));

    // DENY beats ALLOW.
    mesh.apply(
        "30-authz.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-other, namespace: b}
spec:
  selector: {matchLabels: {app: server}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/a/sa/other"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-a, namespace: b}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["a"]}}]
"#,
    )
    .unwrap();
    eventually(&mesh, other, server, 8080, false);
    assert!(
        !reaches(&mesh, other, ("b", "neighbour"), 8080),
        "namespace-wide DENY applies to every pod of b"
    );

    // `spec: {}` allows nothing; removing every policy allows everything again.
    mesh.apply(
        "30-authz.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: b}
spec: {}
"#,
    )
    .unwrap();
    eventually(&mesh, ("plain", "legacy"), ("b", "neighbour"), 8080, false);
    mesh.remove("30-authz.yaml").unwrap();
    eventually(&mesh, client, server, 8080, true);
}

/// A config source that vanishes for a moment (a directory swapped by a deploy, an NFS hiccup)
/// is a fault, not an instruction to drop everything: STRICT and DENY stay in force and no pod
/// is unenrolled, throughout and after (audit H2).
#[test]
fn config_source_outage_keeps_strict_and_deny() {
    if !privileged() {
        return;
    }
    let mesh = mesh();
    let (legacy, client, server) = (("plain", "legacy"), ("a", "client"), ("b", "server"));
    mesh.apply(
        "20-policy.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: b}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: b}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ["9090"]}}]
"#,
    )
    .unwrap();
    eventually(&mesh, legacy, server, 8080, false);
    eventually(&mesh, client, server, 9090, false);
    assert!(reaches(&mesh, client, server, 8080));
    let unenrolled = |m: &LocalMesh| {
        (0..2)
            .map(|i| m.ztunnel_log(i).matches("pod unenrolled").count())
            .sum::<usize>()
    };
    let before = unenrolled(&mesh);

    let away = mesh.config_dir.with_extension("away");
    std::fs::rename(&mesh.config_dir, &away).unwrap();
    // Probe all through the outage: the fail-open window was ~250 ms after the rename.
    let outage = Instant::now();
    let mut probes = 0;
    while outage.elapsed() < Duration::from_secs(2) {
        assert!(
            !reaches(&mesh, legacy, server, 8080),
            "plaintext reached a STRICT pod during a config-source outage"
        );
        assert!(
            !reaches(&mesh, client, server, 9090),
            "a DENY port was reached during a config-source outage"
        );
        probes += 1;
    }
    std::fs::rename(&away, &mesh.config_dir).unwrap();
    assert!(probes > 0);
    // The source is back; nothing changed, and nothing was unenrolled on the way.
    assert!(reaches(&mesh, client, server, 8080));
    assert!(!reaches(&mesh, legacy, server, 8080));
    assert!(!reaches(&mesh, client, server, 9090));
    assert_eq!(unenrolled(&mesh), before, "a pod was unenrolled");
    for (ns, p) in [("a", "client"), ("b", "server"), ("b", "neighbour")] {
        assert!(mesh.captured(ns, p).unwrap(), "{ns}/{p} lost capture");
    }
}
