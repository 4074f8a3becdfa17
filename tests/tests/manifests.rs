//! The install manifests (`manifests/`) as a cluster admin meets them: every overlay renders
//! with `kubectl kustomize`, validates offline against Kubernetes' schemas
//! (`kubernetes-validate --strict`), its custom resources and the README's and examples'
//! Istio/Gateway API YAML validate against the upstream CRD schemas (../shared/schemas), the
//! shipped CRDs are upstream's verbatim, and everything applies to the API server double with
//! `kubectl apply --server-side` (twice: a re-apply is clean). The validators are shown to
//! fail on a broken document, so a pass means something.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testbed::kubeapi::{ApiOptions, ApiServer};

/// Kubernetes version the manifests are validated against (k8s-openapi's feature, v1_33).
const K8S_VERSION: &str = "1.33";
const OVERLAYS: [&str; 2] = ["dev", "ha"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests() -> PathBuf {
    repo().join("manifests")
}

/// The upstream CRD YAML: `$MESH_SCHEMAS_DIR`, else the copies in `tests/schemas/` (Istio
/// 1.30.3's and Gateway API v1.6.1's, unmodified, with their licenses).
fn schemas() -> PathBuf {
    let dir = std::env::var_os("MESH_SCHEMAS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("tests/schemas"));
    assert!(
        dir.join("istio-1.30.3").is_dir() && dir.join("gateway-api-v1.6.1").is_dir(),
        "upstream CRD schemas not found in {} (set MESH_SCHEMAS_DIR)",
        dir.display()
    );
    dir
}

/// Every upstream CRD file, as `--crds` arguments of the validator.
fn upstream_crds() -> Vec<PathBuf> {
    let s = schemas();
    let mut v = vec![s.join("istio-1.30.3/customresourcedefinitions.gen.yaml")];
    let mut gw: Vec<PathBuf> = std::fs::read_dir(s.join("gateway-api-v1.6.1"))
        .expect("listing the Gateway API schemas")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    gw.sort();
    v.extend(gw);
    v
}

/// A scratch directory removed at the end of the test, pass or fail.
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!(
            "mesh-manifests-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("writing scratch file");
        p
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (is it installed? `cargo xtask deps`)"))
}

fn kustomize(dir: &Path) -> String {
    let out = run(Command::new("kubectl").arg("kustomize").arg(dir));
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        text(&out)
    );
    String::from_utf8(out.stdout).expect("kustomize output is UTF-8")
}

fn k8s_validate(file: &Path) -> Output {
    run(Command::new("kubernetes-validate")
        .args(["--strict", "--no-warn", "-k", K8S_VERSION])
        .arg(file))
}

fn crd_validate(files: &[PathBuf]) -> Output {
    let mut c = Command::new("python3");
    c.arg(repo().join("tests/python/crd_validate.py"));
    for crd in upstream_crds() {
        c.arg("--crds").arg(crd);
    }
    run(c.args(files))
}

/// The documents of a YAML file, parsed by the validators' YAML library (not ours).
fn docs(file: &Path) -> Vec<serde_json::Value> {
    let out = run(Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(file));
    assert!(
        out.status.success(),
        "YAML {}: {}",
        file.display(),
        text(&out)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the YAML parser")
}

fn kinds(docs: &[serde_json::Value]) -> Vec<String> {
    let mut k: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    k.sort();
    k
}

/// The fenced blocks of a Markdown file that are Kubernetes objects.
fn yaml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start().starts_with("```")) {
            (None, true) => current = Some(String::new()),
            (Some(_), true) => {
                let b = current.take().unwrap_or_default();
                if b.contains("apiVersion:") && b.contains("kind:") {
                    blocks.push(b);
                }
            }
            (Some(b), false) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, false) => {}
        }
    }
    blocks
}

