//! The waypoint end to end, in process, over real sockets and real mTLS: a "client ztunnel"
//! (meshcore's HBONE pool, client identity) tunnels to the waypoint with the original
//! destination as the CONNECT authority; the backend "pod" is an HBONE server on its own
//! loopback address (`127.x.y.z:15008`, the pod's identity, as a destination ztunnel) that
//! records who connected and delivers to local HTTP/1.1, HTTP/2 and TCP echo apps.
//!
//! Owns only these tests; everything they start ends with the test's runtime.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshcore::Identity;
use meshcore::ca::CertAuthority;
use meshcore::hbone::{
    ConnectRequest, Dialer, H2Stream, HboneError, InboundRequest, Pool, PoolKey, PoolSettings,
    ServerSettings,
};
use meshcore::proto::config::{
    ConfigUpdate, Endpoint, Service, ServicePort, WaypointBinding, Workload,
};
use meshcore::store::ConfigStore;
use meshcore::tls::WorkloadCert;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use waypoint::app::{self, Running};
use waypoint::config::{Config, Source};

const DAY: Duration = Duration::from_secs(24 * 3600);
const DEADLINE: Duration = Duration::from_secs(20);
const TD: &str = "td";
const WEB_VIP: &str = "10.96.0.10";
const EMPTY_VIP: &str = "10.96.0.11";
const UNBOUND_VIP: &str = "10.96.0.12";

fn waypoint_id() -> Identity {
    Identity::new(TD, "app", "wp")
}
fn client_id() -> Identity {
    Identity::new(TD, "client", "cli")
}
fn backend_id() -> Identity {
    Identity::new(TD, "app", "backend")
}

/// What the backend pod saw.
#[derive(Default)]
struct Seen {
    /// Identities of HBONE peers, one per CONNECT.
    peers: Mutex<Vec<String>>,
    /// TCP connections accepted by the HTTP/1.1 app.
    http1_conns: AtomicUsize,
}

/// A backend pod on its own loopback address: HBONE on 15008 delivering to its apps on
/// 8080 (HTTP/1.1), 8082 (HTTP/2) and 9000 (TCP echo).
async fn start_backend(ca: &CertAuthority) -> (IpAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    // A random 127/8 address: 15008 there is ours alone, as a pod's would be.
    let ip = loop {
        let r: [u8; 3] = rand::random();
        let ip = IpAddr::from([127, r[0], r[1], r[2].clamp(2, 254)]);
        if let Ok(l) = TcpListener::bind((ip, 15008)).await {
            start_hbone_server(ca, l, seen.clone());
            break ip;
        }
    };
    let h1 = TcpListener::bind((ip, 8080)).await.expect("bind 8080");
    let h2 = TcpListener::bind((ip, 8082)).await.expect("bind 8082");
    let echo = TcpListener::bind((ip, 9000)).await.expect("bind 9000");
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = h1.accept().await {
            s.http1_conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(app))
                    .with_upgrades(),
            );
        }
    });
    tokio::spawn(async move {
        while let Ok((tcp, _)) = h2.accept().await {
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service_fn(app)),
            );
        }
    });
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (ip, seen)
}

/// The destination ztunnel's part: terminate HBONE, note the peer, deliver to the app.
fn start_hbone_server(ca: &CertAuthority, listener: TcpListener, seen: Arc<Seen>) {
    let cert = ca.mint(&backend_id(), DAY).expect("mint backend");
    let tls = meshcore::tls::server_config(&cert).expect("server tls");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, seen) = (tls.clone(), seen.clone());
            tokio::spawn(meshcore::hbone::serve_connection(
                tcp,
                tls,
                ServerSettings::default(),
                move |req: InboundRequest| {
                    let seen = seen.clone();
                    async move {
                        seen.peers
                            .lock()
                            .unwrap()
                            .push(req.peer_identity.to_string());
                        let Ok(target) = req.authority.parse::<SocketAddr>() else {
                            return req.reject(StatusCode::BAD_REQUEST);
                        };
                        let Ok(mut app) = tokio::net::TcpStream::connect(target).await else {
                            return req.reject(StatusCode::SERVICE_UNAVAILABLE);
                        };
                        let Ok(mut tunnel) = req.accept(http::HeaderMap::new()) else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut app).await;
                    }
                },
            ));
        }
    });
}

