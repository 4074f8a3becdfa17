//! ztunnel's ZDS enrollment source (`--enrollment zds`) end to end, with a fake CNI agent: the
//! test holds the agent's side of ZDS (`dataplane::zds::AgentSession`) and hands a real pod's
//! network namespace to a real ztunnel process on node-0. The pod (`zb/client`) lives in a
//! namespace that is NOT ambient, so the config never enrolls it: whatever capture it gets
//! comes from ZDS. Its peer `za/server` (node-1, config-enrolled) is STRICT, so a connection
//! from the client reaches it only if it was captured and carried over HBONE.
//!
//! The mesh, the fake agent and the pods are `zds_harness`'s (shared with zds_paths and
//! zds_exclusions).
//!
//! Asserts what a user (the agent, the pod's app) notices: the ack comes with capture already
//! in place, del and a snapshot without the pod take capture away, a bad netns is refused with
//! a reason, an agent reconnect keeps capture, and readiness waits for the snapshot.

mod zds_harness;

use std::os::fd::AsFd;
use std::path::Path;

use dataplane::zds::AgentSession;
use localmesh::wait_for;
use mesh_tests::privileged;
use zds_harness::{DEADLINE, POD_UID, Zds, client_info, client_pod};

/// `add` for `zb/client` under `uid` with the netns at `netns` (any path: refusals too).
fn add(z: &Zds, agent: &mut AgentSession, uid: &str, netns: &Path) -> Result<(), String> {
    let fd = std::fs::File::open(netns).expect("open netns");
    z.rt.block_on(agent.add(uid, client_info(), fd.as_fd()))
        .expect("add exchange")
}

/// node-0 ztunnel's `/healthz/ready`: Ok, or the reason it is not ready.
fn ready(z: &Zds) -> Result<(), String> {
    let node0 = z.mesh.cluster.nodes()[0].clone();
    let url = "http://127.0.0.1:15021/healthz/ready";
    let out = z
        .mesh
        .cluster
        .run(
            &node0.netns,
            &["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}", url],
        )
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    match code.trim() {
        "200" => Ok(()),
        code => Err(format!("{code}: {body}")),
    }
}

fn enrolled_uids(z: &Zds) -> Vec<String> {
    z.dump()["pods"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|p| p["podUid"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `zb/client` gets through to the STRICT server: only over HBONE, i.e. captured.
fn reaches(z: &Zds) -> bool {
    z.reaches("zb", "client", &z.addr("za", "server", 8080))
}

#[test]
fn zds_agent_enrolls_a_pod_before_acking_and_takes_it_back() {
    if !privileged() {
        return;
    }
    let s = zds_harness::start(&client_pod("client", "{}"), &[], false);
    let client = s.mesh.pod("zb", "client").unwrap();

    // Connected, no snapshot yet: not ready, and says why.
    let mut agent = s.accept();
    let r = ready(&s);
    assert!(
        r.as_ref().is_err_and(|e| e.contains("snapshot")),
        "ready before the snapshot: {r:?}"
    );

    // The ack means captured: the pod's very next connection goes over HBONE.
    add(&s, &mut agent, POD_UID, &client.netns.path).expect("add acked");
    assert!(
        reaches(&s),
        "connection right after the ack was not captured"
    );
    let dump = s.dump();
    assert_eq!(dump["enrollment"]["source"], "zds");
    let pod = &dump["pods"][0];
    assert_eq!(pod["podUid"], POD_UID);
    assert_eq!(pod["uid"], "zb/client");
    assert_eq!(pod["identity"], "spiffe://cluster.local/ns/zb/sa/client");
    assert!(
        pod["ips"]
            .as_array()
            .is_some_and(|ips| ips.iter().any(|ip| ip == &client.ip4.to_string())),
        "{pod}"
    );

    // The same pod again (same netns): idempotent. Another uid with its netns, or the host's
    // netns: refused with a reason, nothing enrolled.
    add(&s, &mut agent, POD_UID, &client.netns.path).expect("re-add of the same pod is acked");
    let e = add(&s, &mut agent, "other-uid", &client.netns.path)
        .expect_err("a netns already enrolled as another pod");
    assert!(e.contains("already enrolled as another pod"), "{e}");
    // The node's own namespace (where ztunnel and host-network pods live) and an fd that is no
    // network namespace at all.
    let node0 = s.mesh.cluster.nodes()[0].netns.path.clone();
    let e = add(&s, &mut agent, "node-uid", &node0).expect_err("the node's netns must be refused");
    assert!(e.contains("not a pod's"), "{e}");
    let e = add(&s, &mut agent, "file-uid", Path::new("/etc/hostname"))
        .expect_err("a file is no netns");
    assert!(e.contains("is not a network namespace"), "{e}");
    assert_eq!(enrolled_uids(&s), vec![POD_UID.to_string()]);

    // Snapshot done: ready once the pod's certificate is in.
    s.rt.block_on(agent.snapshot_sent())
        .expect("snapshot exchange")
        .expect("snapshot acked");
    wait_for(DEADLINE, "ztunnel ready after the snapshot", || {
        Ok(ready(&s).is_ok())
    })
    .unwrap();

    // The agent goes away: capture stays, readiness goes; it comes back and keeps the pod.
    drop(agent);
    // (ztunnel reconnects at once — the socket still listens — and is not ready again until
    // the new session's snapshot.)
    wait_for(DEADLINE, "ztunnel to notice the agent left", || {
        Ok(ready(&s).is_err_and(|e| {
            e.contains("not connected") || e.contains("waiting for the CNI agent's snapshot")
        }))
    })
    .unwrap();
    assert!(reaches(&s), "capture must stay while the agent is away");
    let mut agent = s.accept();
    s.rt.block_on(agent.keep(POD_UID))
        .expect("keep exchange")
        .expect("keep acked");
    s.rt.block_on(agent.snapshot_sent())
        .expect("snapshot exchange")
        .expect("snapshot acked");
    assert_eq!(enrolled_uids(&s), vec![POD_UID.to_string()]);
    assert!(reaches(&s), "a reconnect must keep capture");

    // Del: capture goes, at once.
    s.rt.block_on(agent.del(POD_UID))
        .expect("del exchange")
        .expect("del acked");
    assert!(enrolled_uids(&s).is_empty());
    assert!(!reaches(&s), "after del the pod must not be captured");

    // Back in, then a new session whose snapshot omits it: unenrolled.
    add(&s, &mut agent, POD_UID, &client.netns.path).expect("add acked");
    assert!(reaches(&s));
    drop(agent);
    let mut agent = s.accept();
    s.rt.block_on(agent.snapshot_sent())
        .expect("snapshot exchange")
        .expect("snapshot acked");
    assert!(enrolled_uids(&s).is_empty());
    assert!(
        !reaches(&s),
        "a pod missing from the snapshot must be unenrolled"
    );
}
