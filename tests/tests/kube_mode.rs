//! End-to-end Kubernetes mode on the netns cluster: real meshd (`--kubernetes`) and real
//! ztunnels, with the API server double as meshd's source (local mode's API mode). What a user
//! of a cluster would see: labelling a namespace enrolls its running pods; an
//! AuthorizationPolicy created, edited and deleted in the API is enforced accordingly; a
//! compacted history (410) or dropped watches never make a ztunnel forget anything; with the
//! API down, meshd keeps serving (a restarted ztunnel gets its config) and changes made
//! meanwhile arrive once it is back; the demo's L4 checks hold with the API as the source.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::manifests::{echo_pod, namespace};
use mesh_tests::{WhoConn, privileged};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn api_mesh() -> LocalMesh {
    LocalMesh::start(MeshOptions {
        api: true,
        ..MeshOptions::default()
    })
    .expect("start an API-mode local mesh")
}

fn api(mesh: &LocalMesh) -> &testbed::kubeapi::ApiServer {
    mesh.api().expect("the mesh runs in API mode")
}

/// Whether `from` reaches `to:port` (a WHO exchange answered by that pod).
fn reaches(mesh: &LocalMesh, from: (&str, &str), to: (&str, &str), port: u16) -> bool {
    let dst = mesh.pod(to.0, to.1).unwrap();
    match mesh.who(from.0, from.1, &format!("{}:{port}", dst.ip4), "probe") {
        Ok(w) => w.served_by == to.1,
        Err(_) => false,
    }
}

/// Waits until reachability is `want` (policy reaches ztunnel asynchronously).
fn eventually(mesh: &LocalMesh, from: (&str, &str), to: (&str, &str), port: u16, want: bool) {
    wait_for(
        WAIT,
        &format!("{from:?} → {to:?}:{port} reachable = {want}"),
        || Ok(reaches(mesh, from, to, port) == want),
    )
    .unwrap();
}

/// The pid of the process listening on TCP `port` in the pod (from `ss -p`).
fn listener_pid(mesh: &LocalMesh, ns: &str, pod: &str, port: u16) -> String {
    let out = mesh
        .exec(ns, pod, &["ss", "-Hltnp", &format!("sport = :{port}")])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split("pid=")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no listener pid on :{port} in {ns}/{pod}: {text:?}"))
}

fn deny(ns: &str, name: &str, source_ns: &str, ports: &[u16]) -> Value {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "server"}},
            "action": "DENY",
            "rules": [{
                "from": [{"source": {"namespaces": [source_ns]}}],
                "to": [{"operation": {"ports": ports}}],
            }],
        },
    })
}

