//! The manifests' RBAC, enforced by the API server double for service-account tokens: each
//! component, running for real with its ServiceAccount's token, does what it does without a
//! single 403 — meshd (`meshd run --kubernetes`: Lease, CA Secret, root ConfigMap, a
//! waypoint's ServiceAccount/Deployment/Service and Gateway status, TokenReview) and the
//! mesh-cni agent (its node's pods and namespaces, a watch of exactly its own DaemonSet whose
//! annotation is the uninstall trigger, its pod's annotation through pods/status) — and a
//! forbidden verb per ServiceAccount gets the real 403 (ztunnel cannot list pods, mesh-cni
//! cannot read Secrets nor other DaemonSets nor patch its own, meshd cannot delete namespaces,
//! read other Secrets or patch the mesh-cni DaemonSet: it must not be able to start an
//! uninstall).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testbed::kubeapi::{ApiOptions, ApiServer, TokenSpec};

const NS: &str = "mesh-system";
const WAIT: Duration = Duration::from_secs(30);
/// The uninstall request, as meshctl patches it onto the mesh-cni DaemonSet.
const TRIGGER: &str = r#"{"metadata":{"annotations":{"mesh.dev/uninstall":"true"}}}"#;
const AGENT_DS: &str = "/apis/apps/v1/namespaces/mesh-system/daemonsets/mesh-cni";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A scratch directory removed at the end of the test, pass or fail.
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("mesh-rbac-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A component process, killed when the test ends however it ends.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("running kubectl")
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The double with the CRDs and the dev overlay applied (as admin), RBAC enforced.
fn cluster(scratch: &Scratch) -> ApiServer {
    let api = ApiServer::start(ApiOptions::default()).expect("API double");
    for dir in ["manifests/crds", "manifests/overlays/dev"] {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join(dir))
            .output()
            .expect("kubectl kustomize");
        assert!(out.status.success(), "{dir}: {}", text(&out));
        let file = scratch.path("rendered.yaml");
        std::fs::write(&file, &out.stdout).expect("write");
        let out = kubectl(
            api.kubeconfig(),
            &[
                "apply",
                "--server-side",
                "--validate=false",
                "-f",
                file.to_str().expect("utf-8"),
            ],
        );
        assert!(out.status.success(), "applying {dir}: {}", text(&out));
    }
    api.enforce_rbac(true);
    api
}

fn token(api: &ApiServer, sa: &str, pod: Option<&str>, audience: &str) -> String {
    api.issue_token(TokenSpec {
        namespace: NS.into(),
        service_account: sa.into(),
        audiences: vec![audience.into()],
        pod: pod.map(|p| (p.into(), format!("uid-{p}"))),
        node: Some("n1".into()),
        expires_at: u64::MAX / 2,
    })
}

fn kubeconfig(api: &ApiServer, sa: &str, pod: Option<&str>) -> PathBuf {
    api.kubeconfig_for(&token(api, sa, pod, "https://kubernetes.default.svc"))
        .expect("kubeconfig")
}

fn user(sa: &str) -> String {
    format!("system:serviceaccount:{NS}:{sa}")
}

/// Asserts `sa` made requests and none was refused; returns how many it made.
fn never_forbidden(api: &ApiServer, sa: &str) -> usize {
    let reqs: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.user == user(sa))
        .collect();
    let refused: Vec<String> = reqs
        .iter()
        .filter(|r| r.code == 403)
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
        .collect();
    assert!(refused.is_empty(), "{sa} was refused: {refused:#?}");
    assert!(!reqs.is_empty(), "{sa} made no requests");
    reqs.len()
}

fn forbidden(kc: &Path, args: &[&str], sa: &str, what: &str) {
    let o = kubectl(kc, args);
    assert!(!o.status.success(), "{sa} may {args:?}");
    let t = text(&o);
    assert!(
        t.contains(&format!("User \"{}\" cannot {what}", user(sa))),
        "{sa} {args:?}: {t}"
    );
}

