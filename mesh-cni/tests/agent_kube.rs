//! The node agent in Kubernetes mode (`--view kube`) against the API server double: pods
//! watched by node, a GET on a miss, the redirection annotation through pods/status, label
//! flips found through host /proc (a fake /proc tree whose cgroup files name the pod UIDs and
//! whose ns/net links point at real netns), restart recovery, uninstall by the annotation on
//! the agent's own DaemonSet — and by nothing cheaper (the ConfigMap older versions read, another
//! DaemonSet's annotation, a value other than "true").

mod agent_support;

use std::path::Path;

use agent_support::*;
use mesh_cni::event::{AgentReply, Command as Cmd};
use serde_json::{Value, json};
use testbed::kubeapi::{ApiOptions, ApiServer};

const REDIRECTION: &str = "ambient.istio.io/redirection";

fn namespace(api: &ApiServer, name: &str, ambient: bool) {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
    if api.get("v1", "Namespace", None, name).is_some() {
        api.put(ns).expect("namespace update");
    } else {
        api.create(ns).expect("namespace");
    }
}

/// A pod on node n1 (with an IP: its sandbox is up); returns its UID.
fn pod(api: &ApiServer, ns: &str, name: &str, ip: &str) -> String {
    let created = api
        .create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": "n1", "serviceAccountName": "sa", "containers": [{"name": "c", "image": "x"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}))
        .expect("pod");
    let uid = created["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    // The double may default status on create; put it back as a kubelet would.
    let mut obj = api.get("v1", "Pod", Some(ns), name).expect("pod");
    obj["status"] = json!({"podIP": ip, "podIPs": [{"ip": ip}]});
    api.put(obj).expect("pod status");
    uid
}

/// A DaemonSet in mesh-system, created or replaced, with `mesh.dev/uninstall` set to `trigger`.
fn daemonset(api: &ApiServer, name: &str, trigger: Option<&str>) {
    let annotations = match trigger {
        Some(v) => json!({mesh_cni::agent::UNINSTALL_ANNOTATION: v}),
        None => json!({}),
    };
    let mut ds = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": "mesh-system", "annotations": annotations},
        "spec": {"selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "agent", "image": "mesh/mesh-cni:0.1.0"}]}}}});
    match api.get("apps/v1", "DaemonSet", Some("mesh-system"), name) {
        Some(live) => {
            ds["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"].clone();
            api.put(ds).expect("daemonset update");
        }
        None => {
            api.create(ds).expect("daemonset");
        }
    }
}

fn annotation(api: &ApiServer, ns: &str, name: &str, key: &str) -> Option<String> {
    let p: Value = api.get("v1", "Pod", Some(ns), name)?;
    p["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_string)
}

/// A host /proc as the agent reads it: pid 1 (the host's netns) and one process per pod, whose
/// cgroup is the systemd form of its UID and whose ns/net is the pod's netns.
fn fake_proc(dir: &Path, pods: &[(&str, &Ns)]) {
    let one = dir.join("1/ns");
    std::fs::create_dir_all(&one).expect("proc/1");
    let _ = std::os::unix::fs::symlink("/proc/self/ns/net", one.join("net"));
    for (i, (uid, ns)) in pods.iter().enumerate() {
        let pid = dir.join(format!("{}", 4000 + i));
        std::fs::create_dir_all(pid.join("ns")).expect("proc/pid");
        std::fs::write(
            pid.join("cgroup"),
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope\n",
                uid.replace('-', "_")
            ),
        )
        .expect("cgroup");
        let _ = std::fs::remove_file(pid.join("ns/net"));
        std::os::unix::fs::symlink(ns.path(), pid.join("ns/net")).expect("ns link");
    }
}

async fn start_agent(dir: &Path, api: &ApiServer) -> AgentProc {
    let args: Vec<String> = vec![
        "--view".into(),
        "kube".into(),
        "--node".into(),
        "n1".into(),
        "--kubeconfig".into(),
        api.kubeconfig().display().to_string(),
        "--host-proc".into(),
        dir.join("proc").display().to_string(),
        "--pod-name".into(),
        "mesh-cni-n1".into(),
    ];
    AgentProc::start(None, dir, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_view_enrolls_annotates_flips_restarts_and_uninstalls() {
    let api = ApiServer::start(ApiOptions::default()).expect("api double");
    let dir = tempfile::tempdir().expect("tempdir");
    let (p1, p2) = (Ns::new("x"), Ns::new("y"));
    namespace(&api, "mesh-system", false);
    pod(&api, "mesh-system", "mesh-cni-n1", "10.8.0.100");
    namespace(&api, "amb", true);
    namespace(&api, "later", false);
    fake_proc(&dir.path().join("proc"), &[]);
    let mut agent = start_agent(dir.path(), &api).await;
    let zds = dir.path().join("zds.sock");
    let zt = FakeZtunnel::connect(&zds).await;
    wait_for("the first snapshot", || zt.snapshot_done()).await;

    // A new ambient pod: looked up (GET on a watch miss, or the watch), enrolled on the
    // ack, annotated through pods/status.
    let uid1 = pod(&api, "amb", "web", "10.8.0.1");
    let add = event(Cmd::Add, "amb", "web", &uid1, &p1.path(), "10.8.0.1");
    assert_eq!(call(&agent.plugin_socket, &add).await, AgentReply::Enrolled);
    assert!(zt.seen().contains(&Seen::Add {
        uid: uid1.clone(),
        inode: p1.inode(),
        ns: "amb/web/sa".into()
    }));
    wait_for("the redirection annotation", || {
        annotation(&api, "amb", "web", REDIRECTION).as_deref() == Some("enabled")
    })
    .await;

    // A UID the view does not have for that name (an older pod's sandbox): refused.
    let stale = event(
        Cmd::Add,
        "amb",
        "web",
        "00000000-0000-0000-0000-00000000dead",
        &p1.path(),
        "",
    );
    assert!(matches!(
        call(&agent.plugin_socket, &stale).await,
        AgentReply::Failed { .. }
    ));

    // Not ambient: skipped. Then the namespace is labelled: found through host /proc.
    let uid2 = pod(&api, "later", "job", "10.8.0.2");
    let add2 = event(Cmd::Add, "later", "job", &uid2, &p2.path(), "10.8.0.2");
    assert!(matches!(
        call(&agent.plugin_socket, &add2).await,
        AgentReply::Skipped { .. }
    ));
    fake_proc(&dir.path().join("proc"), &[(&uid1, &p1), (&uid2, &p2)]);
    namespace(&api, "later", true);
    wait_for("the flipped pod's add", || zt.added(&uid2)).await;
    assert!(zt.seen().iter().any(
        |s| matches!(s, Seen::Add { uid, inode, .. } if *uid == uid2 && *inode == p2.inode())
    ));
    wait_for("the flipped pod's annotation", || {
        annotation(&api, "later", "job", REDIRECTION).as_deref() == Some("enabled")
    })
    .await;
    namespace(&api, "later", false);
    wait_for("the flipped-off pod's del", || zt.deleted(&uid2)).await;
    wait_for("the annotation's removal", || {
        annotation(&api, "later", "job", REDIRECTION).is_none()
    })
    .await;

    // Until now there was no DaemonSet at all: not a request. Now only cheaper look-alikes of
    // the trigger: the ConfigMap older versions obeyed (meshd's ServiceAccount may create
    // ConfigMaps there), another DaemonSet's annotation, a value other than "true" on ours.
    api.create(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "mesh-uninstall", "namespace": "mesh-system"}}))
        .expect("configmap");
    daemonset(&api, "other", Some("true"));
    daemonset(&api, "mesh-cni", Some("yes"));
    // And a pause file left on the host by an earlier uninstall.
    let pause = dir
        .path()
        .join("state")
        .join(mesh_cni::agent::UNINSTALL_FILE);
    std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
    std::fs::write(&pause, b"").expect("stale pause file");

    // Agent crash and restart: its sockets are replaced, the reconnecting ztunnel's snapshot
    // holds the enrolled pod (found again through /proc), and nothing is deleted. The trigger
    // is read before the plugin socket is served, so none of the look-alikes started an
    // uninstall, and the stale pause file no longer holds the installer back.
    agent.kill();
    wait_for("the session to end", || !zt.is_connected()).await;
    let agent = start_agent(dir.path(), &api).await;
    let zt = FakeZtunnel::connect(&zds).await;
    wait_for("the snapshot after restart", || zt.snapshot_done()).await;
    assert!(zt.added(&uid1), "{:?}", zt.seen());
    assert!(!zt.seen().iter().any(|s| matches!(s, Seen::Del(_))));
    assert_eq!(
        annotation(
            &api,
            "mesh-system",
            "mesh-cni-n1",
            mesh_cni::agent::UNINSTALLED_ANNOTATION
        ),
        None
    );
    assert!(!pause.exists(), "the stale pause file is removed");
    assert_eq!(
        call(&agent.plugin_socket, &add).await,
        AgentReply::Enrolled,
        "still enrolling"
    );

    // Uninstall: our DaemonSet says "true"; every pod is handed back, the agent's own pod
    // says so.
    daemonset(&api, "mesh-cni", Some("true"));
    wait_for("the uninstalled annotation", || {
        annotation(
            &api,
            "mesh-system",
            "mesh-cni-n1",
            mesh_cni::agent::UNINSTALLED_ANNOTATION,
        )
        .as_deref()
            == Some("true")
    })
    .await;
    assert!(zt.deleted(&uid1));
    assert!(
        dir.path()
            .join("state")
            .join(mesh_cni::agent::UNINSTALL_FILE)
            .exists(),
        "the installer's pause file is written"
    );
    assert!(matches!(
        call(&agent.plugin_socket, &add).await,
        AgentReply::Skipped { .. }
    ));
}