#[test]
fn every_overlay_renders_and_validates_against_kubernetes_schemas() {
    let scratch = Scratch::new("k8s");
    for overlay in OVERLAYS {
        let rendered = kustomize(&manifests().join("overlays").join(overlay));
        let file = scratch.write(&format!("{overlay}.yaml"), &rendered);
        let out = k8s_validate(&file);
        assert!(out.status.success(), "overlay {overlay}: {}", text(&out));
        let d = docs(&file);
        let k = kinds(&d);
        for want in [
            "Namespace/mesh-system",
            "Deployment/meshd",
            "Service/meshd",
            "DaemonSet/ztunnel",
            "DaemonSet/mesh-cni",
            "ServiceAccount/meshd",
            "ServiceAccount/ztunnel",
            "ServiceAccount/mesh-cni",
            "GatewayClass/istio-waypoint",
        ] {
            assert!(
                k.contains(&want.to_string()),
                "overlay {overlay} lacks {want}: {k:?}"
            );
        }
        // Nothing may grant ztunnel API access.
        for b in d
            .iter()
            .filter(|d| d["kind"].as_str().is_some_and(|k| k.ends_with("Binding")))
        {
            assert!(
                !b["subjects"].to_string().contains("\"ztunnel\""),
                "overlay {overlay}: {b} binds ztunnel"
            );
        }
        let find = |kind: &str, name: &str| {
            d.iter()
                .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("{kind} {name}"))
        };
        let zt = &find("DaemonSet", "ztunnel")["spec"];
        assert_eq!(zt["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
        assert_eq!(zt["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);
        assert_ne!(zt["template"]["spec"]["hostNetwork"], true);
        let caps = &zt["template"]["spec"]["containers"][0]["securityContext"]["capabilities"];
        assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
        assert_eq!(
            caps["add"],
            serde_json::json!(["NET_ADMIN", "SYS_ADMIN", "NET_RAW", "BPF", "PERFMON"])
        );
        let images: Vec<String> = d
            .iter()
            .flat_map(|o| {
                o["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|c| c["image"].as_str().unwrap_or("").to_string())
            .collect();
        let tag = env!("CARGO_PKG_VERSION");
        for i in &images {
            assert!(
                ["meshd", "ztunnel", "mesh-cni"]
                    .iter()
                    .any(|n| *i == format!("mesh/{n}:{tag}")),
                "overlay {overlay}: image {i} is not one `cargo xtask images` builds"
            );
        }
        let meshd = find("Deployment", "meshd")["spec"]["replicas"].as_u64();
        match overlay {
            "dev" => assert_eq!(meshd, Some(1)),
            _ => assert!(meshd >= Some(2), "ha runs meshd replicated"),
        }
    }
    // The validator is not a rubber stamp: a wrong type fails it.
    let broken =
        kustomize(&manifests().join("overlays/dev")).replacen("replicas: 1", "replicas: one", 1);
    let out = k8s_validate(&scratch.write("broken.yaml", &broken));
    assert!(
        !out.status.success(),
        "a string replicas passed: {}",
        text(&out)
    );
}

#[test]
fn custom_resources_readme_and_examples_validate_against_upstream_crds() {
    let scratch = Scratch::new("crd");
    let mut files = Vec::new();
    for overlay in OVERLAYS {
        let rendered = kustomize(&manifests().join("overlays").join(overlay));
        files.push(scratch.write(&format!("{overlay}.yaml"), &rendered));
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    for (i, b) in yaml_blocks(&readme).iter().enumerate() {
        files.push(scratch.write(&format!("readme-{i}.yaml"), b));
    }
    let mut examples: Vec<PathBuf> = std::fs::read_dir(repo().join("examples/demo"))
        .expect("examples/demo")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    files.extend(examples);
    let out = crd_validate(&files);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // Each overlay's GatewayClass and the examples' policies and routes were checked.
    let validated: u32 = t
        .split("validated ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        validated >= 2 + 8,
        "too few custom resources validated: {t}"
    );

    let bad = scratch.write(
        "bad.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\n\
         spec:\n  rules:\n  - from:\n    - source:\n        principalz: [a]\n",
    );
    let out = crd_validate(&[bad]);
    assert!(
        !out.status.success(),
        "a misspelt field passed: {}",
        text(&out)
    );
    assert!(text(&out).contains("principalz"), "{}", text(&out));
}

#[test]
fn shipped_crds_are_upstreams_verbatim_and_cover_what_meshd_reads() {
    let scratch = Scratch::new("verbatim");
    let ours = docs(&scratch.write("crds.yaml", &kustomize(&manifests().join("crds"))));
    let mut upstream = Vec::new();
    for f in upstream_crds() {
        upstream.extend(docs(&f));
    }
    let mut names = Vec::new();
    for crd in &ours {
        let name = crd["metadata"]["name"].as_str().expect("CRD name");
        let up = upstream
            .iter()
            .find(|u| u["metadata"]["name"] == name && u["kind"] == "CustomResourceDefinition")
            .unwrap_or_else(|| panic!("{name} is not an upstream CRD"));
        let mut ours = crd.clone();
        // The only change: the label that tells meshctl these CRDs are ours.
        let labels = ours["metadata"]["labels"]
            .as_object_mut()
            .expect("our CRDs carry a label");
        assert_eq!(
            labels.remove("app.kubernetes.io/managed-by"),
            Some(serde_json::json!("mesh"))
        );
        if labels.is_empty() && up["metadata"].get("labels").is_none() {
            ours["metadata"]
                .as_object_mut()
                .expect("metadata")
                .remove("labels");
        }
        assert!(ours == *up, "{name} differs from upstream");
        names.push(name.to_string());
    }
    names.sort();
    assert_eq!(
        names,
        [
            "authorizationpolicies.security.istio.io",
            "destinationrules.networking.istio.io",
            "gatewayclasses.gateway.networking.k8s.io",
            "gateways.gateway.networking.k8s.io",
            "grpcroutes.gateway.networking.k8s.io",
            "httproutes.gateway.networking.k8s.io",
            "peerauthentications.security.istio.io",
            "requestauthentications.security.istio.io",
            "virtualservices.networking.istio.io",
        ]
    );
}

/// Built-in kinds without a namespace that an install could ship. Custom kinds' scope comes
/// from the shipped CRDs; any other kind counts as namespaced.
const CLUSTER_SCOPED_BUILTINS: [&str; 9] = [
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
];

#[test]
fn cluster_scoped_objects_carry_no_namespace_and_the_rest_are_in_mesh_system() {
    // kustomize stamps `namespace:` on every kind it does not know to be cluster-scoped
    // (custom kinds such as GatewayClass): the API server drops it, but GitOps tools and
    // `kubectl diff` trip on it and it misleads whoever reads the render.
    let scratch = Scratch::new("scope");
    let crds = docs(&scratch.write("crds.yaml", &kustomize(&manifests().join("crds"))));
    let mut cluster_kinds: Vec<String> = crds
        .iter()
        .filter(|c| c["spec"]["scope"] == "Cluster")
        .filter_map(|c| c["spec"]["names"]["kind"].as_str().map(str::to_string))
        .collect();
    assert!(
        cluster_kinds.iter().any(|k| k == "GatewayClass"),
        "{cluster_kinds:?}"
    );
    cluster_kinds.extend(CLUSTER_SCOPED_BUILTINS.iter().map(|k| k.to_string()));
    let mut renders = vec![("crds".to_string(), crds)];
    for overlay in OVERLAYS {
        let file = scratch.write(
            &format!("{overlay}.yaml"),
            &kustomize(&manifests().join("overlays").join(overlay)),
        );
        renders.push((overlay.to_string(), docs(&file)));
    }
    for (render, objects) in renders {
        let mut cluster_scoped = Vec::new();
        for o in &objects {
            let kind = o["kind"].as_str().unwrap_or("?");
            let name = o["metadata"]["name"].as_str().unwrap_or("?");
            let ns = &o["metadata"]["namespace"];
            if cluster_kinds.iter().any(|k| k == kind) {
                assert!(
                    ns.is_null(),
                    "{render}: cluster-scoped {kind} {name} renders with namespace {ns}"
                );
                cluster_scoped.push(format!("{kind}/{name}"));
            } else {
                assert_eq!(ns, "mesh-system", "{render}: {kind} {name}");
            }
        }
        if render != "crds" {
            for want in ["Namespace/mesh-system", "GatewayClass/istio-waypoint"] {
                assert!(
                    cluster_scoped.iter().any(|c| c == want),
                    "{render} lacks {want}: {cluster_scoped:?}"
                );
            }
        }
    }
}

/// `kubectl apply --server-side` of `file` to the double as its admin.
pub fn apply(api: &ApiServer, file: &Path) -> Output {
    run(Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(api.kubeconfig())
        .args([
            "apply",
            "--server-side",
            // Schemas are checked offline above; the double serves no /openapi for kubectl.
            "--validate=false",
            "--field-manager=mesh-install",
            "-f",
        ])
        .arg(file))
}

#[test]
fn every_overlay_applies_to_the_api_double_server_side() {
    let scratch = Scratch::new("apply");
    let crds = scratch.write("crds.yaml", &kustomize(&manifests().join("crds")));
    for overlay in OVERLAYS {
        let api = ApiServer::start(ApiOptions::default()).expect("API double");
        let out = apply(&api, &crds);
        assert!(out.status.success(), "CRDs: {}", text(&out));
        let file = scratch.write(
            &format!("{overlay}.yaml"),
            &kustomize(&manifests().join("overlays").join(overlay)),
        );
        let out = apply(&api, &file);
        assert!(out.status.success(), "overlay {overlay}: {}", text(&out));
        // What was applied is there, as rendered.
        for d in docs(&file) {
            let (av, kind) = (
                d["apiVersion"].as_str().unwrap_or(""),
                d["kind"].as_str().unwrap_or(""),
            );
            let name = d["metadata"]["name"].as_str().unwrap_or("");
            let live = api
                .get(av, kind, d["metadata"]["namespace"].as_str(), name)
                .unwrap_or_else(|| panic!("overlay {overlay}: {kind} {name} not in the API"));
            assert_eq!(
                live["metadata"]["labels"]["app.kubernetes.io/part-of"],
                "mesh"
            );
        }
        // A re-apply (an upgrade with nothing changed) changes nothing: no object is written
        // again (its resourceVersion stays), as with a real API server's no-op apply.
        let versions = |api: &ApiServer| -> Vec<(String, serde_json::Value)> {
            docs(&file)
                .iter()
                .map(|d| {
                    let (av, kind) = (
                        d["apiVersion"].as_str().unwrap_or(""),
                        d["kind"].as_str().unwrap_or(""),
                    );
                    let name = d["metadata"]["name"].as_str().unwrap_or("");
                    let rv = api
                        .get(av, kind, d["metadata"]["namespace"].as_str(), name)
                        .map(|o| o["metadata"]["resourceVersion"].clone())
                        .unwrap_or_default();
                    (format!("{kind} {name}"), rv)
                })
                .collect()
        };
        let before = versions(&api);
        let out = apply(&api, &file);
        assert!(
            out.status.success(),
            "overlay {overlay} re-apply: {}",
            text(&out)
        );
        assert_eq!(
            versions(&api),
            before,
            "overlay {overlay}: a re-apply wrote objects"
        );
    }
}

#[test]
fn every_containers_arguments_are_accepted_by_its_binary() {
    let scratch = Scratch::new("args");
    let bins = localmesh::Bins::locate().expect("built binaries");
    let file = scratch.write("dev.yaml", &kustomize(&manifests().join("overlays/dev")));
    let mut checked = 0;
    for d in docs(&file) {
        let containers = d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for c in containers {
            let image = c["image"].as_str().unwrap_or_default();
            let name = image
                .strip_prefix("mesh/")
                .and_then(|n| n.split(':').next())
                .unwrap_or_else(|| panic!("image {image}"));
            let bin = bins.meshd.with_file_name(name);
            let args: Vec<String> = c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(|a| kubelet_expand(a, &c)))
                .collect();
            // clap rejects an unknown flag or value before it honours a trailing --help.
            let out = run(Command::new(&bin).args(&args).arg("--help"));
            assert!(
                out.status.success(),
                "{} {args:?}: {}",
                bin.display(),
                text(&out)
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 4, "meshd, ztunnel, mesh-cni agent and install");
}

/// An argument as the kubelet hands it to the container: each `$(NAME)` of a variable in the
/// container's `env` replaced by its value (`valueFrom` ones by a sample, e.g. a node name),
/// `$$` by `$`; other references stay as written.
fn kubelet_expand(arg: &str, container: &serde_json::Value) -> String {
    let value_of = |name: &str| {
        let env = container["env"].as_array()?;
        let e = env.iter().find(|e| e["name"] == name)?;
        match e["value"].as_str() {
            Some(v) => Some(v.to_string()),
            None if e.get("valueFrom").is_some() => Some("node-0".to_string()),
            None => Some(String::new()),
        }
    };
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')'))
            && let Some(v) = value_of(name)
        {
            out.push_str(&v);
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out + rest
}