/// A PATCH straight to the API (kubectl patch GETs first, and a refused GET would hide
/// whether the patch itself is): asserts the 403 names `sa` and the patch verb.
fn patch_forbidden(api: &ApiServer, scratch: &Scratch, token: &str, path: &str, sa: &str) {
    let ca = scratch.path("ca.pem");
    std::fs::write(&ca, api.ca_pem()).expect("write CA");
    let o = Command::new("curl")
        .args(["-sS", "-X", "PATCH", "--cacert"])
        .arg(&ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .args(["-H", "Content-Type: application/merge-patch+json"])
        .args(["--data", TRIGGER, "-w", "\n%{http_code}"])
        .arg(format!("{}{path}", api.url()))
        .output()
        .expect("running curl");
    let t = text(&o);
    let short: String = t.chars().take(400).collect();
    assert!(
        t.trim_end().ends_with("\n403"),
        "{sa} PATCH {path}: {short}"
    );
    let why = format!(
        "User \"{}\" cannot patch resource \"daemonsets\" in API group \"apps\"",
        user(sa)
    );
    let status: Value = serde_json::from_str(t.trim_end().trim_end_matches("403"))
        .unwrap_or_else(|e| panic!("{sa} PATCH {path}: not a Status ({e}): {short}"));
    let message = status["message"].as_str().unwrap_or_default();
    assert!(message.contains(&why), "{sa} PATCH {path}: {short}");
}

fn bin(name: &str) -> PathBuf {
    let bins = localmesh::Bins::locate().expect("built binaries");
    let p = bins.meshd.with_file_name(name);
    assert!(p.exists(), "{} missing: cargo build --bins", p.display());
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[test]
fn meshd_works_with_its_service_account_and_no_more() {
    let scratch = Scratch::new("meshd");
    let api = cluster(&scratch);
    api.create(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "app", "labels": {"istio.io/dataplane-mode": "ambient"}}}))
        .expect("namespace app");
    api.create(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "app",
                     "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
    )
    .expect("waypoint gateway");
    let kc = kubeconfig(&api, "meshd", Some("meshd-0"));
    let _meshd = Proc(
        Command::new(bin("meshd"))
            .args([
                "run",
                "--kubernetes",
                "--namespace",
                NS,
                "--pod-name",
                "meshd-0",
            ])
            .arg("--kubeconfig")
            .arg(&kc)
            .arg("--state-dir")
            .arg(scratch.path("state"))
            .arg(format!("--listen=127.0.0.1:{}", free_port()))
            .args([
                "--lease-duration=3s",
                "--renew-deadline=2s",
                "--retry-period=500ms",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting meshd"),
    );
    let has = |av: &str, kind: &str, ns: &str, name: &str| api.get(av, kind, Some(ns), name);
    wait_until("meshd to hold the Lease", || {
        has("coordination.k8s.io/v1", "Lease", NS, "meshd-leader")
            .is_some_and(|l| l["spec"]["holderIdentity"] == "meshd-0")
    });
    wait_until("the CA Secret and root ConfigMap", || {
        has("v1", "Secret", NS, "mesh-ca").is_some()
            && has("v1", "ConfigMap", NS, "mesh-root-cert").is_some()
    });
    wait_until("the waypoint's objects", || {
        has("v1", "ServiceAccount", "app", "waypoint").is_some()
            && has("apps/v1", "Deployment", "app", "waypoint").is_some()
            && has("v1", "Service", "app", "waypoint").is_some()
    });
    wait_until("the waypoint Gateway's status", || {
        has("gateway.networking.k8s.io/v1", "Gateway", "app", "waypoint").is_some_and(|g| {
            g["status"]["conditions"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
        })
    });
    // TokenReview, as meshd reviews a ztunnel's token.
    let zt = token(&api, "ztunnel", Some("ztunnel-n1"), "mesh-ca");
    let review = scratch.path("review.json");
    std::fs::write(
        &review,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "spec": {"token": zt, "audiences": ["mesh-ca"]}})
        .to_string(),
    )
    .expect("write");
    let o = kubectl(
        &kc,
        &[
            "create",
            "--validate=false",
            "-o",
            "json",
            "-f",
            review.to_str().expect("utf-8"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("TokenReview JSON");
    assert_eq!(v["status"]["authenticated"], true, "{v}");
    never_forbidden(&api, "meshd");

    forbidden(
        &kc,
        &["delete", "namespace", "app"],
        "meshd",
        "delete resource \"namespaces\"",
    );
    api.create(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "other", "namespace": NS}}))
        .expect("secret");
    forbidden(
        &kc,
        &["get", "secret", "other", "-n", NS],
        "meshd",
        "get resource \"secrets\"",
    );
    forbidden(
        &kc,
        &["get", "secrets", "-n", "app"],
        "meshd",
        "list resource \"secrets\"",
    );
    // The uninstall trigger strips capture on every node: meshd cannot set it.
    let meshd_token = token(
        &api,
        "meshd",
        Some("meshd-0"),
        "https://kubernetes.default.svc",
    );
    patch_forbidden(&api, &scratch, &meshd_token, AGENT_DS, "meshd");
}

