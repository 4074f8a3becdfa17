//! ztunnel restarts as a DaemonSet rollout with surge does them (run as root, in both capture
//! modes): pods are handed over without failing a connection. (A plain stop-then-start fails
//! closed in between: l4.rs, `enrollment_follows_labels_and_leaves_nothing`.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::manifests::{echo_pod, namespace};
use mesh_tests::{WhoConn, privileged, served_by};

fn mesh() -> LocalMesh {
    let mesh = LocalMesh::start(MeshOptions::default()).expect("start local mesh");
    let manifests = namespace("a", true)
        + &echo_pod("a", "client", 0, "client", &[8080])
        + &echo_pod("a", "server", 1, "server", &[8080]);
    mesh.apply("00-all.yaml", &manifests).unwrap();
    for p in ["client", "server"] {
        mesh.wait_listening("a", p, 8080).unwrap();
        mesh.wait_enrolled("a", p).unwrap();
    }
    mesh
}

/// Sets the flag when dropped, so a background loop ends even if the test panics.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A second ztunnel starts beside node 0's (the client's: outbound), which is then stopped.
#[test]
fn rolling_update_of_the_clients_ztunnel_fails_no_connection() {
    if !privileged() {
        return;
    }
    rolling_update(0);
}

/// The same on node 1 (the server's: inbound HBONE). The old one tells node 0's pool to go
/// elsewhere (GOAWAY) and its pooled connection closes after the last stream.
#[test]
fn rolling_update_of_the_servers_ztunnel_fails_no_connection() {
    if !privileged() {
        return;
    }
    rolling_update(1);
}

/// A second ztunnel starts beside node `node`'s, which is then stopped. The connection open
/// through the old one keeps working while it drains, connections made all along (through
/// either) all succeed over HBONE, and the old one exits once its last connection is gone.
fn rolling_update(node: usize) {
    let mesh = mesh();
    let client = mesh.pod("a", "client").unwrap();
    let server = mesh.pod("a", "server").unwrap();
    let target = SocketAddr::new(server.ip4.into(), 8080);
    let mut live = WhoConn::connect(&client, target).unwrap();
    assert_eq!(served_by(&live.who("before").unwrap()), "server");

    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let stop_churn = SetOnDrop(&done);
        let churn = s.spawn(|| {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !done.load(Ordering::SeqCst) {
                match mesh.who("a", "client", &target.to_string(), "churn") {
                    Ok(w) if w.served_by == "server" => ok += 1,
                    Ok(w) => failed.push(format!("served by {:?}", w.served_by)),
                    Err(e) => failed.push(format!("{e:#}")),
                }
            }
            (ok, failed)
        });

        let mut old = mesh.start_ztunnel_beside(node).unwrap();
        // The new one has the pod: its listeners beside the old ones, capture re-applied.
        let pod = ["client", "server"][node];
        mesh.wait_enrolled("a", pod).unwrap();
        old.request_stop();
        // The old one keeps serving the connection it has while it drains ...
        for i in 0..3 {
            let reply = live.who(&format!("draining-{i}")).unwrap();
            assert_eq!(served_by(&reply), "server");
        }
        assert!(
            old.try_wait().unwrap().is_none(),
            "the old ztunnel exited while a connection through it was open"
        );
        // ... while new connections go through the new one, over HBONE (the new one's log is
        // its own file: on the server's node any inbound entry in it is one it served).
        let who = mesh
            .who("a", "client", &target.to_string(), "after-stop")
            .unwrap();
        let e = if node == 0 {
            mesh.wait_access_log(0, "peer", &who.client_local)
        } else {
            mesh.wait_access_log(1, "direction", "inbound")
        }
        .unwrap();
        assert_eq!(localmesh::client::field(&e, "protocol"), "HBONE", "{e}");
        // The last connection gone, the old one is done.
        drop(live);
        let status = old
            .wait_timeout(Duration::from_secs(20))
            .expect("the old ztunnel exits once its last connection ends");
        assert!(status.success(), "old ztunnel: {status:?}");

        drop(stop_churn);
        let (ok, failed) = churn.join().unwrap();
        assert!(
            failed.is_empty(),
            "{} of {} connections failed during the handover: {failed:?}",
            failed.len(),
            ok + failed.len()
        );
        eprintln!("handover: {ok} connections made during it, none failed");
        assert!(ok > 0);
    });
    // Only the new one runs now, and serves.
    wait_for(
        Duration::from_secs(10),
        "a connection after the handover",
        || {
            Ok(mesh
                .who("a", "client", &target.to_string(), "after")
                .is_ok())
        },
    )
    .unwrap();
}