type TestBody = BoxBody<Bytes, hyper::Error>;

/// The apps: `/echo` streams the request body back (gRPC-shaped requests get trailers),
/// an `Upgrade` gets 101 and an echo; otherwise a text reply naming path, version and host.
async fn app(mut req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    if req.headers().contains_key(http::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(full(""))
            .unwrap();
        return Ok(resp);
    }
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/grpc");
    if req.uri().path() == "/echo" || grpc {
        let body = req.into_body();
        let body: TestBody = if grpc {
            // Data frames as they come, then gRPC's status trailers.
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "7".parse().unwrap());
            trailers.insert("grpc-message", "denied-by-test".parse().unwrap());
            body.with_trailers(async move { Some(Ok(trailers)) })
                .boxed()
        } else {
            body.boxed()
        };
        let mut resp = Response::new(body);
        if grpc {
            resp.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
        }
        return Ok(resp);
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let text = format!(
        "path={} version={:?} host={host}",
        req.uri().path(),
        req.version()
    );
    Ok(Response::new(full(&text)))
}

fn full(s: &str) -> TestBody {
    Full::new(Bytes::from(s.to_string()))
        .map_err(|n: Infallible| match n {})
        .boxed()
}

fn port(port: u32, target: u32, name: &str, app_protocol: &str) -> ServicePort {
    ServicePort {
        port,
        target_port: target,
        name: name.into(),
        app_protocol: app_protocol.into(),
    }
}

fn bound() -> Option<WaypointBinding> {
    Some(WaypointBinding {
        gateway: "app/wp".into(),
        service: "app/wp".into(),
        unavailable: String::new(),
    })
}

/// The mesh as the waypoint sees it: `web` (bound, one backend pod), `empty` (bound, no
/// endpoints), `other` (not bound to this waypoint).
fn store(backend_ip: IpAddr) -> ConfigStore {
    let endpoints = vec![Endpoint {
        workload_uid: "app/backend-0".into(),
        ports: HashMap::new(),
    }];
    let svc = |name: &str, vip: &str, endpoints: Vec<Endpoint>, waypoint| Service {
        key: format!("app/{name}"),
        name: name.into(),
        namespace: "app".into(),
        hostname: format!("{name}.app.svc.cluster.local"),
        vips: vec![vip.into()],
        ports: vec![
            port(80, 8080, "http", ""),
            port(81, 8082, "grpc-api", "grpc"),
            port(82, 8080, "web", ""),
            port(83, 9000, "data", ""),
            port(9000, 9000, "tcp-echo", ""),
        ],
        endpoints,
        waypoint,
    };
    let mut s = ConfigStore::default();
    s.apply(ConfigUpdate {
        snapshot: true,
        version: 1,
        workloads: vec![Workload {
            uid: "app/backend-0".into(),
            name: "backend-0".into(),
            namespace: "app".into(),
            service_account: "backend".into(),
            trust_domain: TD.into(),
            ips: vec![backend_ip.to_string()],
            captured: true,
            ..Default::default()
        }],
        services: vec![
            svc("web", WEB_VIP, endpoints.clone(), bound()),
            svc("empty", EMPTY_VIP, Vec::new(), bound()),
            svc("other", UNBOUND_VIP, endpoints, None),
        ],
        ..Default::default()
    });
    s
}

struct Mesh {
    waypoint: Running,
    backend_ip: IpAddr,
    seen: Arc<Seen>,
    pool: Pool,
    client_cert: Arc<WorkloadCert>,
}

async fn mesh() -> Mesh {
    mesh_with(|_| {}).await
}

