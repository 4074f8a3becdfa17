//! meshctl's waypoint commands, run as the real binary against temporary config and status
//! directories laid out as local mode's (no mesh needed): the files it writes, the documents
//! it keeps, what it prints and its exit codes.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::{Value, json};

/// A config directory (0700, as local mode's run directory is) and a status directory.
struct Dirs {
    _root: tempfile::TempDir,
    config: PathBuf,
    status: PathBuf,
}

impl Dirs {
    fn new() -> Dirs {
        let root = tempfile::tempdir().unwrap();
        let config = root.path().join("config");
        let status = root.path().join("status");
        std::fs::create_dir(&config).unwrap();
        std::fs::create_dir(&status).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o700)).unwrap();
        Dirs {
            _root: root,
            config,
            status,
        }
    }

    fn write(&self, file: &str, text: &str) {
        let path = self.config.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.config.join(file)).unwrap()
    }

    fn docs(&self, file: &str) -> Vec<Value> {
        meshcore::manifest::parse_docs(&self.read(file)).unwrap()
    }

    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.config)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Writes meshd's status for Gateway `ns/name` in the documented shape.
    fn status(&self, ns: &str, name: &str, conditions: Value) {
        let text = json!({"status": {"conditions": conditions}}).to_string();
        std::fs::write(self.status.join(format!("Gateway.{ns}.{name}.json")), text).unwrap();
    }

    fn run(&self, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .env_remove("MESH_CONFIG_DIR")
            .env_remove("MESH_STATUS_DIR")
            .arg("--config-dir")
            .arg(&self.config)
            .arg("--status-dir")
            .arg(&self.status)
            .args(args)
            .output()
            .unwrap();
        Run::from(out)
    }
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

fn namespace(name: &str, labels: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\n")
}

const AMBIENT: &str = "istio.io/dataplane-mode: ambient";

fn programmed(status: &str, reason: &str) -> Value {
    json!([
        {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "accepted"},
        {"type": "Programmed", "status": status, "reason": reason, "message": "m"},
    ])
}

