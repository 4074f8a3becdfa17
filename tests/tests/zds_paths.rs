//! ztunnel's ZDS enrollment (`--enrollment zds`) on the paths `zds_enroll.rs` leaves out, with a
//! fake CNI agent handing real pods' network namespaces to a real ztunnel on node-0 (harness and
//! pods: `zds_harness`):
//! - re-listen: a pod enrolled before meshd's config arrived gets the config's trust domain
//!   (new connections present the new identity) and later label changes (policy by selector),
//!   while live connections keep working;
//! - replace: `add` for the same pod uid with another netns (a re-created sandbox) moves the
//!   enrollment, leaving nothing in the old netns, in steady state and in a reconnect's
//!   snapshot; the same netns again is idempotent (same listener sockets, a live connection
//!   carries on), and so are config updates that do not concern the pod.

mod zds_harness;

use localmesh::client::field;
use localmesh::wait_for;
use mesh_tests::{WhoConn, privileged, served_by};
use zds_harness::*;

#[test]
fn zds_pod_takes_the_configs_trust_domain_and_labels_live_connections_stay() {
    if !privileged() {
        return;
    }
    // Enrolled while meshd is away: the identity uses ztunnel's --trust-domain.
    let z = start(
        &client_pod("client", "{}"),
        &["--trust-domain", "stale.example"],
        true,
    );
    let mut agent = z.accept();
    z.add(&mut agent, "client")
        .expect("add acked without a config");
    let pod = z.enrolled().expect("enrolled");
    assert_eq!(pod["identity"], "spiffe://stale.example/ns/zb/sa/client");
    z.snapshot_sent(&mut agent);

    // A live connection through the pod's inbound listener (outbound ones wait for a config:
    // ztunnel cannot tell mesh destinations from others without one).
    let client = z.mesh.pod("zb", "client").unwrap();
    let plain = z.mesh.pod("zc", "plain").unwrap();
    let mut inb = WhoConn::connect(&plain, z.sock("zb", "client", 8080)).unwrap();
    assert_eq!(served_by(&inb.who("before").unwrap()), "client");
    let server = z.addr("za", "server", 8080);
    assert!(
        !z.reaches("zb", "client", &server),
        "no certificate for the stale trust domain: STRICT must refuse"
    );

    // meshd's config names the trust domain: new listeners, the new identity on the wire.
    z.mesh.start_meshd().unwrap();
    wait_for(DEADLINE, "the pod's identity to follow the config", || {
        Ok(z.enrolled().is_some_and(|p| p["identity"] == CLIENT_ID))
    })
    .unwrap();
    // The old listeners close: only one set of ztunnel's sockets stays in the pod.
    wait_for(DEADLINE, "the pod's old listeners to close", || {
        Ok(listener_inodes(&z, "client").len() == 6)
    })
    .unwrap();
    wait_for(DEADLINE, "the client to reach the STRICT server", || {
        Ok(z.reaches("zb", "client", &server))
    })
    .unwrap();
    // The server's ztunnel logs the peer identity mTLS showed it (when the connection ends).
    let seen = || -> Vec<String> {
        z.mesh
            .access_log(1)
            .into_iter()
            .filter(|e| {
                field(e, "direction") == "inbound" && field(e, "dst.workload") == "za/server"
            })
            .map(|e| field(&e, "src.identity"))
            .collect()
    };
    wait_for(
        DEADLINE,
        "the server's ztunnel to log the client's identity",
        || Ok(seen().iter().any(|id| id == CLIENT_ID)),
    )
    .unwrap();
    let seen = seen();
    assert!(
        !seen.iter().any(|id| id.contains("stale.example")),
        "{seen:?}"
    );
    assert_eq!(served_by(&inb.who("after-td").unwrap()), "client");
    let mut out = WhoConn::connect(&client, z.sock("za", "server", 8080)).unwrap();
    assert_eq!(served_by(&out.who("before-label").unwrap()), "server");

    // A label change reaches the pod's listeners: app=locked is selected by an allow-nothing
    // policy, so new inbound connections are refused; live ones carry on.
    let client_in = z.addr("zb", "client", 8080);
    assert!(z.reaches("zc", "plain", &client_in));
    z.mesh
        .apply("10-client.yaml", &client_pod("locked", "{}"))
        .unwrap();
    wait_for(
        DEADLINE,
        "the relabelled pod to refuse new connections",
        || Ok(!z.reaches("zc", "plain", &client_in)),
    )
    .unwrap();
    assert_eq!(served_by(&out.who("after-label").unwrap()), "server");
    assert_eq!(served_by(&inb.who("after-label").unwrap()), "client");
    assert!(
        z.reaches("zb", "client", &server),
        "outbound still captured"
    );
}