/// The mesh, with `edit` applied to the waypoint's config before it starts.
async fn mesh_with(edit: impl FnOnce(&mut Config)) -> Mesh {
    meshcore::tls::install_crypto_provider();
    let ca = CertAuthority::new_in_memory(TD).expect("ca");
    let (backend_ip, seen) = start_backend(&ca).await;
    let cert = Arc::new(ca.mint(&waypoint_id(), DAY).expect("mint waypoint"));
    let mut config = Config::new(
        "app/wp",
        IpAddr::from([127, 0, 0, 1]),
        Source::Static {
            store: Arc::new(store(backend_ip)),
            cert,
        },
    );
    for a in [
        &mut config.hbone_addr,
        &mut config.ready_addr,
        &mut config.metrics_addr,
    ] {
        a.set_port(0);
    }
    edit(&mut config);
    let waypoint = app::build(config)
        .expect("build")
        .start()
        .await
        .expect("start");
    Mesh {
        waypoint,
        backend_ip,
        seen,
        pool: Pool::new(PoolSettings::default()),
        client_cert: Arc::new(ca.mint(&client_id(), DAY).expect("mint client")),
    }
}

impl Mesh {
    /// A tunnel through the waypoint to `authority` (what a client ztunnel opens).
    async fn connect(&self, authority: &str) -> Result<H2Stream, HboneError> {
        let key = PoolKey {
            source: "client-pod".into(),
            src_identity: client_id(),
            dst_identities: vec![waypoint_id()],
            dst: self.waypoint.hbone_addr,
        };
        let dial: Dialer = Arc::new(|a| Box::pin(tokio::net::TcpStream::connect(a)));
        let req = ConnectRequest {
            authority: authority.into(),
            headers: http::HeaderMap::new(),
        };
        tokio::time::timeout(
            DEADLINE,
            self.pool.connect(key, self.client_cert.clone(), dial, req),
        )
        .await
        .expect("CONNECT within the deadline")
    }

    async fn http1(&self, authority: &str) -> hyper::client::conn::http1::SendRequest<TestBody> {
        let tunnel = self.connect(authority).await.expect("CONNECT");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
            .await
            .expect("h1");
        tokio::spawn(conn.with_upgrades());
        send
    }

    async fn http2(&self, authority: &str) -> hyper::client::conn::http2::SendRequest<TestBody> {
        let tunnel = self.connect(authority).await.expect("CONNECT");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tunnel))
                .await
                .expect("h2");
        tokio::spawn(conn);
        send
    }

    async fn metrics(&self) -> String {
        let tcp = tokio::net::TcpStream::connect(self.waypoint.metrics_addr)
            .await
            .expect("metrics");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("h1");
        tokio::spawn(conn);
        let resp = send
            .send_request(get("/metrics", "metrics"))
            .await
            .expect("scrape");
        body_text(resp).await
    }
}

fn get(path: &str, host: &str) -> Request<TestBody> {
    Request::get(path)
        .header("host", host)
        .body(full(""))
        .unwrap()
}

async fn body_text(resp: Response<Incoming>) -> String {
    let bytes = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .expect("body within the deadline")
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

async fn send1(
    s: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    req: Request<TestBody>,
) -> Response<Incoming> {
    tokio::time::timeout(DEADLINE, s.send_request(req))
        .await
        .expect("response in time")
        .expect("response")
}

#[tokio::test]
async fn http1_keep_alive_reuses_one_upstream_connection_with_the_waypoints_identity() {
    let m = mesh().await;
    let mut c = m.http1(&format!("{WEB_VIP}:80")).await;
    for path in ["/one", "/two"] {
        let resp = send1(&mut c, get(path, "web.app.svc.cluster.local")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let text = body_text(resp).await;
        // The original Host reaches the app untouched.
        assert_eq!(
            text,
            format!("path={path} version=HTTP/1.1 host=web.app.svc.cluster.local")
        );
    }
    assert_eq!(
        m.seen.http1_conns.load(Ordering::SeqCst),
        1,
        "two requests, one upstream connection"
    );
    let peers = m.seen.peers.lock().unwrap().clone();
    assert_eq!(
        peers,
        vec![waypoint_id().to_string()],
        "the pod sees the waypoint's identity, once"
    );
    // The waypoint saw the client's identity (Istio's source_principal label).
    let metrics = m.metrics().await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"web.app.svc.cluster.local\"")
        })
        .unwrap_or_else(|| panic!("no request metric in:\n{metrics}"));
    assert!(
        line.contains(&format!("source_principal=\"{}\"", client_id())),
        "{line}"
    );
    assert!(
        line.contains("response_code=\"200\"") && line.ends_with(" 2"),
        "{line}"
    );
    assert!(
        line.contains("response_flags=\"-\""),
        "completed requests carry no flag: {line}"
    );
}

