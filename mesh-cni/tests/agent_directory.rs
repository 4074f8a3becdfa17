//! The node agent in local mode (`--view directory`): a real agent process in a node netns,
//! pods as real netns described in a config directory, a fake ztunnel speaking ZDS, requests
//! in the plugin protocol. What a pod's owner would notice: enrolled only when ztunnel said
//! yes, clear failures otherwise, label flips and restarts handled, uninstall leaves nothing.

mod agent_support;

use std::path::Path;
use std::time::{Duration, Instant};

use agent_support::*;
use mesh_cni::agent::DIRECTORY_GONE_GRACE;
use mesh_cni::event::{AgentReply, Command as Cmd};

struct Env {
    dir: tempfile::TempDir,
    node: Ns,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
            node: Ns::new("n"),
        }
    }
    fn config(&self) -> std::path::PathBuf {
        let c = self.dir.path().join("config");
        std::fs::create_dir_all(&c).expect("config dir");
        c
    }
    fn zds(&self) -> std::path::PathBuf {
        self.dir.path().join("zds.sock")
    }
    async fn agent(&self) -> AgentProc {
        let args: Vec<String> = ["--view", "directory", "--node", "n1", "--config-dir"]
            .iter()
            .map(|s| s.to_string())
            .chain([self.config().display().to_string()])
            .chain([
                "--cni-conf-dir".into(),
                self.dir.path().join("net.d").display().to_string(),
            ])
            .collect();
        AgentProc::start(Some(&self.node), self.dir.path(), &args).await
    }
    /// Namespace `name` with (or without) the ambient label.
    fn namespace(&self, name: &str, ambient: bool) {
        let labels = if ambient {
            "{istio.io/dataplane-mode: ambient}"
        } else {
            "{}"
        };
        write_atomic(
            &self.config().join(format!("ns-{name}.yaml")),
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n"
            ),
        );
    }
    /// A pod on node n1 with netns `netns`, as local mode's kubelet writes it.
    fn pod(&self, ns: &str, name: &str, netns: &Ns, ip: &str) {
        write_atomic(
            &self.config().join(format!("pod-{ns}-{name}.yaml")),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, annotations: {{mesh.local/netns: {}}}}}\n\
                 spec: {{nodeName: n1, serviceAccountName: sa-{name}}}\nstatus: {{podIP: {ip}}}\n",
                netns.path()
            ),
        );
    }
}

