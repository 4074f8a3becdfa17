//! Lifecycle of the testbed: processes (spawn, logs, terminate, detach), pod removal, and that
//! nothing survives a dropped cluster — also when the test panics — plus `sweep_stale`
//! removing what a dead run left behind.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::{gone, leftovers_of, privileged, start_time, wait_until};
use testbed::{Cluster, ClusterConfig, Netns, TestbedError};

fn sleeper() -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo ready; sleep 600; echo unreachable"]);
    cmd
}

#[test]
fn spawn_logs_terminate_and_remove_pod() {
    if !privileged() {
        return;
    }
    let cluster = Cluster::new(ClusterConfig::default()).unwrap();
    let pod = cluster.add_pod(1, "app").unwrap();

    // The process runs inside the pod: it sees the pod's eth0 address.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ip -o addr show dev eth0; echo to-stderr >&2"]);
    let mut p = cluster.spawn(&pod.netns, cmd, "addr").unwrap();
    let status = p.wait_timeout(Duration::from_secs(10)).expect("exits");
    assert!(status.success());
    let log = std::fs::read_to_string(p.log_path()).unwrap();
    assert!(
        log.contains(&pod.ip4.to_string()) && log.contains("to-stderr"),
        "{log}"
    );
    assert!(p.log_path().starts_with(cluster.dir()));

    // terminate: SIGTERM reaches the shell; the group's sleep goes too.
    let mut p = cluster.spawn(&pod.netns, sleeper(), "sleeper").unwrap();
    wait_until(Duration::from_secs(10), "sleeper to log", || {
        std::fs::read_to_string(p.log_path())
            .unwrap_or_default()
            .contains("ready")
    });
    assert!(p.try_wait().unwrap().is_none());
    p.terminate(Duration::from_secs(5));
    assert!(p.try_wait().unwrap().is_some());

    // remove_pod kills what runs in it, and the pod is unreachable afterwards.
    let mut q = cluster.spawn(&pod.netns, sleeper(), "in-pod").unwrap();
    q.detach();
    let (pid, start) = (q.pid(), start_time(q.pid()).unwrap());
    drop(q); // detached: still running
    assert!(!gone(pid, start));
    cluster.remove_pod("app").unwrap();
    assert!(gone(pid, start));
    assert!(cluster.pods().is_empty());
    assert!(!pod.netns.path.exists());
    assert!(matches!(
        cluster.remove_pod("app"),
        Err(TestbedError::Invalid(_))
    ));

    // The slot and name can be reused.
    let again = cluster.add_pod(1, "app").unwrap();
    assert_eq!(again.ip4, pod.ip4);
    let node = &cluster.nodes()[1];
    let out = cluster
        .run(&node.netns, &["ip", "-o", "link", "show", "fab0"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn errors_say_what_failed() {
    if !privileged() {
        return;
    }
    let cluster = Cluster::new(ClusterConfig {
        nodes: 1,
        ipv6: false,
    })
    .unwrap();
    assert!(matches!(
        cluster.add_pod(5, "x"),
        Err(TestbedError::Invalid(_))
    ));
    assert!(matches!(
        cluster.add_pod(0, "bad/name"),
        Err(TestbedError::Invalid(_))
    ));
    cluster.add_pod(0, "x").unwrap();
    assert!(matches!(
        cluster.add_pod(0, "x"),
        Err(TestbedError::Invalid(_))
    ));
    let missing = Netns::named("mtb-no-such-netns");
    let err = missing.enter(|| ()).unwrap_err();
    assert!(err.to_string().contains("mtb-no-such-netns"), "{err}");
    let pod = &cluster.pods()[0];
    let err = cluster
        .run(&pod.netns, &["/nonexistent/binary"])
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/binary"), "{err}");
    let out = cluster
        .run(&pod.netns, &["ip", "link", "show", "nosuchdev"])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        Cluster::new(ClusterConfig {
            nodes: 0,
            ipv6: true
        })
        .is_err()
    );
}

#[test]
fn drop_leaves_nothing_behind() {
    if !privileged() {
        return;
    }
    let cluster = Cluster::new(ClusterConfig::default()).unwrap();
    let pod = cluster.add_pod(0, "a").unwrap();
    let node = cluster.nodes()[1].clone();
    let mut detached = cluster
        .spawn(&node.netns, sleeper(), "node-sleeper")
        .unwrap();
    detached.detach();
    let held = cluster.spawn(&pod.netns, sleeper(), "pod-sleeper").unwrap();
    let procs: Vec<(u32, u64)> = [&detached, &held]
        .iter()
        .map(|p| (p.pid(), start_time(p.pid()).unwrap()))
        .collect();
    drop(detached);
    // A socket created via enter lives in the pod; the netns must still go away on drop.
    let ip4 = pod.ip4;
    let _listener = pod
        .netns
        .enter(move || TcpListener::bind((ip4, 0)))
        .unwrap()
        .unwrap();
    let run_id = cluster.run_id().to_string();
    let dir = cluster.dir().to_path_buf();
    let mine = leftovers_of(&run_id);
    assert!(mine.len() >= 6, "netns x4, dir, processes: {mine:#?}");
    drop(cluster);
    assert!(
        leftovers_of(&run_id).is_empty(),
        "{:#?}",
        leftovers_of(&run_id)
    );
    assert!(!dir.exists());
    for (pid, start) in procs {
        assert!(gone(pid, start), "pid {pid} still running");
    }
    drop(held); // after the cluster: harmless
}

#[test]
fn panicking_test_still_cleans_up() {
    if !privileged() {
        return;
    }
    let seen = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let cluster = Cluster::new(ClusterConfig::default()).unwrap();
        let pod = cluster.add_pod(1, "doomed").unwrap();
        let p = cluster
            .spawn(&pod.netns, sleeper(), "doomed-sleeper")
            .unwrap();
        *seen.lock().unwrap() = Some((
            cluster.run_id().to_string(),
            cluster.dir().to_path_buf(),
            p.pid(),
            start_time(p.pid()).unwrap(),
        ));
        panic!("deliberate panic with a cluster up");
    });
    assert!(result.is_err());
    let (run_id, dir, pid, start) = seen.lock().unwrap().take().unwrap();
    assert!(gone(pid, start), "process survived the panic");
    assert!(
        leftovers_of(&run_id).is_empty(),
        "{:#?}",
        leftovers_of(&run_id)
    );
    // The logs are kept for reading after a panic; this test removes them itself.
    assert!(dir.join("doomed-sleeper.log").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sweep_stale_removes_dead_runs() {
    if !privileged() {
        return;
    }
    // A fake run owned by a process that is alive while the run is set up (so concurrent
    // sweeps leave it alone) and then dies without cleaning up.
    let mut owner = Command::new("sleep").arg("600").spawn().unwrap();
    let owner_pid = owner.id();
    let run_id = format!("{owner_pid}-ffffff");
    let netns = format!("mtb{run_id}-n0");
    let dir = std::path::Path::new(testbed::SCRATCH_ROOT).join(&run_id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("owner"),
        format!("{owner_pid} {}\n", start_time(owner_pid).unwrap()),
    )
    .unwrap();
    // A process of that run, recorded in its pidfile, must be killed by the sweep.
    let mut orphan = Command::new("sleep").arg("600").spawn().unwrap();
    let orphan_start = start_time(orphan.id()).unwrap();
    std::fs::write(
        dir.join("pids"),
        format!("{} {orphan_start} sleep\n", orphan.id()),
    )
    .unwrap();
    let status = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        leftovers_of(&run_id).len(),
        3,
        "{:#?}",
        leftovers_of(&run_id)
    );
    testbed::sweep_stale();
    assert_eq!(
        leftovers_of(&run_id).len(),
        3,
        "a live owner's run was swept"
    );
    owner.kill().unwrap();
    owner.wait().unwrap();

    // A live cluster in this process is not stale and must survive the sweep.
    let live = Cluster::new(ClusterConfig {
        nodes: 1,
        ipv6: false,
    })
    .unwrap();
    let removed = testbed::sweep_stale();
    // Another test's sweep may have got there first; what matters is the end state.
    assert!(
        removed.iter().all(|r| !r.contains(live.run_id())),
        "{removed:#?}"
    );
    assert!(
        leftovers_of(&run_id).is_empty(),
        "{:#?}",
        leftovers_of(&run_id)
    );
    assert!(orphan.wait_timeout_secs(10), "orphan not killed");
    assert!(!leftovers_of(live.run_id()).is_empty());
    assert!(live.nodes()[0].netns.path.exists());
}

trait WaitSecs {
    fn wait_timeout_secs(&mut self, secs: u64) -> bool;
}

impl WaitSecs for std::process::Child {
    /// Waits (polling with a deadline) for the child to exit; true if it did.
    fn wait_timeout_secs(&mut self, secs: u64) -> bool {
        let mut exited = false;
        wait_until(Duration::from_secs(secs), "child to exit", || {
            exited = matches!(self.try_wait(), Ok(Some(_)));
            exited
        });
        exited
    }
}

/// Reads `bg=<pid>` from a log once it appears.
fn background_pid(log: &std::path::Path) -> u32 {
    let mut pid = None;
    wait_until(
        Duration::from_secs(10),
        "the background pid in the log",
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            pid = text
                .lines()
                .find_map(|l| l.strip_prefix("bg=")?.trim().parse().ok());
            pid.is_some()
        },
    );
    pid.unwrap()
}

