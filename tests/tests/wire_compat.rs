//! Wire compatibility with an independent HBONE implementation.
//!
//! `tests/py/hbone_client.py` and `tests/py/hbone_server.py` speak HBONE (TLS 1.3 mutual auth,
//! ALPN h2, HTTP/2 CONNECT) using only Python's `ssl` and the `h2` package — no code shared with
//! the mesh. Our ztunnel is checked as a server against the Python client, and as a client
//! against the Python server, which records exactly what arrived on the wire.
//!
//! Each test builds its own local mesh (root needed) and tears it down even when it fails.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use localmesh::client::field;
use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::privileged;
use meshcore::Identity;
use meshcore::ca::CertAuthority;
use meshcore::tls::WorkloadCert;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(20);
const CERT_LIFETIME: Duration = Duration::from_secs(3600);

/// The Python interpreter that has `h2` (`$MESH_PYTHON`, else `python3` from PATH, as xtask installs it).
fn python() -> String {
    std::env::var("MESH_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join(name)
        .display()
        .to_string()
}

fn addr(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// Namespace `wire` is ambient, `outside` is not.
const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: wire, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: outside}
"#;

/// A pod on `node-<node>`; `command` empty means no container at all (a bare network namespace).
fn pod(ns: &str, name: &str, node: usize, sa: &str, command: &[&str]) -> String {
    mesh_tests::manifests::pod(ns, name, node, sa, command)
}

/// The mesh's own CA (the files meshd created under `state/ca`).
fn mesh_ca(mesh: &LocalMesh) -> CertAuthority {
    let dir = mesh.state_dir.join("ca");
    // load_or_create would make a *new* root if meshd had not written one yet: wait for both files.
    wait_for(DEADLINE, "meshd to create its CA root", || {
        Ok(dir.join("root-cert.pem").exists() && dir.join("root-key.pem").exists())
    })
    .unwrap();
    CertAuthority::load_or_create(&dir, &mesh.opts.trust_domain).expect("load the mesh CA")
}

/// PEM files handed to the Python peers.
struct Pems {
    cert: String,
    key: String,
    ca: String,
}

/// Writes `cert`'s chain and key, and `trust_anchor` as the CA file, into the mesh's run directory.
fn write_pems(mesh: &LocalMesh, label: &str, cert: &WorkloadCert, trust_anchor: &str) -> Pems {
    let path = |what: &str| -> PathBuf { mesh.dir().join(format!("wire-{label}-{what}.pem")) };
    let (c, k, a) = (path("cert"), path("key"), path("ca"));
    std::fs::write(&c, cert.chain_pem.concat()).unwrap();
    std::fs::write(&k, &cert.key_pem).unwrap();
    std::fs::write(&a, trust_anchor).unwrap();
    let s = |p: PathBuf| p.display().to_string();
    Pems {
        cert: s(c),
        key: s(k),
        ca: s(a),
    }
}

/// Runs the Python HBONE client inside `netns`; returns its one JSON line.
fn hbone_client(
    mesh: &LocalMesh,
    netns: &testbed::Netns,
    connect: &str,
    authority: &str,
    pems: &Pems,
    send: Option<&str>,
) -> Value {
    let (py, client) = (python(), script("hbone_client.py"));
    let mut argv = vec![
        py.as_str(),
        client.as_str(),
        "--connect",
        connect,
        "--authority",
        authority,
        "--cert",
        &pems.cert,
        "--key",
        &pems.key,
        "--ca",
        &pems.ca,
        "--timeout",
        "10",
    ];
    if let Some(text) = send {
        argv.extend(["--send", text]);
    }
    let out = mesh.cluster.run(netns, &argv).expect("run hbone_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hbone_client.py failed ({}): {stdout}{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("no output; stderr: {stderr}"));
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("bad client output {line:?}: {e}; stderr: {stderr}"));
    eprintln!("hbone_client.py {connect} authority {authority}: {v}");
    v
}

fn is_refused(v: &Value) -> bool {
    v.get("status").is_none()
        && matches!(
            v.get("error").and_then(Value::as_str),
            Some("tls" | "closed" | "reset")
        )
}

/// The last `n` lines of a log, for assertion messages.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Our ztunnel as the HBONE server, the Python client as the peer.

/// Ambient pod `wire/server` (node-1, sa `api`, echo on 8080) and non-ambient `outside/outsider`
/// (node-0) to run the Python client from: its traffic is not captured.
fn server_mesh() -> LocalMesh {
    let mesh = LocalMesh::start(MeshOptions::default()).expect("start local mesh");
    mesh.apply("00-ns.yaml", NAMESPACES).unwrap();
    let mut pods = pod(
        "wire",
        "server",
        1,
        "api",
        &["mesh-echo", "serve", "--port", "8080"],
    );
    pods += &pod("outside", "outsider", 0, "default", &[]);
    mesh.apply("10-pods.yaml", &pods).unwrap();
    mesh.wait_listening("wire", "server", 8080).unwrap();
    mesh.wait_enrolled("wire", "server").unwrap();
    mesh
}

#[test]
fn independent_client_gets_200_and_400() {
    if !privileged() {
        return;
    }
    let mesh = server_mesh();
    let td = mesh.opts.trust_domain.clone();
    let server = mesh.pod("wire", "server").unwrap();
    let outsider = mesh.pod("outside", "outsider").unwrap();
    let ca = mesh_ca(&mesh);
    let cert = ca
        .mint(&Identity::new(&td, "outside", "wire-tester"), CERT_LIFETIME)
        .unwrap();
    let pems = write_pems(&mesh, "tester", &cert, ca.root_pem());

    let server_ip = IpAddr::V4(server.ip4);
    let hbone = addr(server_ip, 15008);
    let ok = hbone_client(
        &mesh,
        &outsider.netns,
        &hbone,
        &addr(server_ip, 8080),
        &pems,
        Some("WHO hi\n"),
    );
    let ztunnel1 = || tail(&mesh.ztunnel_log(1), 20);
    assert_eq!(
        ok["status"],
        200,
        "CONNECT to the pod's own IP must get 200: {ok}\nztunnel-1:\n{}",
        ztunnel1()
    );
    assert_eq!(ok["tls_version"], "TLSv1.3", "{ok}");
    assert_eq!(ok["alpn"], "h2", "{ok}");
    assert_eq!(
        ok["server_uri_sans"],
        serde_json::json!([format!("spiffe://{td}/ns/wire/sa/api")]),
        "the HBONE listener must present the pod's identity: {ok}"
    );
    let reply: Value = serde_json::from_str(ok["reply"].as_str().unwrap_or_default().trim())
        .unwrap_or_else(|e| panic!("echo reply through the tunnel is not JSON ({e}): {ok}"));
    assert_eq!(reply["served_by"], "server", "{reply}");
    assert_eq!(reply["message"], "hi", "{reply}");

    // IPv6: the same listener on the pod's v6 address.
    if let Some(ip6) = server.ip6 {
        let v6 = hbone_client(
            &mesh,
            &outsider.netns,
            &addr(IpAddr::V6(ip6), 15008),
            &addr(IpAddr::V6(ip6), 8080),
            &pems,
            Some("WHO six\n"),
        );
        assert_eq!(
            v6["status"],
            200,
            "IPv6 CONNECT: {v6}\nztunnel-1:\n{}",
            ztunnel1()
        );
        let reply: Value = serde_json::from_str(v6["reply"].as_str().unwrap_or_default().trim())
            .unwrap_or_else(|e| panic!("IPv6 echo reply is not JSON ({e}): {v6}"));
        assert_eq!(reply["served_by"], "server", "{reply}");
    }

    // An authority naming another IP than the pod behind this listener: 400, not a tunnel.
    let other = addr(IpAddr::V4(outsider.ip4), 8080);
    let bad = hbone_client(&mesh, &outsider.netns, &hbone, &other, &pems, None);
    assert_eq!(
        bad["status"],
        400,
        "CONNECT {other} at {hbone} must get 400: {bad}\nztunnel-1:\n{}",
        ztunnel1()
    );
}

#[test]
fn foreign_trust_domain_and_no_san_refused() {
    if !privileged() {
        return;
    }
    let mesh = server_mesh();
    let td = mesh.opts.trust_domain.clone();
    let server = mesh.pod("wire", "server").unwrap();
    let outsider = mesh.pod("outside", "outsider").unwrap();
    let ca = mesh_ca(&mesh);
    let server_ip = IpAddr::V4(server.ip4);
    let (hbone, authority) = (addr(server_ip, 15008), addr(server_ip, 8080));
    let ztunnel1 = || tail(&mesh.ztunnel_log(1), 20);

    // Control: a good certificate gets through, so the refusals below are about the certificate.
    let good = ca
        .mint(&Identity::new(&td, "outside", "wire-tester"), CERT_LIFETIME)
        .unwrap();
    let good = hbone_client(
        &mesh,
        &outsider.netns,
        &hbone,
        &authority,
        &write_pems(&mesh, "good", &good, ca.root_pem()),
        None,
    );
    assert_eq!(
        good["status"],
        200,
        "control with a valid mesh certificate: {good}\nztunnel-1:\n{}",
        ztunnel1()
    );

    // Another trust domain's CA: the client trusts the mesh root (so it can finish its side of
    // the handshake) and presents the foreign chain.
    let evil = CertAuthority::new_in_memory("evil.example").unwrap();
    let evil_cert = evil
        .mint(
            &Identity::new("evil.example", "wire", "tester"),
            CERT_LIFETIME,
        )
        .unwrap();
    let v = hbone_client(
        &mesh,
        &outsider.netns,
        &hbone,
        &authority,
        &write_pems(&mesh, "evil", &evil_cert, ca.root_pem()),
        Some("WHO evil\n"),
    );
    assert!(
        is_refused(&v),
        "a client certificate from another trust domain's CA must be refused at TLS: {v}\nztunnel-1:\n{}",
        ztunnel1()
    );

    // Signed by the mesh root but naming another trust domain: the chain verifies, the trust
    // domain check must still refuse it.
    let foreign = ca
        .mint(
            &Identity::new("evil.example", "wire", "tester"),
            CERT_LIFETIME,
        )
        .unwrap();
    let v = hbone_client(
        &mesh,
        &outsider.netns,
        &hbone,
        &authority,
        &write_pems(&mesh, "foreign-td", &foreign, ca.root_pem()),
        Some("WHO foreign\n"),
    );
    assert!(
        is_refused(&v),
        "a mesh-signed certificate for trust domain evil.example must be refused: {v}\nztunnel-1:\n{}",
        ztunnel1()
    );

    // Signed by the mesh root but with no SPIFFE URI SAN at all.
    let nosan = ca.mint_without_spiffe_san(CERT_LIFETIME).unwrap();
    let v = hbone_client(
        &mesh,
        &outsider.netns,
        &hbone,
        &authority,
        &write_pems(&mesh, "nosan", &nosan, ca.root_pem()),
        Some("WHO nosan\n"),
    );
    assert!(
        is_refused(&v),
        "a client certificate without SPIFFE URI SAN must be refused at TLS: {v}\nztunnel-1:\n{}",
        ztunnel1()
    );
}

// ---------------------------------------------------------------------------------------------
// Our ztunnel as the HBONE client, the Python server as the peer.

/// A running `hbone_server.py` inside the `fake` pod, and the file it records into.
struct FakeServer {
    _proc: testbed::Proc,
    record: PathBuf,
    log: PathBuf,
}

impl FakeServer {
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Ambient `wire/client` (node-0, sa `client`) and `wire/fake` (node-1, sa `fake`, no app);
/// node-1's ztunnel is then stopped gracefully, so nothing of ours listens in fake's netns while
/// the config still says fake is a mesh pod. The Python server then takes fake's :15008 with a
/// certificate for `sa/<presented_sa>` from the mesh CA, requiring client certificates.
fn client_mesh(presented_sa: &str) -> (LocalMesh, FakeServer) {
    // Uninstalled from node 1, not restarted: fake must be free of capture.
    let mesh = LocalMesh::start(MeshOptions {
        unenroll_on_exit: true,
        ..MeshOptions::default()
    })
    .expect("start local mesh");
    mesh.apply("00-ns.yaml", NAMESPACES).unwrap();
    let mut pods = pod("wire", "client", 0, "client", &[]);
    pods += &pod("wire", "fake", 1, "fake", &[]);
    mesh.apply("10-pods.yaml", &pods).unwrap();
    mesh.wait_enrolled("wire", "client").unwrap();
    mesh.wait_enrolled("wire", "fake").unwrap();
    mesh.stop_ztunnel(1, true);
    // Nothing of ours left in fake's netns (meshd's config still says it is captured).
    wait_for(
        Duration::from_secs(20),
        "wire/fake to be unenrolled",
        || {
            Ok(!mesh.captured("wire", "fake")?
                && !mesh.listening("wire", "fake", meshcore::HBONE_PORT)?
                && !mesh.nft_table_present("wire", "fake")?)
        },
    )
    .unwrap();

    let td = mesh.opts.trust_domain.clone();
    let ca = mesh_ca(&mesh);
    let cert = ca
        .mint(&Identity::new(&td, "wire", presented_sa), CERT_LIFETIME)
        .unwrap();
    let pems = write_pems(
        &mesh,
        &format!("server-{presented_sa}"),
        &cert,
        ca.root_pem(),
    );
    let record = mesh.dir().join(format!("wire-server-{presented_sa}.jsonl"));
    let fake = mesh.pod("wire", "fake").unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(script("hbone_server.py"))
        .args([
            "--listen",
            "0.0.0.0:15008",
            "--cert",
            &pems.cert,
            "--key",
            &pems.key,
            "--ca",
            &pems.ca,
            "--record",
        ])
        .arg(&record);
    let proc = mesh
        .cluster
        .spawn(&fake.netns, cmd, &format!("hbone-server-{presented_sa}"))
        .unwrap();
    let log = proc.log_path().to_path_buf();
    let server = FakeServer {
        _proc: proc,
        record,
        log,
    };
    wait_for(DEADLINE, "hbone_server.py to listen", || {
        let text = server.log();
        anyhow::ensure!(
            !text.contains("Traceback"),
            "hbone_server.py crashed:\n{text}"
        );
        Ok(text.lines().any(|l| l.trim() == "listening"))
    })
    .unwrap();
    (mesh, server)
}

/// A plain TCP connection from inside `pod` (so that pod's capture applies to it).
fn connect_from(pod: &testbed::Pod, to: SocketAddr) -> TcpStream {
    let s = pod
        .netns
        .enter(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap()
        .unwrap_or_else(|e| panic!("connect to {to} from {}: {e}", pod.name));
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

fn header<'a>(rec: &'a Value, name: &str) -> Vec<&'a str> {
    rec["headers"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .filter(|h| h[0].as_str() == Some(name))
                .filter_map(|h| h[1].as_str())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn our_client_speaks_exact_hbone() {
    if !privileged() {
        return;
    }
    let (mesh, server) = client_mesh("fake");
    let td = mesh.opts.trust_domain.clone();
    let client = mesh.pod("wire", "client").unwrap();
    let fake = mesh.pod("wire", "fake").unwrap();
    let target = SocketAddr::new(IpAddr::V4(fake.ip4), 8080);
    let context = || {
        format!(
            "\nztunnel-0:\n{}\nhbone_server.py:\n{}",
            tail(&mesh.ztunnel_log(0), 20),
            server.log()
        )
    };

    let mut s = connect_from(&client, target);
    let local = s.local_addr().unwrap();
    let payload = format!("wire-compat-{}\n", mesh.cluster.run_id());
    s.write_all(payload.as_bytes()).unwrap();
    let mut echoed = vec![0u8; payload.len()];
    if let Err(e) = s.read_exact(&mut echoed) {
        panic!("no echo through our HBONE client: {e}{}", context());
    }
    assert_eq!(
        String::from_utf8_lossy(&echoed),
        payload,
        "echo through the tunnel{}",
        context()
    );
    // Half-close: our FIN must end the stream, the server ends its side, and we read EOF.
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let half_close = s.read_to_end(&mut rest);

    let mut records = Vec::new();
    wait_for(DEADLINE, "hbone_server.py to record the request", || {
        records = server.records();
        Ok(records.iter().any(|r| r["event"] == "request"))
    })
    .unwrap_or_else(|e| panic!("{e}: records {records:?}{}", context()));
    let requests: Vec<&Value> = records.iter().filter(|r| r["event"] == "request").collect();
    assert_eq!(
        requests.len(),
        1,
        "one TCP connection must be one CONNECT: {records:?}"
    );
    let rec = requests[0];
    eprintln!("hbone_server.py recorded: {rec}");

    assert_eq!(rec["tls_version"], "TLSv1.3", "{rec}");
    assert_eq!(rec["alpn"], "h2", "{rec}");
    assert_eq!(
        rec["sni_callback_called"], true,
        "the server's SNI callback did not run, so SNI was not observed: {rec}"
    );
    assert!(
        rec["sni"].is_null(),
        "HBONE clients send no SNI, got {}",
        rec["sni"]
    );
    let cipher = rec["cipher"].as_str().unwrap_or_default();
    assert!(
        ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"].contains(&cipher),
        "cipher suite {cipher} is not one Istio uses"
    );
    assert_eq!(
        rec["peer_uri_sans"],
        serde_json::json!([format!("spiffe://{td}/ns/wire/sa/client")]),
        "the client certificate must carry the client pod's identity: {rec}"
    );
    let pseudo: Vec<(&str, &str)> = rec["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| Some((h[0].as_str()?, h[1].as_str()?)))
        .filter(|(n, _)| n.starts_with(':'))
        .collect();
    let authority = target.to_string();
    assert_eq!(
        pseudo,
        vec![(":method", "CONNECT"), (":authority", authority.as_str())],
        "classic CONNECT: exactly :method and :authority (no :scheme, no :path): {rec}"
    );

    // The informational headers Istio's ztunnel sends.
    let missing: Vec<&str> = ["baggage", "forwarded", "traceparent"]
        .into_iter()
        .filter(|h| header(rec, h).is_empty())
        .collect();
    assert!(
        missing.is_empty(),
        "headers Istio sends are missing: {missing:?}; got {}",
        rec["headers"]
    );
    let forwarded = header(rec, "forwarded")[0];
    assert_eq!(
        forwarded,
        format!("for=\"{local}\""),
        "forwarded must name the client's address"
    );
    let baggage = header(rec, "baggage")[0];
    assert!(
        baggage.contains("k8s.namespace.name=wire"),
        "baggage {baggage:?}"
    );
    let traceparent = header(rec, "traceparent")[0];
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert!(
        parts.len() == 4
            && parts
                .iter()
                .zip([2, 32, 16, 2])
                .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit())),
        "traceparent {traceparent:?} is not W3C"
    );

    // The outbound ztunnel logged the tunnel with both identities.
    let entry = mesh.wait_access_log(0, "peer", &local.to_string()).unwrap();
    assert_eq!(field(&entry, "protocol"), "HBONE", "{entry}");
    assert_eq!(
        field(&entry, "src.identity"),
        format!("spiffe://{td}/ns/wire/sa/client"),
        "{entry}"
    );
    assert_eq!(
        field(&entry, "dst.identity"),
        format!("spiffe://{td}/ns/wire/sa/fake"),
        "{entry}"
    );

    match half_close {
        Ok(_) => assert!(rest.is_empty(), "unexpected bytes after the echo: {rest:?}"),
        Err(e) => panic!(
            "after our FIN the tunnel did not end cleanly (read: {e}){}",
            context()
        ),
    }
}

#[test]
fn our_client_refuses_wrong_server_identity() {
    if !privileged() {
        return;
    }
    let (mesh, server) = client_mesh("impostor");
    let td = mesh.opts.trust_domain.clone();
    let client = mesh.pod("wire", "client").unwrap();
    let fake = mesh.pod("wire", "fake").unwrap();
    let target = SocketAddr::new(IpAddr::V4(fake.ip4), 8080);
    let context = || {
        format!(
            "\nztunnel-0:\n{}\nhbone_server.py:\n{}",
            tail(&mesh.ztunnel_log(0), 20),
            server.log()
        )
    };

    let mut s = connect_from(&client, target);
    let local = s.local_addr().unwrap();
    // The write may land before ztunnel gives up; what matters is that nothing comes back.
    let _ = s.write_all(b"must-not-arrive\n");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "bytes came back from a server with the wrong identity: {:?}{}",
            String::from_utf8_lossy(&buf[..n]),
            context()
        ),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!(
                "ztunnel neither closed nor reset the connection within 15 s: {e}{}",
                context()
            )
        }
        Err(_) => {} // reset: refused
    }

    // ztunnel-0 logged the failure, naming the identity it saw (and the one it expected).
    let impostor = format!("spiffe://{td}/ns/wire/sa/impostor");
    let mut failed = None;
    wait_for(DEADLINE, "ztunnel-0 to log the failed connection", || {
        failed = mesh.access_log(0).into_iter().find(|e| {
            field(e, "message") == "connection failed" && field(e, "peer") == local.to_string()
        });
        Ok(failed.is_some())
    })
    .unwrap_or_else(|e| panic!("{e}{}", context()));
    let failed = failed.unwrap();
    eprintln!("ztunnel-0 access log: {failed}");
    let error = field(&failed, "error");
    assert!(
        error.contains(&impostor),
        "the failure must name the identity presented ({impostor}): {failed}"
    );
    assert!(
        error.contains(&format!("spiffe://{td}/ns/wire/sa/fake")),
        "the failure should name the expected identity: {failed}"
    );

    // The Python server saw the TLS attempt fail and never got a CONNECT.
    let mut records = Vec::new();
    wait_for(
        DEADLINE,
        "hbone_server.py to record the refused handshake",
        || {
            records = server.records();
            Ok(!records.is_empty())
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", context()));
    eprintln!("hbone_server.py recorded: {records:?}");
    assert!(
        records.iter().all(|r| r["event"] != "request"),
        "the server with the wrong identity received a CONNECT: {records:?}"
    );
    assert!(
        records.iter().any(|r| r["event"] == "handshake_failed"),
        "expected the handshake to fail at the server too: {records:?}"
    );
}

#[test]
fn independent_client_gets_401_when_policy_denies() {
    if !privileged() {
        return;
    }
    let mesh = server_mesh();
    let ca = mesh_ca(&mesh);
    let server = mesh.pod("wire", "server").unwrap();
    let outsider = mesh.pod("outside", "outsider").unwrap();
    let hbone = addr(server.ip4.into(), 15008);
    let target = addr(server.ip4.into(), 8080);
    let denied = ca
        .mint(
            &Identity::new("cluster.local", "wire", "intruder"),
            CERT_LIFETIME,
        )
        .unwrap();
    let allowed = ca
        .mint(
            &Identity::new("cluster.local", "wire", "friend"),
            CERT_LIFETIME,
        )
        .unwrap();
    let root = ca.root_pem().to_string();
    let (denied_pems, allowed_pems) = (
        write_pems(&mesh, "intruder", &denied, &root),
        write_pems(&mesh, "friend", &allowed, &root),
    );
    mesh.apply(
        "20-deny.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-intruders, namespace: wire}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/wire/sa/intruder"]}
"#,
    )
    .unwrap();
    // The policy reaches ztunnel asynchronously: wait until the intruder is refused.
    let mut last = Value::Null;
    wait_for(DEADLINE, "the DENY policy to apply", || {
        last = hbone_client(
            &mesh,
            &outsider.netns,
            &hbone,
            &target,
            &denied_pems,
            Some("WHO hi\\n"),
        );
        Ok(last.get("status").and_then(Value::as_u64) == Some(401))
    })
    .unwrap_or_else(|e| panic!("{e}: last answer {last}"));
    assert!(
        last.get("reply")
            .is_none_or(|r| r.as_str().unwrap_or("").is_empty()),
        "no byte may reach the app: {last}"
    );
    let ok = hbone_client(
        &mesh,
        &outsider.netns,
        &hbone,
        &target,
        &allowed_pems,
        Some("WHO hi\\n"),
    );
    assert_eq!(ok.get("status").and_then(Value::as_u64), Some(200), "{ok}");
}