#[test]
fn labelling_a_namespace_enrolls_running_pods_and_policies_follow_the_api() {
    if !privileged() {
        return;
    }
    let mesh = api_mesh();
    let mut pods = namespace("lab", false);
    pods += &echo_pod("lab", "client", 0, "client", &[8080]);
    pods += &echo_pod("lab", "server", 1, "server", &[8080]);
    mesh.apply("10-lab.yaml", &pods).unwrap();
    for p in ["client", "server"] {
        mesh.wait_listening("lab", p, 8080).unwrap();
    }
    let (client, server) = (("lab", "client"), ("lab", "server"));

    // (1) Not in the mesh: ztunnel knows the pods (meshd has them from the API) but enrolls
    // neither, and the server sees the client's own address.
    wait_for(WAIT, "node-1's ztunnel to know lab/server", || {
        Ok(mesh.config_dump(1)?["workloads"]
            .as_array()
            .is_some_and(|ws| ws.iter().any(|w| w["uid"] == "lab/server")))
    })
    .unwrap();
    assert!(!mesh.captured("lab", "client").unwrap());
    assert!(!mesh.captured("lab", "server").unwrap());
    let srv = mesh.pod("lab", "server").unwrap();
    let plain = mesh
        .who("lab", "client", &format!("{}:8080", srv.ip4), "plain")
        .unwrap();
    assert_eq!(plain.served_by, "server");
    let pids: Vec<String> = [client, server]
        .iter()
        .map(|(ns, p)| listener_pid(&mesh, ns, p, 8080))
        .collect();

    // kubectl against the double, as a user would.
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(api(&mesh).kubeconfig())
        .args([
            "label",
            "namespace",
            "lab",
            "istio.io/dataplane-mode=ambient",
        ])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl label: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (ns, p) in [client, server] {
        mesh.wait_enrolled(ns, p).unwrap();
    }
    let after: Vec<String> = [client, server]
        .iter()
        .map(|(ns, p)| listener_pid(&mesh, ns, p, 8080))
        .collect();
    assert_eq!(pids, after, "enrollment must not restart the pods");
    let who = mesh
        .who("lab", "client", &format!("{}:8080", srv.ip4), "meshed")
        .unwrap();
    assert_eq!(who.served_by, "server");
    let entry = mesh.wait_access_log(0, "peer", &who.client_local).unwrap();
    assert_eq!(
        entry["protocol"], "HBONE",
        "the labelled namespace's traffic goes through ztunnel over HBONE: {entry}"
    );

    // (2) An AuthorizationPolicy created in the API blocks; edited not to match, allows;
    // edited back, blocks; deleted, allows.
    assert!(reaches(&mesh, client, server, 8080));
    api(&mesh)
        .create(deny("lab", "no-lab", "lab", &[8080]))
        .unwrap();
    eventually(&mesh, client, server, 8080, false);
    api(&mesh)
        .put(deny("lab", "no-lab", "elsewhere", &[8080]))
        .unwrap();
    eventually(&mesh, client, server, 8080, true);
    api(&mesh)
        .put(deny("lab", "no-lab", "lab", &[8080]))
        .unwrap();
    eventually(&mesh, client, server, 8080, false);
    api(&mesh)
        .delete(
            "security.istio.io/v1",
            "AuthorizationPolicy",
            Some("lab"),
            "no-lab",
        )
        .unwrap();
    eventually(&mesh, client, server, 8080, true);

    // A waypoint Gateway created in the API runs as a pod (meshd renders its Deployment, the
    // local controller runs it and writes the Pod to the API); deleting the Gateway removes
    // the Deployment (garbage collection), then the pod, from the cluster and the API.
    mesh.api_waypoint_apply("lab", "waypoint").unwrap();
    let pods = mesh.wait_for_pods("lab", "waypoint", 1).unwrap();
    let in_api = |name: &str| api(&mesh).get("v1", "Pod", Some("lab"), name).is_some();
    assert!(in_api(&pods[0]), "the waypoint's Pod is in the API");
    api(&mesh)
        .delete(
            "gateway.networking.k8s.io/v1",
            "Gateway",
            Some("lab"),
            "waypoint",
        )
        .unwrap();
    wait_for(WAIT, "the waypoint's pod to go", || {
        Ok(mesh.pods_of("lab", "waypoint").is_empty() && !in_api(&pods[0]))
    })
    .unwrap();
}

