//! Conformance of the API server double against the machine's `kubectl` (v1.32): discovery,
//! lists with selectors, `get -w`, server-side apply with conflicts, label, delete, and kinds
//! registered by CRDs. kubectl talks to the double over HTTPS with the double's kubeconfig.

mod kubeapi_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kubeapi_support::{NS, configmap, pod};
use serde_json::{Value, json};
use testbed::kubeapi::ApiServer;

const KUBECTL: &str = "/usr/bin/kubectl";

/// A double plus a private kubectl cache dir (discovery is cached per host:port, and ports
/// are reused between runs), removed on drop.
struct Env {
    server: ApiServer,
    dir: PathBuf,
}

impl Env {
    fn new() -> Option<Env> {
        if !Path::new(KUBECTL).exists() {
            eprintln!("skipping: {KUBECTL} is not installed");
            return None;
        }
        let server = kubeapi_support::start();
        let dir = std::env::temp_dir().join(format!(
            "kubeapi-kubectl-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Some(Env { server, dir })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(KUBECTL);
        c.arg("--kubeconfig")
            .arg(self.server.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .arg("--request-timeout=10s")
            .args(args)
            .env("HOME", &self.dir);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("kubectl runs")
    }

    /// Runs kubectl, expecting success; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn write(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("manifest written");
        p.to_string_lossy().into_owned()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

fn names(list_json: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(list_json).expect("kubectl printed JSON");
    let mut n: Vec<String> = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| o["metadata"]["name"].as_str().unwrap_or("").to_string())
        .collect();
    n.sort();
    n
}

fn lines(s: &str) -> Vec<&str> {
    let mut l: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    l.sort();
    l
}

#[test]
fn get_lists_pods_across_namespaces_as_json() {
    let Some(env) = Env::new() else { return };
    let s = &env.server;
    s.create(json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"other"}}))
        .unwrap();
    s.create(pod("a", Some("n1"))).unwrap();
    let mut b = pod("b", Some("n2"));
    b["metadata"]["namespace"] = json!("other");
    s.create(b).unwrap();
    let out = env.ok(&["get", "pods", "-A", "-o", "json"]);
    assert_eq!(names(&out), ["a", "b"]);
    let out = env.ok(&["get", "pods", "-n", "other", "-o", "json"]);
    assert_eq!(names(&out), ["b"]);
}

#[test]
fn get_honours_label_and_field_selectors() {
    let Some(env) = Env::new() else { return };
    let s = &env.server;
    for (name, labels) in [("ns-x", json!({"k":"v"})), ("ns-y", json!({"k":"w"}))] {
        s.create(json!({"apiVersion":"v1","kind":"Namespace",
                        "metadata":{"name":name,"labels":labels}}))
            .unwrap();
    }
    assert_eq!(
        lines(&env.ok(&["get", "ns", "-l", "k=v", "-o", "name"])),
        ["namespace/ns-x"]
    );
    assert_eq!(
        lines(&env.ok(&["get", "ns", "-l", "k", "-o", "name"])),
        ["namespace/ns-x", "namespace/ns-y"]
    );
    assert_eq!(
        lines(&env.ok(&["get", "ns", "-l", "k,k notin (v)", "-o", "name"])),
        ["namespace/ns-y"]
    );
    s.create(pod("p1", Some("n1"))).unwrap();
    s.create(pod("p2", Some("n2"))).unwrap();
    s.create(pod("p3", Some("n1"))).unwrap();
    let out = env.ok(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=n1",
        "-o",
        "name",
    ]);
    assert_eq!(lines(&out), ["pod/p1", "pod/p3"]);
}

/// Kills the child on drop (a failing test must not leave kubectl running).
struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn get_watch_prints_changes_as_they_happen() {
    let Some(env) = Env::new() else { return };
    let s = &env.server;
    s.create(pod("before", Some("n1"))).unwrap();
    // With --output-watch-events the columns read the watch event.
    let cols = "custom-columns=E:.type,NAME:.object.metadata.name,NODE:.object.spec.nodeName,\
                L:.object.metadata.labels.l";
    let mut child = env
        .command(&[
            "get",
            "pods",
            "-n",
            NS,
            "-w",
            "--output-watch-events",
            "--no-headers",
        ])
        .args(["-o", cols])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let _guard = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let next = || {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("a line from kubectl get -w in time");
        line.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    assert_eq!(next(), "ADDED before n1 <none>");
    s.create(pod("p", Some("n2"))).unwrap();
    assert_eq!(next(), "ADDED p n2 <none>");
    let mut labelled = pod("p", Some("n2"));
    labelled["metadata"]["labels"] = json!({"l":"1"});
    s.put(labelled).unwrap();
    assert_eq!(next(), "MODIFIED p n2 1");
    s.delete("v1", "Pod", Some(NS), "p").unwrap();
    assert_eq!(next(), "DELETED p n2 1");
}

#[test]
fn apply_server_side_creates_updates_and_reports_conflicts() {
    let Some(env) = Env::new() else { return };
    let manifest = |v: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: {NS}\n\
             data:\n  key: \"{v}\"\n  other: x\n"
        )
    };
    let f = env.write("cm.yaml", &manifest("1"));
    let out = env.ok(&["apply", "--server-side", "--validate=false", "-f", &f]);
    assert!(
        out.contains("configmap/applied serverside-applied"),
        "{out}"
    );
    let get = || {
        env.server
            .get("v1", "ConfigMap", Some(NS), "applied")
            .unwrap()
    };
    assert_eq!(get()["data"], json!({"key":"1","other":"x"}));
    assert_eq!(get()["metadata"]["managedFields"][0]["manager"], "kubectl");

    let f = env.write("cm.yaml", &manifest("2"));
    env.ok(&["apply", "--server-side", "--validate=false", "-f", &f]);
    assert_eq!(get()["data"]["key"], "2");

    // A second manager changing kubectl's field: refused, naming the conflict; forced: done.
    let f = env.write("cm.yaml", &manifest("3"));
    let args = [
        "apply",
        "--server-side",
        "--validate=false",
        "--field-manager",
        "second",
    ];
    let out = env.run(&[&args[..], &["-f", &f]].concat());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("conflict"), "{err}");
    assert!(err.contains(".data.key"), "{err}");
    assert_eq!(get()["data"]["key"], "2");
    env.ok(&[&args[..], &["--force-conflicts", "-f", &f]].concat());
    assert_eq!(get()["data"]["key"], "3");
}