#[test]
fn the_mesh_cni_agent_works_with_its_service_account_and_no_more() {
    let scratch = Scratch::new("cni");
    let api = cluster(&scratch);
    let pod = "mesh-cni-n1";
    api.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": NS},
        "spec": {"nodeName": "n1", "containers": [{"name": "agent", "image": "mesh/mesh-cni:0.1.0"}]}}))
    .expect("agent pod");
    let kc = kubeconfig(&api, "mesh-cni", Some(pod));
    let conf = scratch.path("net.d");
    std::fs::create_dir_all(&conf).expect("conf dir");
    let _agent = Proc(
        Command::new(bin("mesh-cni"))
            .args(["agent", "--view=kube", "--node=n1", "--no-probe-snat"])
            .arg("--kubeconfig")
            .arg(&kc)
            .arg(format!("--pod-name={pod}"))
            .arg("--state-dir")
            .arg(scratch.path("state"))
            .arg("--plugin-socket")
            .arg(scratch.path("plugin.sock"))
            .arg("--zds-socket")
            .arg(scratch.path("ztunnel.sock"))
            .arg("--cni-conf-dir")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mesh-cni agent"),
    );
    let agent_did = |method: &str, path: &str| {
        api.requests()
            .iter()
            .any(|r| r.user == user("mesh-cni") && r.method == method && r.path.starts_with(path))
    };
    wait_until(
        "the agent to watch pods, namespaces and its DaemonSet",
        || {
            agent_did("GET", "/api/v1/pods")
                && agent_did("GET", "/api/v1/namespaces")
                && agent_did("GET", "/apis/apps/v1/namespaces/mesh-system/daemonsets")
        },
    );
    // The uninstall protocol: the annotation on its DaemonSet (as meshctl sets it), the
    // agent reports on its pod.
    let mut ds = api
        .get("apps/v1", "DaemonSet", Some(NS), "mesh-cni")
        .expect("the mesh-cni DaemonSet of the dev overlay");
    ds["metadata"]["annotations"]["mesh.dev/uninstall"] = json!("true");
    api.put(ds).expect("annotating the DaemonSet");
    wait_until("the agent to mark its pod uninstalled", || {
        api.get("v1", "Pod", Some(NS), pod)
            .is_some_and(|p| p["metadata"]["annotations"]["mesh.dev/uninstalled"] == "true")
    });
    never_forbidden(&api, "mesh-cni");

    forbidden(
        &kc,
        &["get", "secrets", "-n", NS],
        "mesh-cni",
        "list resource \"secrets\"",
    );
    forbidden(
        &kc,
        &["delete", "pod", pod, "-n", NS],
        "mesh-cni",
        "delete resource \"pods\"",
    );
    forbidden(
        &kc,
        &["get", "daemonset", "ztunnel", "-n", NS],
        "mesh-cni",
        "get resource \"daemonsets\" in API group \"apps\"",
    );
    forbidden(
        &kc,
        &["get", "daemonsets", "-n", NS],
        "mesh-cni",
        "list resource \"daemonsets\" in API group \"apps\"",
    );
    let agent_token = token(
        &api,
        "mesh-cni",
        Some(pod),
        "https://kubernetes.default.svc",
    );
    patch_forbidden(&api, &scratch, &agent_token, AGENT_DS, "mesh-cni");
}

#[test]
fn ztunnel_has_no_api_access() {
    let scratch = Scratch::new("zt");
    let api = cluster(&scratch);
    let kc = kubeconfig(&api, "ztunnel", Some("ztunnel-n1"));
    forbidden(
        &kc,
        &["get", "pods", "-A"],
        "ztunnel",
        "list resource \"pods\" in API group \"\" at the cluster scope",
    );
    forbidden(
        &kc,
        &["get", "configmap", "mesh-root-cert", "-n", NS],
        "ztunnel",
        "get resource \"configmaps\"",
    );
}