#[tokio::test]
async fn chunked_request_body_streams_through_both_ways() {
    let m = mesh().await;
    let mut c = m.http1(&format!("{WEB_VIP}:80")).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
    let body = StreamBody::new(tokio_stream_from(rx)).boxed();
    let req = Request::post("/echo")
        .header("host", "web")
        .header("transfer-encoding", "chunked")
        .body(body)
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"ping-1"))))
        .await
        .unwrap();
    let resp = send1(&mut c, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The first chunk comes back while the request is still open: nothing is buffered whole.
    let first = next_data(&mut body).await;
    assert_eq!(first, "ping-1");
    tx.send(Ok(Frame::data(Bytes::from_static(b"ping-2"))))
        .await
        .unwrap();
    assert_eq!(next_data(&mut body).await, "ping-2");
    drop(tx);
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("end in time")
        .expect("end");
    assert!(rest.to_bytes().is_empty());
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn next_data(body: &mut Incoming) -> String {
    loop {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("a frame in time")
            .expect("a frame")
            .expect("frame ok");
        if let Ok(data) = frame.into_data() {
            return String::from_utf8_lossy(&data).into_owned();
        }
    }
}

#[tokio::test]
async fn websocket_upgrade_echoes() {
    let m = mesh().await;
    let mut c = m.http1(&format!("{WEB_VIP}:80")).await;
    let req = Request::get("/ws")
        .header("host", "web")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(full(""))
        .unwrap();
    let resp = send1(&mut c, req).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let up = tokio::time::timeout(DEADLINE, hyper::upgrade::on(resp))
        .await
        .expect("in time")
        .expect("upgraded");
    let mut io = TokioIo::new(up);
    io.write_all(b"hello over websocket").await.unwrap();
    let mut buf = [0u8; 20];
    tokio::time::timeout(DEADLINE, io.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&buf, b"hello over websocket");
}

#[tokio::test]
async fn h2c_requests_multiplex_on_one_upstream_http2_connection() {
    let m = mesh().await;
    let c = m.http2(&format!("{WEB_VIP}:81")).await;
    // Concurrent first requests: one upstream connection between them.
    let calls = (0..8).map(|i| {
        let mut c = c.clone();
        async move {
            let uri = format!("http://web.app.svc.cluster.local:81/h2/{i}");
            let req = Request::get(uri).body(full("")).unwrap();
            let resp = tokio::time::timeout(DEADLINE, c.send_request(req))
                .await
                .expect("in time")
                .expect("response");
            assert_eq!(resp.status(), StatusCode::OK);
            body_text(resp).await
        }
    });
    let bodies = futures::future::join_all(calls).await;
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(
            body,
            &format!("path=/h2/{i} version=HTTP/2.0 host=web.app.svc.cluster.local:81")
        );
    }
    assert_eq!(
        m.seen.peers.lock().unwrap().len(),
        1,
        "one upstream HBONE stream"
    );
}

#[tokio::test]
async fn grpc_status_and_trailers_pass_through() {
    let m = mesh().await;
    let mut c = m.http2(&format!("{WEB_VIP}:81")).await;
    // One gRPC message frame: uncompressed, 3 bytes.
    let msg = Bytes::from_static(b"\x00\x00\x00\x00\x03abc");
    let req = Request::post("http://web.app.svc.cluster.local:81/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(
            Full::new(msg.clone())
                .map_err(|n: Infallible| match n {})
                .boxed(),
        )
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, c.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .expect("in time")
        .expect("body");
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reach the client");
    assert_eq!(trailers.get("grpc-status").unwrap(), "7");
    assert_eq!(trailers.get("grpc-message").unwrap(), "denied-by-test");
    assert_eq!(collected.to_bytes(), msg);
}