#[test]
fn process_group_goes_with_its_leader() {
    if !privileged() {
        return;
    }
    let cluster = Cluster::new(ClusterConfig {
        nodes: 1,
        ipv6: true,
    })
    .unwrap();
    let pod = cluster.add_pod(0, "grp").unwrap();
    let mut cmd = Command::new("sh");
    // Killed while running: its background child goes too.
    cmd.args(["-c", "sleep 600 & echo bg=$!; wait"]);
    let mut p = cluster.spawn(&pod.netns, cmd, "group-kill").unwrap();
    let bg = background_pid(p.log_path());
    let bg_start = start_time(bg).unwrap();
    p.kill();
    wait_until(Duration::from_secs(5), "background child to die", || {
        gone(bg, bg_start)
    });

    // The leader exits on its own: the leftover child is killed when the leader is reaped.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "sleep 600 & echo bg=$!"]);
    let mut p = cluster.spawn(&pod.netns, cmd, "group-exit").unwrap();
    let bg = background_pid(p.log_path());
    let bg_start = start_time(bg).unwrap();
    assert!(p.wait_timeout(Duration::from_secs(10)).is_some());
    wait_until(Duration::from_secs(5), "orphaned child to die", || {
        gone(bg, bg_start)
    });
}

/// Not a test on its own: run by `sigkilled_owner_is_swept` in a child process that builds a
/// cluster, starts a process in it, reports and then hangs until it is SIGKILLed.
#[test]
#[ignore = "helper process for sigkilled_owner_is_swept"]
fn helper_cluster_then_hang() {
    if std::env::var("TESTBED_HELPER").is_err() {
        return;
    }
    let cluster = Cluster::new(ClusterConfig::default()).unwrap();
    let pod = cluster.add_pod(1, "victim").unwrap();
    let p = cluster
        .spawn(&pod.netns, sleeper(), "victim-sleeper")
        .unwrap();
    // On a line of its own: libtest has already written "test ... " without a newline.
    println!("\nRUN {} {}", cluster.run_id(), p.pid());
    // Never hang for long if the parent test went away without killing us.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        std::thread::park_timeout(deadline - std::time::Instant::now());
    }
    panic!("helper was not killed within 60 s");
}

#[test]
fn sigkilled_owner_is_swept() {
    use std::io::BufRead;
    if !privileged() {
        return;
    }
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_cluster_then_hang",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TESTBED_HELPER", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(helper.stdout.take().unwrap()).lines();
    let report = lines
        .find_map(|l| l.ok()?.strip_prefix("RUN ").map(str::to_string))
        .expect("the helper reports its run");
    let (run_id, pid) = report.split_once(' ').unwrap();
    let pid: u32 = pid.parse().unwrap();
    let start = start_time(pid).unwrap();
    assert!(
        leftovers_of(run_id).len() >= 5,
        "{:#?}",
        leftovers_of(run_id)
    );
    helper.kill().unwrap(); // SIGKILL: no Drop runs
    helper.wait().unwrap();
    assert!(!leftovers_of(run_id).is_empty());
    testbed::sweep_stale();
    assert!(
        leftovers_of(run_id).is_empty(),
        "{:#?}",
        leftovers_of(run_id)
    );
    wait_until(
        Duration::from_secs(5),
        "the dead run's process to die",
        || gone(pid, start),
    );
}