fn uid(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambient_pod_enrolled_only_on_ztunnel_ack() {
    let env = Env::new();
    env.namespace("amb", true);
    env.namespace("plain", false);
    let (p1, p2, p3) = (Ns::new("a"), Ns::new("b"), Ns::new("c"));
    env.pod("amb", "p1", &p1, "10.9.0.1");
    env.pod("amb", "p2", &p2, "10.9.0.2");
    env.pod("plain", "p3", &p3, "10.9.0.3");
    let agent = env.agent().await;
    let sock = &agent.plugin_socket;

    // No ztunnel: the pod must not start, and the message says what to fix.
    let add1 = event(Cmd::Add, "amb", "p1", "", &p1.path(), "10.9.0.1");
    match call(sock, &add1).await {
        AgentReply::Failed { error } => assert!(
            error.contains("no ztunnel is connected") && error.contains("ztunnel DaemonSet"),
            "{error}"
        ),
        other => panic!("ADD without ztunnel: {other:?}"),
    }

    let zt = FakeZtunnel::connect(&env.zds()).await;
    wait_for("the first snapshot", || zt.snapshot_done()).await;
    assert!(
        !zt.added(&uid("amb", "p1")),
        "a failed ADD leaves nothing behind"
    );

    // Ambient: added with its netns and identity, acked, then Enrolled.
    assert_eq!(call(sock, &add1).await, AgentReply::Enrolled);
    assert!(zt.seen().contains(&Seen::Add {
        uid: uid("amb", "p1"),
        inode: p1.inode(),
        ns: "amb/p1/sa-p1".into()
    }));

    // ztunnel says no: Failed with its reason; nothing cached (a later ztunnel's snapshot
    // does not hold it).
    zt.refuse.lock().expect("lock").push(uid("amb", "p2"));
    let add2 = event(Cmd::Add, "amb", "p2", "", &p2.path(), "10.9.0.2");
    match call(sock, &add2).await {
        AgentReply::Failed { error } => {
            assert!(error.contains("fake ztunnel refuses this pod"), "{error}")
        }
        other => panic!("ADD refused by ztunnel: {other:?}"),
    }

    // Not ambient: skipped, ztunnel never hears of it.
    let add3 = event(Cmd::Add, "plain", "p3", "", &p3.path(), "10.9.0.3");
    assert!(matches!(
        call(sock, &add3).await,
        AgentReply::Skipped { .. }
    ));
    assert!(!zt.added(&uid("plain", "p3")));

    // Hostile inputs: a netns path that is not a netns, the node's own netns, a pod the view
    // does not have.
    for bad in [
        "/etc/hostname",
        "/proc/self/ns/net",
        "/proc/1/ns/net",
        "/proc/self/ns/uts",
    ] {
        let ev = event(Cmd::Add, "amb", "p2", "", bad, "10.9.0.2");
        match call(sock, &ev).await {
            AgentReply::Failed { error } => assert!(error.contains("CNI_NETNS"), "{error}"),
            other => panic!("ADD with CNI_NETNS={bad}: {other:?}"),
        }
    }
    let escape = event(
        Cmd::Add,
        "amb",
        "../../api/v1/x",
        "",
        &p2.path(),
        "10.9.0.9",
    );
    match call(sock, &escape).await {
        AgentReply::Failed { error } => assert!(error.contains("not Kubernetes names"), "{error}"),
        other => panic!("ADD with a path as the pod name: {other:?}"),
    }
    let ghost = event(Cmd::Add, "amb", "ghost", "", &p2.path(), "10.9.0.9");
    match call(sock, &ghost).await {
        AgentReply::Failed { error } => assert!(error.contains("not found"), "{error}"),
        other => panic!("ADD of a pod not in the view: {other:?}"),
    }

    // CHECK: the enrolled pod is fine; the refused one is ambient but not enrolled.
    let check1 = event(Cmd::Check, "amb", "p1", "", &p1.path(), "");
    assert_eq!(call(sock, &check1).await, AgentReply::Done);
    let check2 = event(Cmd::Check, "amb", "p2", "", &p2.path(), "");
    assert!(matches!(
        call(sock, &check2).await,
        AgentReply::Failed { .. }
    ));
    // Only root may talk to the agent.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(sock).expect("socket").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let zt2 = FakeZtunnel::connect(&env.zds()).await;
    wait_for("the second snapshot", || zt2.snapshot_done()).await;
    assert!(zt2.added(&uid("amb", "p1")));
    assert!(
        !zt2.added(&uid("amb", "p2")),
        "a refused pod is not in the cache"
    );

    // DEL: to every ztunnel.
    let del1 = event(Cmd::Del, "amb", "p1", "", "", "");
    assert_eq!(call(sock, &del1).await, AgentReply::Done);
    assert!(zt.deleted(&uid("amb", "p1")) && zt2.deleted(&uid("amb", "p1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_flips_enroll_and_remove_without_cni_events() {
    let env = Env::new();
    env.namespace("flip", false);
    let p = Ns::new("f");
    env.pod("flip", "web", &p, "10.9.1.1");
    let _agent = env.agent().await;
    let zt = FakeZtunnel::connect(&env.zds()).await;
    wait_for("the first snapshot", || zt.snapshot_done()).await;
    assert!(!zt.added(&uid("flip", "web")));

    env.namespace("flip", true);
    wait_for("the flipped pod's add", || zt.added(&uid("flip", "web"))).await;
    assert!(zt.seen().iter().any(
        |s| matches!(s, Seen::Add { uid: u, inode, .. } if *u == uid("flip", "web") && *inode == p.inode())
    ));

    env.namespace("flip", false);
    wait_for("the flipped pod's del", || zt.deleted(&uid("flip", "web"))).await;
}

/// Local mode's kubelet takes a leaving pod out of the files first and sends its DEL only once
/// the pod drained; meanwhile the agent keeps it enrolled (its capture and policy stay under the
/// connections still served). Without a DEL (a kubelet that died) the agent takes the pod out
/// itself: never before the grace, counted from the file's removal, and surely after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gone_from_the_files_without_a_del_is_removed_after_the_grace() {
    let env = Env::new();
    env.namespace("gone", true);
    let (p, kept) = (Ns::new("g"), Ns::new("k"));
    env.pod("gone", "web", &p, "10.9.2.1");
    env.pod("gone", "db", &kept, "10.9.2.2");
    let _agent = env.agent().await;
    let zt = FakeZtunnel::connect(&env.zds()).await;
    wait_for("both pods' adds", || {
        zt.added(&uid("gone", "web")) && zt.added(&uid("gone", "db"))
    })
    .await;

    let removed = Instant::now();
    std::fs::remove_file(env.config().join("pod-gone-web.yaml")).expect("removing the pod file");
    wait_for_within(
        "the gone pod's del",
        DIRECTORY_GONE_GRACE + Duration::from_secs(20),
        || zt.deleted(&uid("gone", "web")),
    )
    .await;
    // A lower bound the agent enforces, not a timing guess: its clock starts no earlier than
    // the removal.
    let waited = removed.elapsed();
    assert!(
        waited >= DIRECTORY_GONE_GRACE,
        "the pod was taken out {waited:?} after leaving the files, before the grace of {DIRECTORY_GONE_GRACE:?}"
    );
    assert!(
        !zt.deleted(&uid("gone", "db")),
        "a pod still in the files stays enrolled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_pods_and_new_pods_go_to_newest_ztunnel() {
    let env = Env::new();
    env.namespace("amb", true);
    let (p1, p2) = (Ns::new("r"), Ns::new("s"));
    env.pod("amb", "one", &p1, "10.9.2.1");
    let mut agent = env.agent().await;
    let old = FakeZtunnel::connect(&env.zds()).await;
    wait_for("the first snapshot", || old.snapshot_done()).await;
    let add1 = event(Cmd::Add, "amb", "one", "", &p1.path(), "10.9.2.1");
    assert_eq!(
        call(&agent.plugin_socket, &add1).await,
        AgentReply::Enrolled
    );

    // Agent restart: the ztunnel reconnects, and the new agent's snapshot holds the pod
    // (found again from the config directory), with no del.
    agent.stop();
    wait_for("the session to end", || !old.is_connected()).await;
    let agent = env.agent().await;
    let old = FakeZtunnel::connect(&env.zds()).await;
    wait_for("the snapshot after restart", || old.snapshot_done()).await;
    assert!(old.added(&uid("amb", "one")), "{:?}", old.seen());
    assert!(!old.seen().iter().any(|s| matches!(s, Seen::Del(_))));

    // Rolling update: a second ztunnel gets the snapshot and every new pod; dels go to both.
    let new = FakeZtunnel::connect(&env.zds()).await;
    wait_for("the new ztunnel's snapshot", || new.snapshot_done()).await;
    assert!(new.added(&uid("amb", "one")));
    let before = old.seen().len();
    // A pod created now: the view shows it only once the ADD looks it up.
    env.pod("amb", "two", &p2, "10.9.2.2");
    let add2 = event(Cmd::Add, "amb", "two", "", &p2.path(), "10.9.2.2");
    assert_eq!(
        call(&agent.plugin_socket, &add2).await,
        AgentReply::Enrolled
    );
    assert!(new.added(&uid("amb", "two")));
    assert_eq!(old.seen().len(), before, "the old ztunnel gets no add");
    let del2 = event(Cmd::Del, "amb", "two", "", "", "");
    assert_eq!(call(&agent.plugin_socket, &del2).await, AgentReply::Done);
    assert!(new.deleted(&uid("amb", "two")) && old.deleted(&uid("amb", "two")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_removes_every_pod_and_the_cni_entry() {
    let env = Env::new();
    env.namespace("amb", true);
    let p = Ns::new("u");
    env.pod("amb", "app", &p, "10.9.3.1");
    let netd = env.dir.path().join("net.d");
    std::fs::create_dir_all(&netd).expect("net.d");
    std::fs::write(
        netd.join("10-primary.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#,
    )
    .expect("conflist");
    let entry = mesh_cni::install::entry("/x/plugin.sock", &["mesh-system".to_string()]);
    mesh_cni::install::insert(&netd, &entry).expect("insert");
    let conf = || std::fs::read_to_string(netd.join("10-primary.conflist")).expect("conflist");
    assert!(conf().contains("mesh-cni"));

    let agent = env.agent().await;
    let zt = FakeZtunnel::connect(&env.zds()).await;
    wait_for("the first snapshot", || zt.snapshot_done()).await;
    let add = event(Cmd::Add, "amb", "app", "", &p.path(), "10.9.3.1");
    assert_eq!(call(&agent.plugin_socket, &add).await, AgentReply::Enrolled);

    let state = env.dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join(mesh_cni::agent::UNINSTALL_FILE), b"").expect("trigger");
    let done = state.join(mesh_cni::agent::UNINSTALLED_FILE);
    wait_for("the uninstall marker", || Path::new(&done).exists()).await;
    assert!(
        zt.deleted(&uid("amb", "app")),
        "the pod was handed back first"
    );
    assert!(
        !conf().contains("mesh-cni"),
        "CNI entry removed: {}",
        conf()
    );
    // A pod created now is not enrolled (and not failed).
    assert!(matches!(
        call(&agent.plugin_socket, &add).await,
        AgentReply::Skipped { .. }
    ));
}