/// Bytes that are not HTTP, including a NUL and CRLFs, to a TCP port and to an undeclared one.
#[tokio::test]
async fn tcp_passes_through_untouched_on_declared_and_sniffed_ports() {
    let m = mesh().await;
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    for authority in [format!("{WEB_VIP}:9000"), format!("{WEB_VIP}:83")] {
        let tunnel = m.connect(&authority).await.expect("CONNECT");
        let (mut r, mut w) = tokio::io::split(tunnel);
        let p = payload.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&p).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, r.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("read");
        writer.await.unwrap();
        assert!(
            got == payload,
            "{authority}: {} bytes back of {}",
            got.len(),
            payload.len()
        );
    }
}

#[tokio::test]
async fn undeclared_port_speaking_http_is_sniffed_as_http() {
    let m = mesh().await;
    let mut c = m.http1(&format!("{WEB_VIP}:82")).await;
    let resp = send1(&mut c, get("/sniffed", "web")).await;
    assert_eq!(
        body_text(resp).await,
        "path=/sniffed version=HTTP/1.1 host=web"
    );
    let metrics = m.metrics().await;
    assert!(
        metrics.contains("destination_port=\"82\""),
        "counted as an HTTP request:\n{metrics}"
    );
}

#[tokio::test]
async fn unknown_or_unbound_destinations_are_refused() {
    let m = mesh().await;
    for authority in [
        "10.96.0.99:80".to_string(),
        format!("{UNBOUND_VIP}:80"),
        format!("{WEB_VIP}:1234"),
    ] {
        match m.connect(&authority).await {
            Err(HboneError::Status(s)) => assert_eq!(s, StatusCode::NOT_FOUND, "{authority}"),
            Err(e) => panic!("{authority}: {e}"),
            Ok(_) => panic!("{authority}: the waypoint accepted a destination it does not serve"),
        }
    }
    match m.connect("not-an-address:80").await {
        Err(HboneError::Status(s)) => assert_eq!(s, StatusCode::BAD_REQUEST),
        other => panic!("hostname authority: {:?}", other.map(|_| ())),
    }
    assert!(
        m.seen.peers.lock().unwrap().is_empty(),
        "nothing reached the backend"
    );
}

#[tokio::test]
async fn no_endpoints_is_503_no_healthy_upstream() {
    let m = mesh().await;
    let mut c = m.http1(&format!("{EMPTY_VIP}:80")).await;
    let resp = send1(&mut c, get("/", "empty")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body_text(resp).await, "no healthy upstream");
    // The connection stays usable.
    let resp = send1(&mut c, get("/", "empty")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn ready_once_it_has_config_and_certificate() {
    let m = mesh().await;
    let tcp = tokio::net::TcpStream::connect(m.waypoint.ready_addr)
        .await
        .expect("ready port");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let resp = send
        .send_request(get("/healthz/ready", "x"))
        .await
        .expect("probe");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn plain_http_listener_forwards_to_its_backend() {
    // The backend's address is only known once it runs: the listener is configured after.
    let m = mesh().await;
    let backend = SocketAddr::new(m.backend_ip, 8080);
    let plain = mesh_with(|c| {
        c.plain_http = Some(waypoint::config::PlainHttp {
            listen: "127.0.0.1:0".parse().unwrap(),
            backend,
        })
    })
    .await;
    let addr = plain.waypoint.plain_addr.expect("plain listener");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut c, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("h1");
    tokio::spawn(conn);
    for path in ["/a", "/b"] {
        let resp = send1(&mut c, get(path, "bench.local")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            body_text(resp).await,
            format!("path={path} version=HTTP/1.1 host=bench.local")
        );
    }
    assert_eq!(
        m.seen.http1_conns.load(Ordering::SeqCst),
        1,
        "kept alive upstream too"
    );
    assert!(
        m.seen.peers.lock().unwrap().is_empty(),
        "plain TCP upstream, no HBONE"
    );
}