#[test]
fn label_and_delete() {
    let Some(env) = Env::new() else { return };
    let s = &env.server;
    s.create(pod("p", Some("n1"))).unwrap();
    s.create(configmap("c", json!({}), "1")).unwrap();
    env.ok(&["label", "pod", "p", "-n", NS, "team=blue"]);
    let labels = s.get("v1", "Pod", Some(NS), "p").unwrap()["metadata"]["labels"].clone();
    assert_eq!(labels, json!({"team":"blue"}));
    env.ok(&["label", "pod", "p", "-n", NS, "team-"]);
    let p = s.get("v1", "Pod", Some(NS), "p").unwrap();
    assert!(p["metadata"]["labels"].get("team").is_none(), "{p}");

    let out = env.ok(&["delete", "pod", "p", "-n", NS]);
    assert!(out.contains("pod \"p\" deleted"), "{out}");
    assert!(s.get("v1", "Pod", Some(NS), "p").is_none());
    env.ok(&["delete", "configmap", "c", "-n", NS]);
    assert!(s.get("v1", "ConfigMap", Some(NS), "c").is_none());
    let out = env.run(&["delete", "pod", "p", "-n", NS]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
}

#[test]
fn get_kinds_registered_by_crds() {
    let Some(env) = Env::new() else { return };
    let s = &env.server;
    s.install_mesh_crds().unwrap();
    s.create(
        json!({"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy",
                    "metadata":{"name":"deny-all","namespace":NS},"spec":{}}),
    )
    .unwrap();
    s.create(
        json!({"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute",
                    "metadata":{"name":"r","namespace":NS},"spec":{"parentRefs":[{"name":"w"}]}}),
    )
    .unwrap();
    let out = env.ok(&["get", "authorizationpolicies", "-A", "-o", "name"]);
    assert_eq!(
        lines(&out),
        ["authorizationpolicy.security.istio.io/deny-all"]
    );
    let out = env.ok(&[
        "get",
        "httproutes.gateway.networking.k8s.io",
        "-n",
        NS,
        "-o",
        "json",
    ]);
    assert_eq!(names(&out), ["r"]);
    let out = env.ok(&["get", "gatewayclasses", "-o", "name"]);
    assert_eq!(out.trim(), "");
}

#[test]
fn apply_server_side_merges_containers_by_name_across_managers() {
    let Some(env) = Env::new() else { return };
    let deployment = |containers: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n  namespace: {NS}\n\
             spec:\n  template:\n    spec:\n      containers:\n{containers}"
        )
    };
    let c = |name: &str, image: &str| format!("      - name: {name}\n        image: {image}\n");
    let apply = |file: &str, manager: &str| {
        let f = env.dir.join(file).to_string_lossy().into_owned();
        let args = [
            "apply",
            "--server-side",
            "--validate=false",
            "--field-manager",
            manager,
        ];
        env.ok(&[&args[..], &["-f", &f]].concat());
    };
    env.write(
        "mine.yaml",
        &deployment(&(c("app", "a:1") + &c("side", "s:1"))),
    );
    apply("mine.yaml", "owner");
    env.write("theirs.yaml", &deployment(&c("extra", "e:1")));
    apply("theirs.yaml", "injector");
    // The owner drops `side` and bumps `app`: `extra` is the injector's and stays.
    env.write("mine.yaml", &deployment(&c("app", "a:2")));
    apply("mine.yaml", "owner");
    let d = env
        .server
        .get("apps/v1", "Deployment", Some(NS), "d")
        .unwrap();
    let images: Vec<(String, String)> = d["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").into(),
                c["image"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(
        images,
        [
            ("app".to_string(), "a:2".to_string()),
            ("extra".into(), "e:1".into())
        ]
    );
    // The injector changing the owner's image is a conflict naming the container.
    env.write("theirs.yaml", &deployment(&c("app", "evil:1")));
    let f = env.dir.join("theirs.yaml").to_string_lossy().into_owned();
    let out = env.run(&[
        "apply",
        "--server-side",
        "--validate=false",
        "--field-manager",
        "injector",
        "-f",
        &f,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(".spec.template.spec.containers[name=\"app\"].image"),
        "{err}"
    );
}
