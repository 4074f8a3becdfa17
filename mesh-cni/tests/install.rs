//! `mesh-cni install` as the DaemonSet runs it, against a temporary CNI bin and conf dir: our
//! entry ends up last in the primary (lexically first) config's chain, exactly once, also after
//! the primary rewrites its file or appears late; `--uninstall` takes out exactly our entry; a
//! malformed primary is reported and left alone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-cni");

struct Dirs {
    _tmp: tempfile::TempDir,
    bin: PathBuf,
    conf: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = tmp.path().join("bin");
    let conf = tmp.path().join("net.d");
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::fs::create_dir_all(&conf).expect("conf dir");
    Dirs {
        _tmp: tmp,
        bin,
        conf,
    }
}

fn cmd(d: &Dirs, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("install")
        .arg("--cni-bin-dir")
        .arg(&d.bin)
        .arg("--cni-conf-dir")
        .arg(&d.conf)
        .args(["--poll-interval-ms", "20"])
        .args(extra)
        .env_remove("CNI_COMMAND");
    c
}

fn run(d: &Dirs, extra: &[&str]) -> std::process::Output {
    cmd(d, extra).output().expect("running mesh-cni install")
}

/// Kills the watching installer even when the test fails.
struct Watcher(Child);
impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn watch(d: &Dirs) -> Watcher {
    Watcher(
        cmd(d, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning mesh-cni install"),
    )
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("reading conf")).expect("conf is JSON")
}

fn types(v: &Value) -> Vec<String> {
    v["plugins"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| p["type"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn calico() -> Value {
    json!({"cniVersion": "0.4.0", "name": "k8s-pod-network", "plugins": [
        {"type": "calico", "ipam": {"type": "calico-ipam"}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]})
}

fn write(p: &Path, v: &Value) {
    std::fs::write(p, v.to_string()).expect("writing conf");
}

#[test]
fn inserts_last_in_the_lexically_first_config_once() {
    let d = dirs();
    let first = d.conf.join("10-calico.conflist");
    let other = d.conf.join("99-other.conflist");
    write(&first, &calico());
    write(&other, &calico());
    let out = run(
        &d,
        &["--once", "--exclude-namespaces", "mesh-system,kube-system"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let v = read(&first);
    assert_eq!(types(&v), ["calico", "portmap", "mesh-cni"]);
    assert_eq!(v["cniVersion"], "0.4.0", "the primary's cniVersion is kept");
    assert_eq!(
        v["plugins"][0],
        calico()["plugins"][0],
        "the primary's entries untouched"
    );
    assert_eq!(
        v["plugins"][2]["exclude_namespaces"],
        json!(["mesh-system", "kube-system"])
    );
    assert_eq!(
        v["plugins"][2]["agent_socket"],
        "/var/run/mesh-cni/plugin.sock"
    );
    assert_eq!(read(&other), calico(), "only the primary is edited");

    // The binary is in the bin dir, executable, and is the plugin.
    let installed = d.bin.join("mesh-cni");
    assert_eq!(
        std::fs::read(&installed).expect("installed binary"),
        std::fs::read(BIN).expect("built binary")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&installed)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    // Idempotent: a second run leaves the file byte for byte.
    let before = std::fs::read(&first).expect("read");
    let out = run(
        &d,
        &["--once", "--exclude-namespaces", "mesh-system,kube-system"],
    );
    assert!(out.status.success());
    assert_eq!(std::fs::read(&first).expect("read"), before);
    // Nothing else appeared in the dirs (no temporary files left behind).
    let names = |p: &Path| {
        let mut n: Vec<String> = std::fs::read_dir(p)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&d.conf), ["10-calico.conflist", "99-other.conflist"]);
    assert_eq!(names(&d.bin), ["mesh-cni"]);
}

#[test]
fn a_single_plugin_conf_is_wrapped_into_a_list() {
    let d = dirs();
    let conf = d.conf.join("10-flannel.conf");
    let single = json!({"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
        "delegate": {"isDefaultGateway": true}});
    write(&conf, &single);
    let out = run(&d, &["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !conf.exists(),
        "the .conf would shadow the list (sorts first)"
    );
    let v = read(&d.conf.join("10-flannel.conflist"));
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["name"], "cbr0");
    assert_eq!(
        v["plugins"][0],
        json!({"type": "flannel", "delegate": {"isDefaultGateway": true}})
    );
    assert_eq!(types(&v), ["flannel", "mesh-cni"]);
}

#[test]
fn waits_for_the_primary_and_puts_the_entry_back_when_it_is_rewritten() {
    let d = dirs();
    let _w = watch(&d);
    let conf = d.conf.join("10-calico.conflist");
    // The primary CNI starts after us.
    write(&conf, &calico());
    wait_for("the entry in the new config", || {
        conf.exists() && types(&read(&conf)).last().map(String::as_str) == Some("mesh-cni")
    });
    // The primary rewrites its config (as Calico's node agent does on restart).
    let mut rewritten = calico();
    rewritten["plugins"][1]["capabilities"]["bandwidth"] = json!(true);
    write(&conf, &rewritten);
    wait_for("the entry back in the rewritten config", || {
        types(&read(&conf)) == ["calico", "portmap", "mesh-cni"]
    });
    assert_eq!(read(&conf)["plugins"][1], rewritten["plugins"][1]);

    // Throughout further rewrites, a reader never sees a partial file.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (conf, stop) = (conf.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(t) = std::fs::read_to_string(&conf) {
                    serde_json::from_str::<Value>(&t)
                        .unwrap_or_else(|e| panic!("partial config read: {e}: {t:?}"));
                    reads += 1;
                }
            }
            reads
        })
    };
    for _ in 0..20 {
        // Atomic like a well-behaved primary, so only our writes are under test.
        let tmp = d.conf.join("tmp");
        write(&tmp, &calico());
        std::fs::rename(&tmp, &conf).expect("rename");
        wait_for("re-insertion", || {
            types(&read(&conf)).last().map(String::as_str) == Some("mesh-cni")
        });
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.join().expect("reader") > 0);
}

