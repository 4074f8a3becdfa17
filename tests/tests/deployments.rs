//! Local mode runs Deployments: replicas become pods named as Kubernetes names them, scaling
//! and template edits apply live (a rolling update under a steady request stream drops
//! nothing), and an invalid Deployment is refused while the running pods keep serving. Real
//! traffic: WHO requests from a pod through the Service VIP, answered by `mesh-echo` with its
//! pod name.
//!
//! One mesh for the whole lifecycle (each step starts from the previous one's pods); it is torn
//! down even when an assertion fails.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{WhoConn, manifests, privileged, served_by};

const FILE: &str = "20-web.yaml";

/// Deployment `shop/web` (`replicas`, template label `version`; an HTTP readiness probe on a
/// second port, so a new pod is selectable only once its probe passes) and its Service.
fn web(replicas: i64, version: &str) -> String {
    web_with(replicas, version, "{app: web}")
}

fn web_with(replicas: i64, version: &str, selector: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: shop}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {selector}}}
  template:
    metadata: {{labels: {{app: web, version: {version}}}}}
    spec:
      serviceAccountName: web
      containers:
      - name: echo
        command: [mesh-echo, serve]
        args: ["--port", "8080", "--http-port", "8081"]
        ports: [{{name: http, containerPort: 8080}}, {{name: probe, containerPort: 8081}}]
        readinessProbe: {{httpGet: {{path: /ready, port: probe}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"#
    )
}

/// The IPv4 VIP of `file`'s Service, at `port`, as rendered for meshd.
fn vip_in(mesh: &LocalMesh, file: &str, port: u16) -> SocketAddr {
    let text = std::fs::read_to_string(mesh.config_dir.join(file)).unwrap();
    let docs = localmesh::render::parse_docs(file, &text).unwrap();
    let svc = docs
        .iter()
        .find(|d| localmesh::render::kind(d) == "Service")
        .unwrap();
    let ip = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    SocketAddr::new(ip, port)
}

fn vip(mesh: &LocalMesh) -> SocketAddr {
    vip_in(mesh, FILE, 80)
}

/// One WHO over a new connection from the client pod: who answered.
fn ask(client: &testbed::Pod, to: SocketAddr) -> anyhow::Result<String> {
    let mut c = WhoConn::connect(client, to)?;
    Ok(served_by(&c.who("hi")?).to_string())
}

/// Sends requests until every pod in `pods` has answered (each must succeed and come from
/// one of them); returns how many it took.
fn reach_all(client: &testbed::Pod, to: SocketAddr, pods: &[String]) -> usize {
    let want: BTreeSet<&str> = pods.iter().map(String::as_str).collect();
    let mut seen = BTreeSet::new();
    for n in 1..=300 {
        let who = ask(client, to).unwrap();
        assert!(
            want.contains(who.as_str()),
            "{who} answered, not one of {want:?}"
        );
        seen.insert(who);
        if seen.len() == want.len() {
            return n;
        }
    }
    panic!("300 requests reached only {seen:?} of {want:?}");
}

/// One mesh, two independent cases: the client pod and namespace are all they share.
#[test]
fn deployments_in_local_mode() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions::default()).expect("start local mesh");
    mesh.apply("00-ns.yaml", &manifests::namespace("shop", true))
        .unwrap();
    mesh.apply(
        "10-client.yaml",
        &manifests::pod("shop", "client", 0, "client", &[]),
    )
    .unwrap();
    mesh.wait_enrolled("shop", "client").unwrap();
    let client = mesh.pod("shop", "client").unwrap();
    run_scale_and_roll_out_live(&mesh, &client);
    waypoint_gateway_is_run_and_removed(&mesh);
}