/// What node `i`'s ztunnel holds: workload uids and policy keys.
fn held(mesh: &LocalMesh, i: usize) -> Option<(BTreeSet<String>, BTreeSet<String>)> {
    let dump = mesh.config_dump(i).ok()?;
    let strings = |list: &Value, key: &str| -> BTreeSet<String> {
        list.as_array()
            .map(|xs| {
                xs.iter()
                    .filter_map(|x| x[key].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    Some((
        strings(&dump["workloads"], "uid"),
        strings(&dump["policies"], "key"),
    ))
}

/// Sets the flag when dropped (also while unwinding from a failed assertion).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A Service the test adds to prove a change made now reaches both ztunnels.
fn marker(mesh: &LocalMesh, n: u32) {
    let name = format!("marker-{n}");
    api(mesh)
        .create(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "a"},
            "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }))
        .unwrap();
    let key = format!("a/{name}");
    wait_for(
        WAIT,
        &format!("both ztunnels to learn Service {key}"),
        || {
            for i in 0..2 {
                let has = mesh.config_dump(i)?["services"]
                    .as_array()
                    .is_some_and(|ss| ss.iter().any(|s| s["key"] == key.as_str()));
                if !has {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .unwrap();
}

/// Something done to the API server double in a round.
type Hook = fn(&testbed::kubeapi::ApiServer);

#[test]
fn expired_watches_and_an_api_outage_never_make_ztunnel_forget() {
    if !privileged() {
        return;
    }
    let mesh = api_mesh();
    let mut manifests = namespace("a", true);
    manifests += &echo_pod("a", "client", 0, "client", &[8080]);
    manifests += &echo_pod("a", "server", 1, "server", &[8080, 9090]);
    mesh.apply("10-a.yaml", &manifests).unwrap();
    for (p, port) in [("client", 8080), ("server", 8080), ("server", 9090)] {
        mesh.wait_listening("a", p, port).unwrap();
    }
    for p in ["client", "server"] {
        mesh.wait_enrolled("a", p).unwrap();
    }
    let (client, server) = (("a", "client"), ("a", "server"));
    api(&mesh)
        .create(deny("a", "no-admin", "a", &[9090]))
        .unwrap();
    eventually(&mesh, client, server, 9090, false);
    assert!(reaches(&mesh, client, server, 8080));
    let baseline: Vec<(BTreeSet<String>, BTreeSet<String>)> = (0..2)
        .map(|i| held(&mesh, i).expect("config dump"))
        .collect();
    assert!(
        baseline[1].1.contains("AuthorizationPolicy/a/no-admin"),
        "{baseline:?}"
    );
    let srv = mesh.pod("a", "server").unwrap();
    let cli = mesh.pod("a", "client").unwrap();
    let mut held_conn = WhoConn::connect(&cli, format!("{}:8080", srv.ip4).parse().unwrap())
        .expect("a connection that policy allows");
    held_conn.who("before").unwrap();
    let unenrolled_before: Vec<usize> = (0..2)
        .map(|i| mesh.ztunnel_log(i).matches("pod unenrolled").count())
        .collect();

    // (3) While a sampler watches both ztunnels' config, watches are dropped (cleanly and
    // cut) and the history is compacted so they resume with 410 and re-list; each round
    // ends when a change made after it reaches both ztunnels (meshd watches again).
    let stop = AtomicBool::new(false);
    let lost: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for (i, base) in baseline.iter().enumerate() {
                    let Some((ws, ps)) = held(&mesh, i) else {
                        continue;
                    };
                    let mut l = lost.lock().unwrap();
                    for w in base.0.difference(&ws) {
                        l.push(format!("node-{i} dropped workload {w}"));
                    }
                    for p in base.1.difference(&ps) {
                        l.push(format!("node-{i} dropped policy {p}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // A failing assertion below must stop the sampler too, or the scope never ends.
        let _stop = StopOnDrop(&stop);
        let rounds: [(&str, Hook); 4] = [
            ("clean drop", |a| a.drop_watches(true)),
            ("cut drop", |a| a.drop_watches(false)),
            ("compaction + clean drop", |a| {
                a.compact();
                a.drop_watches(true)
            }),
            ("compaction + cut drop", |a| {
                a.compact();
                a.drop_watches(false)
            }),
        ];
        for (n, (what, hook)) in rounds.iter().enumerate() {
            hook(api(&mesh));
            assert!(
                !reaches(&mesh, client, server, 9090),
                "{what}: the DENY policy stopped holding"
            );
            assert!(
                reaches(&mesh, client, server, 8080),
                "{what}: allowed traffic refused"
            );
            marker(&mesh, n as u32);
        }
    });
    let lost = lost.into_inner().unwrap();
    assert!(lost.is_empty(), "ztunnels forgot config: {lost:?}");
    for (i, before) in unenrolled_before.iter().enumerate() {
        assert_eq!(
            mesh.ztunnel_log(i).matches("pod unenrolled").count(),
            *before,
            "node-{i}'s ztunnel unenrolled a pod"
        );
    }
    assert_eq!(
        held_conn.who("after").unwrap()["served_by"],
        "server",
        "a connection open through it all stays up"
    );

    // (4) The API goes down: meshd keeps serving. A ztunnel restarted meanwhile gets its
    // config from meshd (and certificates: its token's review is remembered) and traffic
    // works; a change made meanwhile (the policy deleted) arrives once the API is back.
    api(&mesh).go_down();
    mesh.stop_ztunnel(1, true);
    mesh.start_ztunnel(1).unwrap();
    mesh.wait_enrolled("a", "server").unwrap();
    eventually(&mesh, client, server, 8080, true);
    assert!(
        !reaches(&mesh, client, server, 9090),
        "the restarted ztunnel lost the policy"
    );
    api(&mesh)
        .delete(
            "security.istio.io/v1",
            "AuthorizationPolicy",
            Some("a"),
            "no-admin",
        )
        .unwrap();
    assert!(
        !reaches(&mesh, client, server, 9090),
        "the API is down: the deletion cannot have reached meshd yet"
    );
    api(&mesh).come_back();
    eventually(&mesh, client, server, 9090, true);
}

/// (5) The demo's L4 checks (pod IPs in both families, a Service VIP, mesh ↔ plain, STRICT,
/// a DENY policy) with the API as meshd's source; `cargo xtask demo --api` runs all of them.
#[test]
fn the_demos_l4_checks_pass_with_the_api_as_the_source() {
    if !privileged() {
        return;
    }
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let ok = localmesh::demo::run(localmesh::demo::DemoOptions {
        api: true,
        l4_only: true,
        ..localmesh::demo::DemoOptions::new(examples)
    })
    .expect("run the demo in API mode");
    assert!(ok, "a demo check failed in API mode (its report is above)");
}
