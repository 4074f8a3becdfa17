//! Telemetry and admin end to end: Istio's metric names and labels, byte counters that match
//! the bytes sent (and advance while the connection is open), readiness, and the config dump
//! reporting what a policy lost at L4.

use std::net::SocketAddr;
use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{WhoConn, privileged, served_by};
use serde_json::Value;

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: a, labels: {app: client, version: v1}}
spec:
  nodeName: node-0
  serviceAccountName: client
  containers: []
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: b, labels: {app: server, version: v2}}
spec:
  nodeName: node-1
  serviceAccountName: server
  containers: [{name: echo, command: ["mesh-echo", "serve", "--port", "8080"]}]
"#;

/// Istio's label names on the istio_tcp_* metrics.
const ISTIO_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// Scrapes node `i`'s ztunnel and parses the text with the official Python parser.
fn scrape(mesh: &LocalMesh, i: usize) -> Vec<Value> {
    let node = mesh.cluster.nodes()[i].clone();
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
    assert!(
        out.status.success(),
        "scrape failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parser = format!("{}/py/prom_parse.py", env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new(
        std::env::var("MESH_PYTHON").unwrap_or_else(|_| "python3".into()),
    )
    .arg(parser)
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &out.stdout).unwrap();
    let parsed = child.wait_with_output().unwrap();
    assert!(
        parsed.status.success(),
        "the Prometheus parser rejected the exposition:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice::<Vec<Value>>(&parsed.stdout).unwrap()
}

fn sample<'a>(samples: &'a [Value], name: &str, reporter: &str) -> Option<&'a Value> {
    samples.iter().find(|s| {
        s["name"] == name
            && s["labels"]["reporter"] == reporter
            && s["labels"]["source_workload"] == "client"
    })
}

fn value(samples: &[Value], name: &str, reporter: &str) -> f64 {
    sample(samples, name, reporter)
        .and_then(|s| s["value"].as_f64())
        .unwrap_or(-1.0)
}

#[test]
fn metrics_have_istio_names_and_exact_byte_counts() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions::default()).unwrap();
    mesh.apply("00.yaml", MANIFEST).unwrap();
    mesh.wait_listening("b", "server", 8080).unwrap();
    mesh.wait_enrolled("a", "client").unwrap();
    mesh.wait_enrolled("b", "server").unwrap();
    let client = mesh.pod("a", "client").unwrap();
    let server = mesh.pod("b", "server").unwrap();
    let mut conn = WhoConn::connect(&client, SocketAddr::new(server.ip4.into(), 8080)).unwrap();
    let (mut sent, mut received) = (0u64, 0u64);
    for i in 0..20 {
        let msg = format!("metrics-{i}-{}", "x".repeat(i * 10));
        sent += format!("WHO {msg}\n").len() as u64;
        let reply = conn.who(&msg).unwrap();
        assert_eq!(served_by(&reply), "server");
        received += serde_json::to_string(&reply).unwrap().len() as u64 + 1;
    }
    // While the connection is still open, both reporters count exactly those bytes.
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        wait_for(
            Duration::from_secs(10),
            &format!("{reporter} byte counters to reach {sent}/{received}"),
            || {
                let s = scrape(&mesh, node);
                Ok(
                    value(&s, "istio_tcp_received_bytes_total", reporter) == sent as f64
                        && value(&s, "istio_tcp_sent_bytes_total", reporter) == received as f64,
                )
            },
        )
        .unwrap();
        let s = scrape(&mesh, node);
        assert_eq!(
            value(&s, "istio_tcp_connections_opened_total", reporter),
            1.0
        );
        let opened = sample(&s, "istio_tcp_connections_opened_total", reporter).unwrap();
        let mut names: Vec<&str> = opened["labels"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        names.sort();
        let mut want = ISTIO_LABELS.to_vec();
        want.sort();
        assert_eq!(names, want, "label names must be Istio's");
        let l = &opened["labels"];
        assert_eq!(
            l["source_principal"],
            "spiffe://cluster.local/ns/a/sa/client"
        );
        assert_eq!(
            l["destination_principal"],
            "spiffe://cluster.local/ns/b/sa/server"
        );
        assert_eq!(l["destination_workload"], "server");
        assert_eq!(l["destination_workload_namespace"], "b");
        assert_eq!(l["source_app"], "client");
        assert_eq!(l["destination_version"], "v2");
        assert_eq!(l["connection_security_policy"], "mutual_tls");
        assert_eq!(l["request_protocol"], "tcp");
        assert_eq!(
            l["destination_service"], "unknown",
            "pod IP dialled: no service"
        );
    }
    drop(conn);
    wait_for(Duration::from_secs(10), "the close to be counted", || {
        Ok(value(
            &scrape(&mesh, 0),
            "istio_tcp_connections_closed_total",
            "source",
        ) == 1.0)
    })
    .unwrap();
    // The capture mode is visible as a metric label.
    assert!(
        scrape(&mesh, 0)
            .iter()
            .any(|s| s["name"] == "ztunnel_capture_mode" && s["labels"]["mode"].is_string())
    );
}

