//! Istio's port exclusion annotations (`traffic.sidecar.istio.io/excludeOutboundPorts`,
//! `excludeInboundPorts`; see ztunnel's `exclusions.rs` for what is supported) on a pod
//! enrolled over ZDS (fake CNI agent, real ztunnel: `zds_harness`): excluded traffic bypasses
//! ztunnel, the rest is captured, at enrollment and when the annotations change later. Run it
//! with MESH_CAPTURE=ebpf and =nftables.

mod zds_harness;

use localmesh::client::field;
use localmesh::wait_for;
use mesh_tests::{WhoConn, privileged, served_by};
use zds_harness::*;

#[test]
fn zds_pod_exclusion_annotations_bypass_ztunnel() {
    if !privileged() {
        return;
    }
    const EXCL: &str = "{traffic.sidecar.istio.io/excludeOutboundPorts: \"9090\", \
                        traffic.sidecar.istio.io/excludeInboundPorts: \"7070\"}";
    // zb STRICT: plaintext into the client is refused unless its port is excluded.
    let strict_zb = "\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                     metadata: {name: strict, namespace: zb}\nspec: {mtls: {mode: STRICT}}\n";
    let z = start(&(client_pod("client", EXCL) + strict_zb), &[], false);
    // The annotations come with meshd's config: have it before the add.
    z.wait_config();
    let mut agent = z.accept();
    z.add(&mut agent, "client").expect("add acked");
    z.snapshot_sent(&mut agent);

    // Outbound: 8080 captured (passes STRICT over HBONE), 9090 goes out as plaintext.
    assert!(z.reaches("zb", "client", &z.addr("za", "server", 8080)));
    assert!(
        !z.reaches("zb", "client", &z.addr("za", "server", 9090)),
        "excluded port 9090 must bypass ztunnel (plaintext, refused by STRICT)"
    );
    let client = z.mesh.pod("zb", "client").unwrap();
    let mut bypass = WhoConn::connect(&client, z.sock("zc", "plain", 9090)).unwrap();
    assert_eq!(served_by(&bypass.who("direct").unwrap()), "plain");
    let bypass_local = bypass.local_addr().unwrap().to_string();
    drop(bypass);
    // A captured connection afterwards: once its entry is logged, the bypass would be too.
    let mut captured = WhoConn::connect(&client, z.sock("zc", "plain", 8080)).unwrap();
    assert_eq!(served_by(&captured.who("via ztunnel").unwrap()), "plain");
    let captured_local = captured.local_addr().unwrap().to_string();
    drop(captured);
    wait_for(
        DEADLINE,
        "the captured connection's access-log entry",
        || {
            Ok(z.access_log()
                .iter()
                .any(|e| field(e, "peer") == captured_local))
        },
    )
    .unwrap();
    assert!(
        !z.access_log()
            .iter()
            .any(|e| field(e, "peer") == bypass_local),
        "the excluded connection went through ztunnel"
    );

    // Inbound: 8080 captured (plaintext refused by STRICT), 7070 reaches the app directly.
    assert!(!z.reaches("zc", "plain", &z.addr("zb", "client", 8080)));
    assert!(
        z.reaches("zc", "plain", &z.addr("zb", "client", 7070)),
        "excluded inbound port 7070 must bypass ztunnel"
    );

    // The annotations change after enrollment: applied in place.
    z.mesh
        .apply("10-client.yaml", &(client_pod("client", "{}") + strict_zb))
        .unwrap();
    wait_for(DEADLINE, "port 9090 to be captured again", || {
        Ok(z.reaches("zb", "client", &z.addr("za", "server", 9090)))
    })
    .unwrap();
    assert!(!z.reaches("zc", "plain", &z.addr("zb", "client", 7070)));
}