#[test]
fn apply_writes_the_waypoint_gateway_in_its_own_file() {
    let d = Dirs::new();
    d.write("ns.yaml", &namespace("shop", AMBIENT));
    let r = d.run(&["waypoint", "apply", "-n", "shop"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "waypoint shop/waypoint created\n");
    assert_eq!(
        d.docs("waypoint.shop.waypoint.yaml"),
        [json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "shop"},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        })]
    );
    let mode = std::fs::metadata(d.config.join("waypoint.shop.waypoint.yaml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644, "meshd may read as another user");
    // No temp file left behind, the Namespace file untouched.
    assert_eq!(d.files(), ["ns.yaml", "waypoint.shop.waypoint.yaml"]);
    assert_eq!(d.read("ns.yaml"), namespace("shop", AMBIENT));

    let again = d.run(&["waypoint", "apply", "-n", "shop"]);
    assert_eq!(
        again.stdout, "waypoint shop/waypoint unchanged\n",
        "{again:?}"
    );
}

#[test]
fn for_sets_the_waypoint_for_label_and_a_reapply_changes_it() {
    let d = Dirs::new();
    d.write("ns.yaml", &namespace("shop", AMBIENT));
    let label = |d: &Dirs| d.docs("waypoint.shop.east.yaml")[0]["metadata"]["labels"].clone();
    let r = d.run(&[
        "waypoint", "apply", "-n", "shop", "--name", "east", "--for", "workload",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(label(&d), json!({"istio.io/waypoint-for": "workload"}));
    let r = d.run(&[
        "waypoint", "apply", "-n", "shop", "--name", "east", "--for", "all",
    ]);
    assert_eq!(r.stdout, "waypoint shop/east updated\n", "{r:?}");
    assert_eq!(label(&d), json!({"istio.io/waypoint-for": "all"}));
    // An unknown traffic type is a usage error.
    assert_eq!(
        d.run(&["waypoint", "apply", "-n", "shop", "--for", "pods"])
            .code,
        2
    );
}

/// Other documents of the Namespace's file, with scalars a careless writer would retype.
const OTHERS: &str = "---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {on: yes, mode: '0755', flag: 'true', n: 1_000, empty: ''}
spec:
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  template:
    spec:
      containers: [{name: c, command: [mesh-echo, '--port', '8080']}]
";

#[test]
fn enroll_namespace_labels_the_namespace_doc_and_keeps_every_other_doc() {
    let d = Dirs::new();
    let text = format!(
        "# the shop\n{}{OTHERS}",
        namespace("shop", "team: a, istio.io/dataplane-mode: ambient")
    );
    d.write("shop.yaml", &text);
    d.write("other.yaml", &namespace("else", AMBIENT));
    let before = d.docs("shop.yaml");
    let r = d.run(&["waypoint", "apply", "-n", "shop", "--enroll-namespace"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("namespace shop labeled with \"istio.io/use-waypoint: waypoint\""),
        "{r:?}"
    );
    assert_eq!(r.stderr, "", "an ambient namespace gets no warning");
    let after = d.docs("shop.yaml");
    let mut expected = before.clone();
    expected[0]["metadata"]["labels"]["istio.io/use-waypoint"] = json!("waypoint");
    assert_eq!(after, expected);
    assert_eq!(after[1]["metadata"]["labels"]["on"], json!("yes"));
    assert_eq!(after[1]["metadata"]["labels"]["flag"], json!("true"));
    assert_eq!(d.read("other.yaml"), namespace("else", AMBIENT));
    assert!(d.config.join("waypoint.shop.waypoint.yaml").exists());
}

#[test]
fn another_enrollment_is_replaced_only_with_overwrite() {
    let d = Dirs::new();
    let ns = namespace(
        "shop",
        "istio.io/use-waypoint: old, istio.io/dataplane-mode: ambient",
    );
    d.write("ns.yaml", &ns);
    let r = d.run(&[
        "waypoint",
        "apply",
        "-n",
        "shop",
        "--name",
        "new",
        "--enroll-namespace",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("namespace shop is already enrolled in waypoint old")
            && r.stderr.contains("pass --overwrite to enroll it in new"),
        "{r:?}"
    );
    assert_eq!(d.files(), ["ns.yaml"], "a refused apply changes nothing");
    assert_eq!(d.read("ns.yaml"), ns);

    let r = d.run(&[
        "waypoint",
        "apply",
        "-n",
        "shop",
        "--name",
        "new",
        "--enroll-namespace",
        "--overwrite",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        d.docs("ns.yaml")[0]["metadata"]["labels"]["istio.io/use-waypoint"],
        json!("new")
    );
    assert!(d.config.join("waypoint.shop.new.yaml").exists());
}

#[test]
fn enrolling_a_namespace_outside_the_ambient_mesh_warns_how_to_enroll_it() {
    let d = Dirs::new();
    d.write("sub/ns.yaml", &namespace("shop", "team: a"));
    let r = d.run(&["waypoint", "apply", "-n", "shop", "--enroll-namespace"]);
    assert_eq!(r.code, 0, "a warning, as istioctl: {r:?}");
    let file = d.config.join("sub/ns.yaml");
    assert!(
        r.stderr
            .starts_with("warning: namespace shop is not in the ambient mesh")
            && r.stderr.contains("istio.io/dataplane-mode: ambient")
            && r.stderr.contains(&file.display().to_string()),
        "{r:?}"
    );
    assert_eq!(
        d.docs("sub/ns.yaml")[0]["metadata"]["labels"]["istio.io/use-waypoint"],
        json!("waypoint")
    );
}

#[test]
fn an_unknown_namespace_is_an_error_naming_it() {
    let d = Dirs::new();
    d.write("ns.yaml", &namespace("shop", AMBIENT));
    for args in [
        &["waypoint", "apply", "-n", "shoq"][..],
        &["waypoint", "list", "-n", "shoq"],
        &["waypoint", "status", "-n", "shoq"],
        &["waypoint", "delete", "-n", "shoq"],
    ] {
        let r = d.run(args);
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("namespace shoq not found") && r.stderr.contains("create it first"),
            "{args:?}: {r:?}"
        );
    }
    assert_eq!(d.files(), ["ns.yaml"]);
}

#[test]
fn list_shows_each_waypoint_with_what_it_serves_and_meshds_status() {
    let d = Dirs::new();
    d.write(
        "ns.yaml",
        &format!(
            "{}---\n{}",
            namespace("a", AMBIENT),
            namespace("b", AMBIENT)
        ),
    );
    // A Gateway of another class is not a waypoint.
    d.write(
        "ingress.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: a}\nspec: {gatewayClassName: istio}\n",
    );
    for (ns, name, traffic) in [("a", "waypoint", None), ("b", "wl", Some("workload"))] {
        let mut args = vec!["waypoint", "apply", "-n", ns, "--name", name];
        args.extend(traffic.map(|t| ["--for", t]).into_iter().flatten());
        assert_eq!(d.run(&args).code, 0);
    }
    d.status("a", "waypoint", programmed("True", "Programmed"));
    d.status("b", "wl", programmed("False", "NoReadyPods"));
    let r = d.run(&["waypoint", "list", "-A"]);
    assert_eq!(r.code, 0, "{r:?}");
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["NAMESPACE", "NAME", "FOR", "STATUS"],
            vec!["a", "waypoint", "service", "Programmed"],
            vec!["b", "wl", "workload", "NotProgrammed", "(NoReadyPods)"],
        ]
    );
    let r = d.run(&["waypoint", "list", "-n", "b"]);
    assert_eq!(r.stdout.lines().count(), 2, "{r:?}");
    assert!(r.stdout.contains("wl"), "{r:?}");
}

#[test]
fn status_prints_conditions_with_reasons_and_wait_waits_for_programmed() {
    let d = Dirs::new();
    d.write("ns.yaml", &namespace("shop", AMBIENT));
    assert_eq!(d.run(&["waypoint", "apply", "-n", "shop"]).code, 0);
    let r = d.run(&["waypoint", "status", "-n", "shop"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("has not reported status yet"), "{r:?}");

    d.status("shop", "waypoint", programmed("False", "NoReadyPods"));
    let r = d.run(&["waypoint", "status", "-n", "shop"]);
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().take(5).collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["NAMESPACE", "NAME", "CONDITION", "STATUS", "REASON"],
            vec!["shop", "waypoint", "Accepted", "True", "Accepted"],
            vec!["shop", "waypoint", "Programmed", "False", "NoReadyPods"],
        ],
        "{r:?}"
    );
    let r = d.run(&[
        "waypoint",
        "status",
        "-n",
        "shop",
        "--wait",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("not programmed after") && r.stderr.contains("NoReadyPods"),
        "{r:?}"
    );
    let r = d.run(&[
        "waypoint",
        "apply",
        "-n",
        "shop",
        "--wait",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(r.code, 1, "{r:?}");

    d.status("shop", "waypoint", programmed("True", "Programmed"));
    let r = d.run(&[
        "waypoint",
        "apply",
        "-n",
        "shop",
        "--wait",
        "--timeout",
        "5s",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.ends_with("waypoint shop/waypoint programmed\n"),
        "{r:?}"
    );
    assert_eq!(
        d.run(&["waypoint", "status", "-n", "shop", "--wait"]).code,
        0
    );
}

#[test]
fn apply_wait_returns_once_meshd_reports_programmed() {
    use std::io::{BufRead, BufReader};
    let d = Dirs::new();
    d.write("ns.yaml", &namespace("shop", AMBIENT));
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .arg("--config-dir")
        .arg(&d.config)
        .arg("--status-dir")
        .arg(&d.status)
        .args([
            "waypoint",
            "apply",
            "-n",
            "shop",
            "--wait",
            "--timeout",
            "60s",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    // Applied and now waiting: nothing reported yet.
    assert_eq!(line, "waypoint shop/waypoint created\n");
    assert!(
        child.try_wait().unwrap().is_none(),
        "returned before meshd reported"
    );
    d.status("shop", "waypoint", programmed("True", "Programmed"));
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "waypoint shop/waypoint programmed\n");
    assert!(child.wait().unwrap().success());
}

#[test]
fn delete_removes_waypoints_and_leaves_enrollment_and_other_docs() {
    let d = Dirs::new();
    d.write("ns.yaml", &namespace("shop", AMBIENT));
    // A waypoint the user declared in their own file, beside another document.
    d.write(
        "mine.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: mine, namespace: shop}\nspec: {gatewayClassName: istio-waypoint}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa, namespace: shop}\n",
    );
    let r = d.run(&["waypoint", "apply", "-n", "shop", "--enroll-namespace"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = d.run(&["waypoint", "delete", "-n", "shop"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "waypoint shop/waypoint deleted\n");
    assert_eq!(d.files(), ["mine.yaml", "ns.yaml"]);
    assert_eq!(
        d.docs("ns.yaml")[0]["metadata"]["labels"]["istio.io/use-waypoint"],
        json!("waypoint"),
        "istioctl leaves the enrollment label"
    );

    let r = d.run(&["waypoint", "delete", "-n", "shop", "gone", "mine"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("no waypoint gone in namespace shop"),
        "{r:?}"
    );
    assert_eq!(r.stdout, "waypoint shop/mine deleted\n");
    assert_eq!(
        d.docs("mine.yaml"),
        [
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa", "namespace": "shop"}})
        ]
    );

    for name in ["x", "y"] {
        assert_eq!(
            d.run(&["waypoint", "apply", "-n", "shop", "--name", name])
                .code,
            0
        );
    }
    let r = d.run(&["waypoint", "delete", "-n", "shop", "--all"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(d.files(), ["mine.yaml", "ns.yaml"]);
}

#[test]
fn apply_updates_a_waypoint_declared_in_a_user_file_in_place() {
    let d = Dirs::new();
    d.write("ns.yaml", &namespace("shop", AMBIENT));
    d.write(
        "mine.yaml",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa, namespace: shop}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop, labels: {team: a}, annotations: {note: kept}}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    );
    let before = d.docs("mine.yaml");
    let r = d.run(&["waypoint", "apply", "-n", "shop", "--for", "all"]);
    assert_eq!(r.stdout, "waypoint shop/waypoint updated\n", "{r:?}");
    assert_eq!(d.files(), ["mine.yaml", "ns.yaml"], "no second declaration");
    let mut expected = before;
    expected[1]["metadata"]["labels"]["istio.io/waypoint-for"] = json!("all");
    assert_eq!(d.docs("mine.yaml"), expected);
}

#[test]
fn a_gateway_of_another_class_is_neither_overwritten_nor_deleted() {
    let d = Dirs::new();
    d.write("ns.yaml", &namespace("shop", AMBIENT));
    let ingress = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec: {gatewayClassName: istio}\n";
    d.write("ingress.yaml", ingress);
    for args in [
        &["waypoint", "apply", "-n", "shop"][..],
        &["waypoint", "delete", "-n", "shop"],
    ] {
        let r = d.run(args);
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert!(r.stderr.contains("is not a waypoint"), "{r:?}");
    }
    assert_eq!(d.read("ingress.yaml"), ingress);
}

#[test]
fn malformed_yaml_in_the_config_dir_is_an_error_naming_the_file() {
    let d = Dirs::new();
    d.write("ns.yaml", &namespace("shop", AMBIENT));
    d.write(
        "sub/broken.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: [oops\n",
    );
    let file = d.config.join("sub/broken.yaml").display().to_string();
    for args in [
        &["waypoint", "apply", "-n", "shop"][..],
        &["waypoint", "list"],
    ] {
        let r = d.run(args);
        assert_eq!(r.code, 1, "{args:?}: {r:?}");
        assert!(r.stderr.starts_with(&format!("error: {file}: ")), "{r:?}");
        assert!(r.stderr.contains("line 3"), "{r:?}");
    }
    assert_eq!(d.files(), ["ns.yaml", "sub"]);
}

#[test]
fn usage_errors_exit_2() {
    let d = Dirs::new();
    for args in [
        &["waypoint", "apply"][..],
        &["waypoint", "apply", "-n", "../etc"],
        &["waypoint", "delete", "-n", "a", "x", "--all"],
        &["waypoint", "list", "-n", "a", "-A"],
        &["waypoint", "status", "-n", "a", "--timeout", "5s"],
    ] {
        assert_eq!(d.run(args).code, 2, "{args:?}");
    }
    // Neither local mode nor a cluster to be found.
    let home = tempfile::tempdir().unwrap();
    let no_dir = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .env_remove("MESH_CONFIG_DIR")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home.path())
        .args(["waypoint", "list"])
        .output()
        .unwrap();
    assert_eq!(no_dir.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_dir.stderr).contains("--config-dir DIR"));
}