#[test]
fn readiness_and_config_dump_report_policies() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions::default()).unwrap();
    mesh.apply("00.yaml", MANIFEST).unwrap();
    mesh.wait_enrolled("b", "server").unwrap();
    let node1 = mesh.cluster.nodes()[1].clone();
    wait_for(
        Duration::from_secs(10),
        "node-1 ztunnel to be ready",
        || {
            let out = mesh.cluster.run(
                &node1.netns,
                &["curl", "-sf", "http://127.0.0.1:15021/healthz/ready"],
            )?;
            Ok(out.status.success())
        },
    )
    .unwrap();
    mesh.apply(
        "10-policy.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: http-only, namespace: b}
spec:
  rules:
  - to: [{operation: {methods: ["GET"]}}]
"#,
    )
    .unwrap();
    let mut report = Value::Null;
    wait_for(
        Duration::from_secs(10),
        "the policy in the config dump",
        || {
            let d = mesh.config_dump(1)?;
            report = d["policies"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == "http-only").cloned())
                .unwrap_or(Value::Null);
            Ok(!report.is_null())
        },
    )
    .unwrap();
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("methods") && warnings.contains("restrictive"),
        "HTTP-only field must be reported: {report}"
    );
    // The ALLOW policy lost its only rule at L4: it now allows nothing.
    let client_free = mesh.pod("b", "server").unwrap();
    let _ = client_free;
    let dump = mesh.config_dump(1).unwrap();
    assert!(dump["certificates"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["state"] == "ready" && c["expiresInSeconds"].as_u64() > Some(0))
    }));
    assert!(dump["pods"].as_array().is_some_and(|p| {
        p.iter()
            .any(|p| p["uid"] == "b/server" && p["capture"].is_string())
    }));
    // A policy with an unknown action is rejected by name and field, and changes nothing.
    mesh.apply(
        "20-bad.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: b}
spec:
  action: ALOW
"#,
    )
    .unwrap();
    wait_for(
        Duration::from_secs(10),
        "meshd to reject the policy",
        || {
            Ok(mesh
                .meshd_log()
                .lines()
                .any(|l| l.contains("typo") && l.contains("spec.action")))
        },
    )
    .unwrap();
    // Runtime log level change through the admin endpoint.
    let node0 = mesh.cluster.nodes()[0].clone();
    let out = mesh
        .cluster
        .run(
            &node0.netns,
            &[
                "curl",
                "-sf",
                "-X",
                "POST",
                "http://127.0.0.1:15000/logging?level=debug",
            ],
        )
        .unwrap();
    assert!(out.status.success(), "log level change refused");
    let out = mesh
        .cluster
        .run(
            &node0.netns,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "http://127.0.0.1:15000/logging?level=%5Bbad",
            ],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
}