#[test]
fn uninstall_removes_exactly_our_entry_and_binary() {
    let d = dirs();
    let conf = d.conf.join("10-calico.conflist");
    write(&conf, &calico());
    assert!(run(&d, &["--once"]).status.success());
    assert_eq!(types(&read(&conf)).len(), 3);
    let out = run(&d, &["--uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read(&conf), calico());
    assert!(!d.bin.join("mesh-cni").exists());
    // Twice is fine.
    assert!(run(&d, &["--uninstall"]).status.success());
    assert_eq!(read(&conf), calico());
}

#[test]
fn a_malformed_primary_is_reported_and_left_alone() {
    let d = dirs();
    let conf = d.conf.join("05-broken.conflist");
    let text = "{\"cniVersion\": \"1.0.0\", \"plugins\": [ {\"type\": \"bridge\"";
    std::fs::write(&conf, text).expect("write");
    write(&d.conf.join("10-calico.conflist"), &calico());
    let out = run(&d, &["--once"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("05-broken.conflist") && err.contains("malformed"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&conf).expect("read"), text);
    assert_eq!(read(&d.conf.join("10-calico.conflist")), calico());
}

#[test]
fn a_paused_watcher_does_not_put_the_entry_back() {
    let d = dirs();
    let pause = d.conf.parent().expect("tmp").join("uninstall");
    let conf = d.conf.join("10-calico.conflist");
    write(&conf, &calico());
    let _w = Watcher(
        cmd(&d, &["--pause-file", pause.to_str().expect("utf-8 path")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning mesh-cni install"),
    );
    wait_for("the entry", || types(&read(&conf)).len() == 3);
    // The agent's uninstall: pause first, then take the entry out.
    std::fs::write(&pause, b"").expect("pause file");
    assert!(run(&d, &["--uninstall"]).status.success());
    // A marker the watcher would react to: a rewrite by the primary.
    write(&conf, &calico());
    // The watcher polls every 20 ms; an unpaused one re-inserts within a few polls, so this
    // many passes of ours without a re-insertion means it stayed paused.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert_eq!(
            read(&conf),
            calico(),
            "a paused watcher re-inserted the entry"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_file(&pause).expect("unpause");
    wait_for("the entry back after unpausing", || {
        types(&read(&conf)).len() == 3
    });
}