fn run_scale_and_roll_out_live(mesh: &LocalMesh, client: &testbed::Pod) {
    // 3 replicas: 3 pods named <deployment>-<template hash>-<5 chars>, all behind the VIP.
    mesh.apply(FILE, &web(3, "v1")).unwrap();
    let v1 = mesh.pods_of("shop", "web");
    assert_eq!(v1.len(), 3, "{v1:?}");
    let hash = check_names(&v1);
    let to = vip(mesh);
    let rendered = std::fs::read_to_string(mesh.config_dir.join(FILE)).unwrap();
    assert!(rendered.contains("kind: Deployment"), "{rendered}");
    assert!(
        rendered.contains(&format!("pod-template-hash: {hash}")),
        "{rendered}"
    );
    reach_all(client, to, &v1);

    // Scale to 1: the oldest pod stays and answers everything; back to 3: all answer again.
    mesh.apply(FILE, &web(1, "v1")).unwrap();
    assert_eq!(mesh.pods_of("shop", "web"), v1[..1], "newest go first");
    for _ in 0..20 {
        assert_eq!(ask(client, to).unwrap(), v1[0]);
    }
    mesh.apply(FILE, &web(3, "v1")).unwrap();
    let again = mesh.pods_of("shop", "web");
    assert_eq!((again.len(), &again[0]), (3, &v1[0]), "{again:?}");
    assert_eq!(check_names(&again), hash, "a scale keeps the template hash");
    assert_eq!(vip(mesh), to, "a re-applied Service keeps its VIP");
    reach_all(client, to, &again);

    // A template edit under a steady request stream: nothing fails, and afterwards only the
    // new template's pods answer.
    let stream = Stream::start(client.clone(), to);
    wait_for(Duration::from_secs(10), "the stream to be flowing", || {
        Ok(stream.answers().len() >= 20)
    })
    .unwrap();
    let started = std::time::Instant::now();
    mesh.apply(FILE, &web(3, "v2")).unwrap();
    let took = started.elapsed();
    let during = stream.answers().len();
    wait_for(
        Duration::from_secs(20),
        "50 requests after the rollout",
        || Ok(stream.answers().len() >= during + 50),
    )
    .unwrap();
    let (answers, failures) = stream.stop();
    let v2 = mesh.pods_of("shop", "web");
    assert_eq!(v2.len(), 3, "{v2:?}");
    let new_hash = check_names(&v2);
    assert_ne!(new_hash, hash, "a template edit changes the hash");
    assert!(
        v2.iter().all(|p| !again.contains(p)),
        "old pods left: {v2:?}"
    );
    assert_eq!(
        failures,
        Vec::<String>::new(),
        "requests failed during the rollout"
    );
    let after: BTreeSet<&String> = answers[during..].iter().collect();
    assert!(
        after.iter().all(|p| v2.contains(p)),
        "after the rollout, answers from {after:?}; the new pods are {v2:?}"
    );
    assert!(
        answers[..during].iter().any(|p| again.contains(p)),
        "the old pods served the stream before the rollout"
    );
    eprintln!(
        "rollout of 3 pods: {took:?}; {} requests, 0 failed, {} after it returned",
        answers.len(),
        answers.len() - during
    );
    reach_all(client, to, &v2);

    // A Deployment whose selector does not match its template is refused naming the field;
    // nothing changes and the running pods keep serving.
    let err = mesh
        .apply(FILE, &web_with(3, "v3", "{app: shop}"))
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(FILE)
            && msg.contains("Deployment shop/web")
            && msg.contains("spec.template.metadata.labels")
            && msg.contains("selector"),
        "{msg}"
    );
    assert_eq!(mesh.pods_of("shop", "web"), v2);
    reach_all(client, to, &v2);

    // The Deployment leaves the file: its pods go, the Service stays (with no endpoints).
    let service = web(3, "v2");
    let service = &service[service.find("---").unwrap()..];
    mesh.apply(FILE, service).unwrap();
    assert_eq!(mesh.pods_of("shop", "web"), Vec::<String>::new());
    for p in &v2 {
        assert!(mesh.pod("shop", p).is_err(), "{p} still runs");
    }
    assert_eq!(vip(mesh), to);
}

