//! Certificate lifecycle under live traffic: with 10-second certificates, a client streaming
//! through the mesh for 60 seconds sees no failed connection and no broken stream while leaf
//! certificates rotate at half-life — and while the CA root itself is rotated in three steps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{WhoConn, privileged, served_by};

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
metadata: {name: client, namespace: a}
spec:
  nodeName: node-0
  serviceAccountName: client
  containers: []
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: b}
spec:
  nodeName: node-1
  serviceAccountName: server
  containers: [{name: echo, command: ["mesh-echo", "serve", "--port", "8080"]}]
"#;

const STREAM_FOR: Duration = Duration::from_secs(60);

/// Issued-certificate log lines so far on node `i`.
fn issued(mesh: &LocalMesh, i: usize) -> usize {
    mesh.ztunnel_log(i)
        .matches("workload certificate issued")
        .count()
}

/// The trust-bundle size each certificate on node `i` was issued with.
fn cert_roots(mesh: &LocalMesh, i: usize) -> Vec<u64> {
    mesh.config_dump(i)
        .map(|d| {
            d["certificates"]
                .as_array()
                .map(|cs| cs.iter().filter_map(|c| c["roots"].as_u64()).collect())
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

fn ca(mesh: &LocalMesh, step: &str) {
    let out = std::process::Command::new(&mesh.bins.meshd)
        .args(["ca", step, "--state-dir"])
        .arg(&mesh.state_dir)
        .output()
        .expect("run meshd ca");
    assert!(
        out.status.success(),
        "meshd ca {step}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rotation_under_live_traffic_loses_nothing() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions {
        cert_lifetime: "10s".into(),
        ..Default::default()
    })
    .unwrap();
    mesh.apply("00.yaml", MANIFEST).unwrap();
    mesh.wait_listening("b", "server", 8080).unwrap();
    mesh.wait_enrolled("a", "client").unwrap();
    mesh.wait_enrolled("b", "server").unwrap();
    let client = mesh.pod("a", "client").unwrap();
    let server = mesh.pod("b", "server").unwrap();
    let target = SocketAddr::new(server.ip4.into(), 8080);

    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let exchanges = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + STREAM_FOR;
    let mut workers = Vec::new();
    // Long-lived streams: one connection each for the whole minute.
    for s in 0..3 {
        let (client, failures, exchanges, stop) = (
            client.clone(),
            failures.clone(),
            exchanges.clone(),
            stop.clone(),
        );
        workers.push(std::thread::spawn(move || {
            let mut conn = match WhoConn::connect(&client, target) {
                Ok(c) => c,
                Err(e) => {
                    return failures
                        .lock()
                        .unwrap()
                        .push(format!("stream {s}: connect: {e}"));
                }
            };
            let mut i = 0u64;
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                match conn.who(&format!("s{s}-{i}")) {
                    Ok(r) if served_by(&r) == "server" => exchanges.fetch_add(1, Ordering::Relaxed),
                    other => {
                        return failures
                            .lock()
                            .unwrap()
                            .push(format!("stream {s} broke after {i} exchanges: {other:?}"));
                    }
                };
                i += 1;
                std::thread::sleep(Duration::from_millis(20)); // pacing of the load, not synchronization
            }
        }));
    }
    // New connections all along, each needing a valid certificate on both sides.
    {
        let (client, failures, exchanges, stop) = (
            client.clone(),
            failures.clone(),
            exchanges.clone(),
            stop.clone(),
        );
        workers.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let r =
                    WhoConn::connect(&client, target).and_then(|mut c| c.who(&format!("new-{i}")));
                match r {
                    Ok(r) if served_by(&r) == "server" => {
                        exchanges.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures
                        .lock()
                        .unwrap()
                        .push(format!("new connection {i} failed: {other:?}")),
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
    }

    // Meanwhile: leaf certificates renew every ~5 s; rotate the root in three observed steps.
    let base = (issued(&mesh, 0), issued(&mesh, 1));
    let step_wait = Duration::from_secs(20);
    wait_for(step_wait, "two leaf renewals on each node", || {
        Ok(issued(&mesh, 0) >= base.0 + 2 && issued(&mesh, 1) >= base.1 + 2)
    })
    .unwrap();
    ca(&mesh, "prepare-rotation");
    wait_for(step_wait, "every certificate to carry both roots", || {
        Ok([0, 1].iter().all(|&n| {
            let r = cert_roots(&mesh, n);
            !r.is_empty() && r.iter().all(|&x| x == 2)
        }))
    })
    .unwrap();
    let before_activate = (issued(&mesh, 0), issued(&mesh, 1));
    ca(&mesh, "activate");
    wait_for(step_wait, "certificates from the new root", || {
        Ok(issued(&mesh, 0) > before_activate.0 && issued(&mesh, 1) > before_activate.1)
    })
    .unwrap();
    // Old-signed certificates live at most one lifetime (10 s); renewals at half-life replace them.
    let after_activate = (issued(&mesh, 0), issued(&mesh, 1));
    wait_for(step_wait, "a renewal after activation on each node", || {
        Ok(issued(&mesh, 0) >= after_activate.0 + 2 && issued(&mesh, 1) >= after_activate.1 + 2)
    })
    .unwrap();
    ca(&mesh, "retire");
    wait_for(
        step_wait,
        "every certificate to carry only the new root",
        || {
            Ok([0, 1].iter().all(|&n| {
                let r = cert_roots(&mesh, n);
                !r.is_empty() && r.iter().all(|&x| x == 1)
            }))
        },
    )
    .unwrap();

    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let failures = failures.lock().unwrap();
    let total = exchanges.load(Ordering::Relaxed);
    eprintln!(
        "{total} exchanges in {STREAM_FOR:?}; leaf certificates issued: node-0 {}, node-1 {}",
        issued(&mesh, 0),
        issued(&mesh, 1)
    );
    assert!(
        failures.is_empty(),
        "{} failures during rotation, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(total > 500, "too little traffic to mean anything: {total}");
    assert!(
        issued(&mesh, 0) >= base.0 + 8,
        "leaf certificates did not rotate at half-life"
    );
}
