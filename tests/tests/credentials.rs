//! Local mode's credentials are root's alone (audit H3): as user `nobody`, a node token cannot
//! be read and meshd's socket cannot be used; the run and state directories are 0700, tokens
//! 0600. Needs root (it builds a one-node mesh, and switches to `nobody` with setpriv).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use localmesh::{LocalMesh, MeshOptions};

/// Runs `argv` as user `nobody` (uid and gid 65534, no supplementary groups).
fn as_nobody(argv: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(argv)
        .output()
        .expect("running setpriv")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn nobody_can_neither_read_a_token_nor_use_meshd() {
    if !mesh_tests::privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions {
        nodes: 1,
        ..Default::default()
    })
    .expect("local mesh");
    let node = mesh.cluster.nodes()[0].name.clone();
    let token = mesh.dir().join(format!("{node}.token"));
    assert_eq!(mode(&token), 0o600, "{}", token.display());
    for dir in [
        mesh.dir().to_path_buf(),
        mesh.state_dir.clone(),
        mesh.state_dir.join("ca"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    assert_eq!(mode(&mesh.socket), 0o600);

    let token_s = token.display().to_string();
    let read = as_nobody(&["cat", &token_s]);
    let err = String::from_utf8_lossy(&read.stderr);
    assert!(
        !read.status.success() && read.stdout.is_empty(),
        "nobody read the token: {read:?}"
    );
    assert!(err.contains("Permission denied"), "EACCES expected: {err}");

    let sock = mesh.socket.display().to_string();
    let call = as_nobody(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--http2-prior-knowledge",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--unix-socket",
        &sock,
        "http://meshd/mesh.config.v1.ConfigService/Subscribe",
    ]);
    let headers = String::from_utf8_lossy(&call.stdout);
    assert!(
        !call.status.success() && !headers.contains("grpc-status"),
        "nobody talked to meshd: {call:?}"
    );
}

/// As on a real cluster: meshd on a node's address, over TLS; every ztunnel verifies it against
/// the mesh root it was given (`--meshd-ca`), gets its config and certificates, and a client on
/// node-0 reaches a server on node-1 over HBONE.
#[test]
fn meshd_over_tls_serves_the_whole_mesh() {
    if !mesh_tests::privileged() {
        return;
    }
    use mesh_tests::manifests::{echo_pod, namespace};
    let mesh = LocalMesh::start(MeshOptions {
        meshd_tls: true,
        ..Default::default()
    })
    .expect("local mesh with meshd over TLS");
    let yaml = [
        namespace("a", true),
        echo_pod("a", "client", 0, "client", &[8080]),
        echo_pod("a", "server", 1, "server", &[8080]),
    ]
    .concat();
    mesh.apply("10-pods.yaml", &yaml).unwrap();
    mesh.wait_enrolled("a", "client").unwrap();
    mesh.wait_enrolled("a", "server").unwrap();
    mesh.wait_listening("a", "server", 8080).unwrap();
    let client = mesh.pod("a", "client").unwrap();
    let server = mesh.pod("a", "server").unwrap();
    let target = std::net::SocketAddr::new(server.ip4.into(), 8080);
    let mut conn = mesh_tests::WhoConn::connect(&client, target).unwrap();
    let reply = conn.who("over-tls-meshd").unwrap();
    assert_eq!(mesh_tests::served_by(&reply), "server", "{reply}");
    for i in 0..2 {
        let log = mesh.ztunnel_log(i);
        assert!(
            log.contains("config snapshot from meshd"),
            "node-{i}: {log}"
        );
        assert!(
            log.contains("workload certificate issued"),
            "node-{i}: {log}"
        );
    }
    assert!(mesh.meshd_log().contains("(TLS)"), "{}", mesh.meshd_log());
}