/// A waypoint Gateway: meshd renders its ServiceAccount, Deployment and Service into its
/// `--write-dir`; local mode applies them (`generated.<ns>.<gw>.yaml`), runs the waypoint
/// binary in the pod with what it needs to reach meshd as the Gateway's service account, and
/// removes it all when the Gateway goes.
/// (Its pod is ready only once the waypoint has its config and certificate from meshd, so
/// readiness shows the address and token work.)
fn waypoint_gateway_is_run_and_removed(mesh: &LocalMesh) {
    mesh.apply("30-waypoint.yaml", GATEWAY).unwrap();
    let pods = mesh.wait_for_pods("shop", "waypoint", 1).unwrap();
    let generated = "generated.shop.waypoint.yaml";
    let rendered = std::fs::read_to_string(mesh.config_dir.join(generated)).unwrap();
    assert!(rendered.contains("kind: ServiceAccount"), "{rendered}");
    // The waypoint process's environment: meshd's address, a token file for its service
    // account (root's alone), its node.
    let env = process_env(mesh, "shop", &pods[0], 15021);
    assert_eq!(
        env.get("MESHD_ADDRESS"),
        Some(&format!("unix:{}", mesh.socket.display())),
        "{env:?}"
    );
    assert!(env.contains_key("NODE_NAME"), "{env:?}");
    let token = env.get("MESH_TOKEN_FILE").expect("MESH_TOKEN_FILE");
    let meta = std::fs::metadata(token).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(token).unwrap();
    assert!(
        text.starts_with("sa:shop:waypoint:"),
        "token for the wrong account: {text}"
    );

    mesh.remove("30-waypoint.yaml").unwrap();
    wait_for(
        Duration::from_secs(20),
        "the waypoint's pods and file to go",
        || {
            Ok(mesh.pods_of("shop", "waypoint").is_empty()
                && !mesh.config_dir.join(generated).exists())
        },
    )
    .unwrap();
    assert!(
        mesh.pod("shop", &pods[0]).is_err(),
        "{} still runs",
        pods[0]
    );
}

const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

/// With meshd served over TLS (as on a cluster), a waypoint pod gets meshd's TLS address and
/// the mesh root to verify it, and becomes ready through them.
#[test]
fn waypoint_pods_reach_meshd_over_tls() {
    if !privileged() {
        return;
    }
    let opts = MeshOptions {
        meshd_tls: true,
        ..MeshOptions::default()
    };
    let mesh = LocalMesh::start(opts).expect("start local mesh");
    mesh.apply("00-ns.yaml", &manifests::namespace("shop", true))
        .unwrap();
    mesh.apply("30-waypoint.yaml", GATEWAY).unwrap();
    let pods = mesh.wait_for_pods("shop", "waypoint", 1).unwrap();
    let env = process_env(&mesh, "shop", &pods[0], 15021);
    assert_eq!(
        env.get("MESHD_ADDRESS").map(String::as_str),
        Some(localmesh::MESHD_TLS_ADDR),
        "{env:?}"
    );
    let root = mesh.mesh_root().display().to_string();
    assert_eq!(env.get("MESHD_CA"), Some(&root), "{env:?}");
}

/// The environment of the process listening on `port` in the pod.
fn process_env(
    mesh: &LocalMesh,
    ns: &str,
    pod: &str,
    port: u16,
) -> std::collections::HashMap<String, String> {
    let out = mesh
        .exec(ns, pod, &["ss", "-Hltnp", &format!("sport = :{port}")])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let pid = text
        .split("pid=")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no process listens on {port} in {pod}: {text}"));
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Every name is `web-<hash>-<5 safe chars>` with one hash; returns it.
fn check_names(pods: &[String]) -> String {
    const SAFE: &str = "bcdfghjklmnpqrstvwxz2456789";
    let mut hashes = BTreeSet::new();
    for p in pods {
        let parts: Vec<&str> = p.split('-').collect();
        assert_eq!(parts.len(), 3, "{p}");
        assert_eq!(parts[0], "web", "{p}");
        assert!(
            !parts[1].is_empty() && parts[1].chars().all(|c| SAFE.contains(c)),
            "{p}"
        );
        assert!(
            parts[2].len() == 5 && parts[2].chars().all(|c| SAFE.contains(c)),
            "{p}"
        );
        hashes.insert(parts[1].to_string());
    }
    assert_eq!(hashes.len(), 1, "{pods:?}");
    hashes.into_iter().next().unwrap_or_default()
}

/// A client loop in the client pod: one WHO per new connection, back to back.
struct Stream {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<String>>>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(client: testbed::Pod, to: SocketAddr) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, a, f) = (stop.clone(), answers.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match ask(&client, to) {
                    Ok(who) => a.lock().unwrap().push(who),
                    Err(e) => f.lock().unwrap().push(format!("{e:#}")),
                }
            }
        });
        Stream {
            stop,
            answers,
            failures,
            thread: Some(thread),
        }
    }

    fn answers(&self) -> Vec<String> {
        self.answers.lock().unwrap().clone()
    }

    fn stop(mut self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (self.answers(), self.failures.lock().unwrap().clone())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
