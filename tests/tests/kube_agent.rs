//! The node agent as it runs on a cluster (run as root): each node's real `mesh-cni agent`
//! reads the API double (`--view kube`, as its DaemonSet pod, over the fabric) and finds
//! running pods by their UID in host `/proc/<pid>/cgroup` — local mode's kubelet runs
//! containers in `kubepods/pod<uid>` cgroups as a kubelet does. What a user notices:
//! labelling a namespace enrolls the pods already running in it (no CNI ADD carries their
//! netns), marks them `ambient.istio.io/redirection: enabled` in the API, and unlabelling takes
//! both back; a killed agent comes back, finds its pods again in /proc and ztunnel keeps them —
//! a connection open across the restart keeps working.

use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::manifests::{echo_pod, namespace};
use mesh_tests::{WhoConn, privileged, served_by};

const REDIRECTION: &str = "ambient.istio.io/redirection";

fn manifests(ambient: bool) -> String {
    namespace("k", ambient)
        + &echo_pod("k", "server", 1, "server", &[8080])
        + &echo_pod("k", "client", 0, "client", &[8081])
}

fn redirection(mesh: &LocalMesh, name: &str) -> Option<String> {
    let pod = mesh.api()?.get("v1", "Pod", Some("k"), name)?;
    pod["metadata"]["annotations"][REDIRECTION]
        .as_str()
        .map(str::to_string)
}

#[test]
fn the_kube_view_agent_enrolls_running_pods_and_finds_them_again_after_a_restart() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions {
        api: true,
        api_cni: true,
        ..MeshOptions::default()
    })
    .expect("start mesh");
    mesh.apply("00-k.yaml", &manifests(false)).unwrap();
    mesh.wait_listening("k", "server", 8080).unwrap();
    mesh.wait_listening("k", "client", 8081).unwrap();
    assert!(!mesh.captured("k", "server").unwrap());

    // Running pods, then the label: only /proc can tell the agent where they are.
    mesh.apply("00-k.yaml", &manifests(true)).unwrap();
    for name in ["server", "client"] {
        mesh.wait_enrolled("k", name)
            .unwrap_or_else(|e| panic!("{e}\nagent log (node-1):\n{}", mesh.agent_log(1)));
        wait_for(
            Duration::from_secs(10),
            "the redirection annotation",
            || Ok(redirection(&mesh, name).as_deref() == Some("enabled")),
        )
        .unwrap();
    }
    let (server, client) = (
        mesh.pod("k", "server").unwrap(),
        mesh.pod("k", "client").unwrap(),
    );
    let mut live = WhoConn::connect(&client, (server.ip4, 8080).into()).unwrap();
    assert_eq!(served_by(&live.who("before").unwrap()), "server");

    // The agent dies and comes back: it must find both pods again before it serves ZDS, or
    // ztunnel's snapshot would unenroll them.
    for i in 0..2 {
        mesh.stop_agent(i, false);
        mesh.start_agent(i).unwrap();
        mesh.wait_ztunnel_connected(i).unwrap();
    }
    for name in ["server", "client"] {
        assert!(
            mesh.captured("k", name).unwrap(),
            "{name} unenrolled by the restart"
        );
    }
    assert_eq!(served_by(&live.who("after").unwrap()), "server");

    mesh.apply("00-k.yaml", &manifests(false)).unwrap();
    for name in ["server", "client"] {
        mesh.wait_unenrolled("k", name).unwrap();
        wait_for(Duration::from_secs(10), "the annotation removed", || {
            Ok(redirection(&mesh, name).is_none())
        })
        .unwrap();
    }
}