#[test]
fn zds_add_with_a_new_netns_replaces_the_enrollment_and_same_netns_is_idempotent() {
    if !privileged() {
        return;
    }
    let z = start(&client_pod("client", "{}"), &[], false);
    let (pre_a, pre_b) = (sysctls(&z, "client"), sysctls(&z, "client-b"));
    let server = z.addr("za", "server", 8080);
    // With the config in, the add is final (no later update moves the listeners).
    z.wait_config();
    let mut agent = z.accept();
    z.add(&mut agent, "client").expect("add acked");
    assert!(z.reaches("zb", "client", &server));

    // The same uid and netns again: nothing moves, a live connection carries on.
    let a = z.mesh.pod("zb", "client").unwrap();
    let mut live = WhoConn::connect(&a, z.sock("za", "server", 8080)).unwrap();
    assert_eq!(served_by(&live.who("before").unwrap()), "server");
    let listeners = listener_inodes(&z, "client");
    assert!(listeners.len() >= 3, "{listeners:?}");
    z.add(&mut agent, "client").expect("re-add acked");
    assert_eq!(
        listener_inodes(&z, "client"),
        listeners,
        "re-add must keep the pod's listeners"
    );
    assert_eq!(served_by(&live.who("after re-add").unwrap()), "server");
    // Config updates that do not concern the pod leave its listeners alone.
    for i in 0..4 {
        let name = format!("noise-{i}");
        let svc = format!(
            "\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: zc}}\n\
             spec: {{selector: {{app: plain}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
        );
        z.mesh.apply("20-noise.yaml", &svc).unwrap();
        wait_for(DEADLINE, &format!("the ZDS ztunnel to see {name}"), || {
            let dump = z.dump();
            Ok(dump["services"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["key"].as_str().is_some_and(|k| k.contains(&name)))
            }))
        })
        .unwrap();
        assert_eq!(
            listener_inodes(&z, "client"),
            listeners,
            "a config update unrelated to the pod moved its listeners"
        );
    }
    z.snapshot_sent(&mut agent);

    // The sandbox was re-created (new netns, same uid): the new one is captured, nothing of
    // ours stays in the old one.
    z.add(&mut agent, "client-b")
        .expect("add with a new netns acked");
    let b_ip = z.mesh.pod("zb", "client-b").unwrap().ip4.to_string();
    let pod = z.enrolled().expect("still enrolled");
    assert_eq!(pod["ips"][0], b_ip.as_str(), "{pod}");
    assert!(
        z.reaches("zb", "client-b", &server),
        "new netns not captured"
    );
    assert!(
        !z.reaches("zb", "client", &server),
        "old netns still captured"
    );
    assert_eq!(leftovers(&z, "client", &pre_a), Vec::<String>::new());

    // The same in a reconnect's snapshot: the replaced pod is part of it, not unenrolled.
    drop(agent);
    let mut agent = z.accept();
    z.add(&mut agent, "client")
        .expect("add with the first netns acked");
    z.snapshot_sent(&mut agent);
    let pod = z
        .enrolled()
        .expect("a pod added in the snapshot must stay enrolled");
    assert_eq!(pod["ips"][0], a.ip4.to_string().as_str(), "{pod}");
    assert!(
        z.reaches("zb", "client", &server),
        "re-enrolled netns not captured"
    );
    assert!(!z.reaches("zb", "client-b", &server));
    assert_eq!(leftovers(&z, "client-b", &pre_b), Vec::<String>::new());
}
