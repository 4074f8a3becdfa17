//! The waypoint test harness, in process, over real sockets and real mTLS: a "client ztunnel"
//! (meshcore's HBONE pool, client identity) tunnels to the waypoint with the original
//! destination as the CONNECT authority; each backend "pod" is an HBONE server on its own
//! loopback address (`127.x.y.z:15008`, the pod's identity, as a destination ztunnel) that
//! records who connected and delivers to local HTTP/1.1, HTTP/2 and TCP echo apps, which name
//! the pod in an `x-pod` response header.
//!
//! Owns only test scaffolding; everything it starts ends with the test's runtime.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshcore::Identity;
use meshcore::ca::CertAuthority;
use meshcore::hbone::{
    ConnectRequest, Dialer, H2Stream, HboneError, InboundRequest, Pool, PoolKey, PoolSettings,
    ServerSettings,
};
use meshcore::proto::config::{
    ConfigUpdate, Endpoint, RouteResource, Service, ServicePort, WaypointBinding, Workload,
};
use meshcore::store::ConfigStore;
use meshcore::tls::WorkloadCert;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use waypoint::app::{self, Running};
use waypoint::config::{Config, Source};

pub const DAY: Duration = Duration::from_secs(24 * 3600);
pub const DEADLINE: Duration = Duration::from_secs(20);
pub const TD: &str = "td";
pub const WEB_VIP: &str = "10.96.0.10";
pub const EMPTY_VIP: &str = "10.96.0.11";
pub const UNBOUND_VIP: &str = "10.96.0.12";

pub fn waypoint_id() -> Identity {
    Identity::new(TD, "app", "wp")
}
pub fn client_id() -> Identity {
    Identity::new(TD, "client", "cli")
}
pub fn backend_id() -> Identity {
    Identity::new(TD, "app", "backend")
}

/// What the backend pod saw.
#[derive(Default)]
pub struct Seen {
    /// Identities of HBONE peers, one per CONNECT.
    pub peers: Mutex<Vec<String>>,
    /// TCP connections accepted by the HTTP/1.1 app.
    pub http1_conns: AtomicUsize,
}

/// A backend pod on its own loopback address: HBONE on 15008 delivering to its apps on
/// 8080 (HTTP/1.1), 8082 (HTTP/2) and 9000 (TCP echo).
pub async fn start_backend(ca: &CertAuthority, name: &str) -> (IpAddr, Arc<Seen>) {
    let name: Arc<str> = name.into();
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
    let n = name.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = h1.accept().await {
            let n = n.clone();
            s.http1_conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(move |r| app(n.clone(), r)))
                    .with_upgrades(),
            );
        }
    });
    let n = name.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = h2.accept().await {
            let n = n.clone();
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service_fn(move |r| app(n.clone(), r))),
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
pub fn start_hbone_server(ca: &CertAuthority, listener: TcpListener, seen: Arc<Seen>) {
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

pub type TestBody = BoxBody<Bytes, hyper::Error>;

/// The apps: `/echo` streams the request body back (gRPC-shaped requests get trailers),
/// an `Upgrade` gets 101 and an echo; otherwise a text reply naming path, version and host.
pub async fn app(pod: Arc<str>, req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let mut resp = respond(req).await;
    if let Ok(v) = http::HeaderValue::from_str(&pod) {
        resp.headers_mut().insert("x-pod", v);
    }
    Ok(resp)
}

async fn respond(mut req: Request<Incoming>) -> Response<TestBody> {
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
        return resp;
    }
    if req.uri().path() == "/headers" {
        return Response::new(full(&headers_json(req.headers())));
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
        return resp;
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
    Response::new(full(&text))
}

pub fn full(s: &str) -> TestBody {
    Full::new(Bytes::from(s.to_string()))
        .map_err(|n: Infallible| match n {})
        .boxed()
}

pub fn port(port: u32, target: u32, name: &str, app_protocol: &str) -> ServicePort {
    ServicePort {
        port,
        target_port: target,
        name: name.into(),
        app_protocol: app_protocol.into(),
    }
}

pub fn bound() -> Option<WaypointBinding> {
    Some(WaypointBinding {
        gateway: "app/wp".into(),
        service: "app/wp".into(),
        unavailable: String::new(),
    })
}

/// The resources meshd would send for `routes`.
pub fn route_resources(routes: &[Route<'_>]) -> Vec<RouteResource> {
    routes
        .iter()
        .enumerate()
        .map(|(i, (kind, name, spec))| RouteResource {
            key: format!("{kind}/app/{name}"),
            kind: kind.to_string(),
            namespace: "app".into(),
            name: name.to_string(),
            spec_json: spec.to_string(),
            generation_order: i as i64,
        })
        .collect()
}

/// A backend pod of `web` (and `other`), with its pod labels.
pub struct Pod {
    pub name: String,
    pub ip: IpAddr,
    pub labels: Vec<(String, String)>,
    pub seen: Arc<Seen>,
}

/// A route resource as meshd sends it: (kind, name, spec as JSON), in namespace `app`.
pub type Route<'a> = (&'a str, &'a str, serde_json::Value);

/// The mesh as the waypoint sees it: `web` (bound, every pod), `empty` (bound, no
/// endpoints), `other` (not bound to this waypoint), and `routes`.
pub fn store(pods: &[Pod], routes: &[Route<'_>]) -> ConfigStore {
    let endpoints: Vec<Endpoint> = pods
        .iter()
        .map(|p| Endpoint {
            workload_uid: format!("app/{}", p.name),
            ports: HashMap::new(),
        })
        .collect();
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
        workloads: pods
            .iter()
            .map(|p| Workload {
                uid: format!("app/{}", p.name),
                name: p.name.clone(),
                namespace: "app".into(),
                service_account: "backend".into(),
                trust_domain: TD.into(),
                ips: vec![p.ip.to_string()],
                labels: p.labels.iter().cloned().collect(),
                captured: true,
                // Workload binding: traffic to the pod's IP goes through the waypoint too.
                waypoint: bound(),
                ..Default::default()
            })
            .collect(),
        services: vec![
            svc("web", WEB_VIP, endpoints.clone(), bound()),
            svc("empty", EMPTY_VIP, Vec::new(), bound()),
            svc("other", UNBOUND_VIP, endpoints, None),
        ],
        routes: route_resources(routes),
        ..Default::default()
    });
    s
}

pub struct Mesh {
    pub waypoint: Running,
    pub backend_ip: IpAddr,
    pub seen: Arc<Seen>,
    pub pods: Vec<Pod>,
    /// The waypoint's config; send a new one to change it live.
    pub config: tokio::sync::watch::Sender<Option<Arc<ConfigStore>>>,
    pub pool: Pool,
    pub client_cert: Arc<WorkloadCert>,
}

pub async fn mesh() -> Mesh {
    mesh_with(|_| {}).await
}

/// One backend pod, no routes, with `edit` applied to the waypoint's config before it starts.
pub async fn mesh_with(edit: impl FnOnce(&mut Config)) -> Mesh {
    mesh_of(&[("backend-0", &[])], &[], edit).await
}

/// Backend pods `(name, labels)` behind `web`, `routes` in force.
pub async fn mesh_of(
    pods: &[(&str, &[(&str, &str)])],
    routes: &[Route<'_>],
    edit: impl FnOnce(&mut Config),
) -> Mesh {
    meshcore::tls::install_crypto_provider();
    let ca = CertAuthority::new_in_memory(TD).expect("ca");
    let mut started = Vec::new();
    for (name, labels) in pods {
        let (ip, seen) = start_backend(&ca, name).await;
        started.push(Pod {
            name: name.to_string(),
            ip,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            seen,
        });
    }
    let cert = Arc::new(ca.mint(&waypoint_id(), DAY).expect("mint waypoint"));
    let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(store(&started, routes))));
    let mut config = Config::new(
        "app/wp",
        IpAddr::from([127, 0, 0, 1]),
        Source::Channel { config: rx, cert },
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
        backend_ip: started[0].ip,
        seen: started[0].seen.clone(),
        pods: started,
        config: tx,
        pool: Pool::new(PoolSettings::default()),
        client_cert: Arc::new(ca.mint(&client_id(), DAY).expect("mint client")),
    }
}

impl Mesh {
    /// A tunnel through the waypoint to `authority` (what a client ztunnel opens).
    pub async fn connect(&self, authority: &str) -> Result<H2Stream, HboneError> {
        let key = PoolKey {
            source: "client-pod".into(),
            src_identity: client_id(),
            dst_identities: vec![waypoint_id()],
            dst: self.waypoint.hbone_addr,
            dst_instance: String::new(),
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

    pub async fn http1(
        &self,
        authority: &str,
    ) -> hyper::client::conn::http1::SendRequest<TestBody> {
        let tunnel = self.connect(authority).await.expect("CONNECT");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
            .await
            .expect("h1");
        tokio::spawn(conn.with_upgrades());
        send
    }

    pub async fn http2(
        &self,
        authority: &str,
    ) -> hyper::client::conn::http2::SendRequest<TestBody> {
        let tunnel = self.connect(authority).await.expect("CONNECT");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tunnel))
                .await
                .expect("h2");
        tokio::spawn(conn);
        send
    }

    /// Replaces the route resources, as a delta from meshd would.
    pub fn set_routes(&self, routes: &[Route<'_>]) {
        self.config.send_modify(|current| {
            let mut next = current.as_deref().cloned().unwrap_or_default();
            let old: Vec<String> = next.routes().map(|r| r.key.clone()).collect();
            next.apply(ConfigUpdate {
                version: next.version + 1,
                removed_routes: old,
                routes: route_resources(routes),
                ..Default::default()
            });
            *current = Some(Arc::new(next));
        });
    }

    pub async fn config_dump(&self) -> serde_json::Value {
        let tcp = tokio::net::TcpStream::connect(self.waypoint.metrics_addr)
            .await
            .expect("metrics port");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("h1");
        tokio::spawn(conn);
        let resp = send
            .send_request(get("/config_dump", "admin"))
            .await
            .expect("config dump");
        serde_json::from_str(&body_text(resp).await).expect("config dump is JSON")
    }

    pub async fn metrics(&self) -> String {
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

pub fn get(path: &str, host: &str) -> Request<TestBody> {
    Request::get(path)
        .header("host", host)
        .body(full(""))
        .unwrap()
}

pub async fn body_text(resp: Response<Incoming>) -> String {
    let bytes = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .expect("body within the deadline")
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub async fn send1(
    s: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    req: Request<TestBody>,
) -> Response<Incoming> {
    tokio::time::timeout(DEADLINE, s.send_request(req))
        .await
        .expect("response in time")
        .expect("response")
}

// ---- Scripted backends (resilience tests) ----

/// What a scripted backend does with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Answer with this status (after reading the whole request body).
    Status(u16),
    /// A trailers-only gRPC answer: HTTP 200 with this `grpc-status` in the headers.
    Grpc(u32),
    /// End the stream (HTTP/2 RST_STREAM INTERNAL_ERROR) or connection (HTTP/1.1) unanswered.
    Reset,
    /// HTTP/2 RST_STREAM REFUSED_STREAM (the request was not processed).
    Refuse,
    /// Never answer.
    Stall,
    /// Answer 200 with a first body chunk, then never send the rest.
    StallBody,
}

/// A backend's script and what it saw: requests take the next scripted act, then `then`.
pub struct Script {
    acts: Mutex<std::collections::VecDeque<Act>>,
    then: Act,
    /// Requests that arrived.
    pub hits: AtomicUsize,
    /// Host (HTTP/1.1) or authority (HTTP/2) of each request, in arrival order.
    pub hosts: Mutex<Vec<String>>,
    /// Request body bytes read, per answered request.
    pub bodies: Mutex<Vec<usize>>,
    /// Make the pod's apps refuse connections: nothing listens on its app ports.
    pub dead: bool,
}

impl Script {
    pub fn new(acts: &[Act], then: Act) -> Arc<Script> {
        Arc::new(Script {
            acts: Mutex::new(acts.iter().copied().collect()),
            then,
            hits: AtomicUsize::new(0),
            hosts: Mutex::new(Vec::new()),
            bodies: Mutex::new(Vec::new()),
            dead: false,
        })
    }

    /// A pod whose app ports are closed (HBONE CONNECTs to it fail).
    pub fn dead() -> Arc<Script> {
        Arc::new(Script {
            dead: true,
            ..Arc::into_inner(Script::new(&[], Act::Stall)).expect("fresh")
        })
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn next(&self, host: String) -> Act {
        self.hits.fetch_add(1, Ordering::SeqCst);
        self.hosts.lock().unwrap().push(host);
        self.acts.lock().unwrap().pop_front().unwrap_or(self.then)
    }
}

#[derive(Debug)]
struct ScriptedReset;
impl std::fmt::Display for ScriptedReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted reset")
    }
}
impl std::error::Error for ScriptedReset {}

/// A scripted pod: HBONE on 15008 delivering to an HTTP/1.1 app on 8080 and an HTTP/2 app
/// (the `h2` crate, so it can refuse streams) on 8082, both following `script`.
pub async fn start_scripted(ca: &CertAuthority, name: &str, script: Arc<Script>) -> Pod {
    let seen = Arc::new(Seen::default());
    let ip = loop {
        let r: [u8; 3] = rand::random();
        let ip = IpAddr::from([127, r[0], r[1], r[2].clamp(2, 254)]);
        if let Ok(l) = TcpListener::bind((ip, 15008)).await {
            start_hbone_server(ca, l, seen.clone());
            break ip;
        }
    };
    if !script.dead {
        let h1 = TcpListener::bind((ip, 8080)).await.expect("bind 8080");
        let h2 = TcpListener::bind((ip, 8082)).await.expect("bind 8082");
        let s = script.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = h1.accept().await {
                let s = s.clone();
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            TokioIo::new(tcp),
                            service_fn(move |r| scripted_h1(s.clone(), r)),
                        )
                        .with_upgrades(),
                );
            }
        });
        let s = script.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = h2.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        tokio::spawn(scripted_h2(s.clone(), req, respond));
                    }
                });
            }
        });
    }
    Pod {
        name: name.to_string(),
        ip,
        labels: Vec::new(),
        seen,
    }
}

async fn scripted_h1(
    script: Arc<Script>,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, ScriptedReset> {
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let act = script.next(host);
    if act == Act::Stall {
        std::future::pending::<()>().await;
    }
    let len = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => return Err(ScriptedReset),
    };
    script.bodies.lock().unwrap().push(len);
    match act {
        Act::Status(s) => Ok(Response::builder()
            .status(s)
            .body(full(&format!("scripted {s}")))
            .unwrap()),
        Act::Grpc(code) => Ok(Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", code.to_string())
            .body(full(""))
            .unwrap()),
        Act::StallBody => Ok(Response::new(BodyExt::boxed(StallingBody(false)))),
        Act::Reset | Act::Refuse | Act::Stall => Err(ScriptedReset),
    }
}

async fn scripted_h2(
    script: Arc<Script>,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let act = script.next(host);
    match act {
        Act::Stall => std::future::pending::<()>().await,
        Act::Refuse => return respond.send_reset(h2::Reason::REFUSED_STREAM),
        _ => {}
    }
    let mut body = req.into_body();
    let mut len = 0;
    while let Some(Ok(d)) = body.data().await {
        len += d.len();
        let _ = body.flow_control().release_capacity(d.len());
    }
    script.bodies.lock().unwrap().push(len);
    let resp = match act {
        Act::Status(s) => Response::builder().status(s).body(()).unwrap(),
        Act::Grpc(code) => Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", code.to_string())
            .body(())
            .unwrap(),
        Act::StallBody => {
            let resp = Response::builder().status(200).body(()).unwrap();
            if let Ok(mut stream) = respond.send_response(resp, false) {
                let _ = stream.send_data(Bytes::from_static(b"partial"), false);
                // Keeps the stream open, its body unfinished.
                std::future::pending::<()>().await;
            }
            return;
        }
        _ => return respond.send_reset(h2::Reason::INTERNAL_ERROR),
    };
    let _ = respond.send_response(resp, true);
}

/// The mesh with scripted pods behind `web` and, behind a Service `mirror` (not bound to the
/// waypoint; a mirror target), `mirror_pods`; `routes` in force.
pub async fn scripted_mesh(
    web_pods: &[(&str, Arc<Script>)],
    mirror_pods: &[(&str, Arc<Script>)],
    routes: &[Route<'_>],
) -> Mesh {
    meshcore::tls::install_crypto_provider();
    let ca = CertAuthority::new_in_memory(TD).expect("ca");
    let mut web = Vec::new();
    for (name, script) in web_pods {
        web.push(start_scripted(&ca, name, script.clone()).await);
    }
    let mut mirror = Vec::new();
    for (name, script) in mirror_pods {
        mirror.push(start_scripted(&ca, name, script.clone()).await);
    }
    let mut s = store(&web, &[]);
    let base = store(&mirror, &[]);
    let mirror_svc = base
        .service("app/web")
        .map(|svc| Service {
            key: "app/mirror".into(),
            name: "mirror".into(),
            hostname: "mirror.app.svc.cluster.local".into(),
            vips: vec![MIRROR_VIP.into()],
            waypoint: None,
            ..svc.as_ref().clone()
        })
        .expect("web service");
    s.apply(ConfigUpdate {
        version: 2,
        workloads: mirror
            .iter()
            .filter_map(|p| base.workload(&format!("app/{}", p.name)))
            .map(|w| w.as_ref().clone())
            .collect(),
        services: vec![mirror_svc],
        routes: route_resources(routes),
        ..Default::default()
    });
    let cert = Arc::new(ca.mint(&waypoint_id(), DAY).expect("mint waypoint"));
    let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(s)));
    let mut config = Config::new(
        "app/wp",
        IpAddr::from([127, 0, 0, 1]),
        Source::Channel { config: rx, cert },
    );
    for a in [
        &mut config.hbone_addr,
        &mut config.ready_addr,
        &mut config.metrics_addr,
    ] {
        a.set_port(0);
    }
    let waypoint = app::build(config)
        .expect("build")
        .start()
        .await
        .expect("start");
    web.extend(mirror);
    Mesh {
        waypoint,
        backend_ip: web[0].ip,
        seen: web[0].seen.clone(),
        pods: web,
        config: tx,
        pool: Pool::new(PoolSettings::default()),
        client_cert: Arc::new(ca.mint(&client_id(), DAY).expect("mint client")),
    }
}

pub const MIRROR_VIP: &str = "10.96.0.13";

/// The sum of `istio_requests_total` samples whose labels include `label` (e.g.
/// `response_flags="DI"`), from a `/metrics` text.
pub fn requests_with(metrics: &str, label: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

// ---- Controlled backends (circuit breaking and outlier detection tests) ----

pub const CTL_VIP: &str = "10.96.0.20";
/// The port the controlled apps listen on in each pod (service `ctl` port 80 targets it).
pub const CTL_PORT: u16 = 8090;

/// An HTTP/1.1 app a test steers: every request is counted; the next `fail_first` requests
/// answer 500 at once; others wait while `hold` is on, until released, and answer `status`.
#[derive(Default)]
pub struct Control {
    pub status: std::sync::atomic::AtomicU16,
    pub fail_first: AtomicUsize,
    hold: std::sync::atomic::AtomicBool,
    release: tokio::sync::Notify,
    pub requests: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// TCP connections accepted.
    pub conns: AtomicUsize,
    /// TCP connections that have ended.
    pub closed: AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Control {
    /// Requests from now on wait until [`Control::release`].
    pub fn hold(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// Lets every waiting request (and later ones) through.
    pub fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.release.notify_waiters();
    }

    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Waits (up to [`DEADLINE`]) until `cond` holds of this app's counters.
    pub async fn until(&self, what: &str, cond: impl Fn(&Control) -> bool) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if cond(self) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("backend never reached: {what}"));
    }

    fn bump(&self, n: &AtomicUsize) {
        n.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    async fn handle(self: Arc<Self>, pod: Arc<str>) -> Response<TestBody> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            self.changed.notify_waiters();
            return Response::builder()
                .status(500)
                .header("x-pod", &*pod)
                .body(full(&pod))
                .unwrap();
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        self.changed.notify_waiters();
        loop {
            let released = self.release.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.hold.load(Ordering::SeqCst) {
                break;
            }
            released.await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        let status = match self.status.load(Ordering::SeqCst) {
            0 => 200,
            s => s,
        };
        Response::builder()
            .status(status)
            .header("x-pod", &*pod)
            .body(full(&pod))
            .unwrap()
    }
}

/// Starts a controlled app on `ip`:[`CTL_PORT`] (a pod's address: its HBONE server delivers
/// there).
pub async fn start_controlled(ip: IpAddr, pod: &str) -> Arc<Control> {
    let control = Arc::new(Control::default());
    let listener = TcpListener::bind((ip, CTL_PORT)).await.expect("bind ctl");
    let (c, pod): (_, Arc<str>) = (control.clone(), pod.into());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c.bump(&c.conns);
            let (c, pod) = (c.clone(), pod.clone());
            tokio::spawn(async move {
                let svc = {
                    let c = c.clone();
                    service_fn(move |_r: Request<Incoming>| {
                        let (c, pod) = (c.clone(), pod.clone());
                        async move { Ok::<_, Infallible>(c.handle(pod).await) }
                    })
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
                c.bump(&c.closed);
            });
        }
    });
    control
}

/// Pods `names` behind `web` as [`mesh_of`] starts them, each also running a controlled app,
/// and a Service `ctl` (VIP [`CTL_VIP`], port 80 → [`CTL_PORT`] and TCP port 9000 → the pods'
/// echo, bound to the waypoint) over them with `routes` in force (in effect when this returns).
pub async fn mesh_controlled(names: &[&str], routes: &[Route<'_>]) -> (Mesh, Vec<Arc<Control>>) {
    let pods: Vec<(&str, &[(&str, &str)])> = names.iter().map(|n| (*n, &[][..])).collect();
    let m = mesh_of(&pods, &[], |_| {}).await;
    let mut controls = Vec::new();
    for p in &m.pods {
        controls.push(start_controlled(p.ip, &p.name).await);
    }
    let ctl = Service {
        key: "app/ctl".into(),
        name: "ctl".into(),
        namespace: "app".into(),
        hostname: "ctl.app.svc.cluster.local".into(),
        vips: vec![CTL_VIP.into()],
        ports: vec![
            port(80, u32::from(CTL_PORT), "http", ""),
            port(9000, 9000, "tcp-echo", ""),
        ],
        endpoints: m
            .pods
            .iter()
            .map(|p| Endpoint {
                workload_uid: format!("app/{}", p.name),
                ports: HashMap::new(),
            })
            .collect(),
        waypoint: bound(),
    };
    update_mesh(&m, Vec::new(), vec![ctl], routes).await;
    (m, controls)
}

/// Adds `workloads` and `services` to the waypoint's config and replaces its routes with
/// `routes`; returns once the waypoint has compiled them (without diagnostics).
pub async fn update_mesh(
    m: &Mesh,
    workloads: Vec<Workload>,
    services: Vec<Service>,
    routes: &[Route<'_>],
) {
    let mut generation = 0;
    m.config.send_modify(|current| {
        let mut next = current.as_deref().cloned().unwrap_or_default();
        let old: Vec<String> = next.routes().map(|r| r.key.clone()).collect();
        next.apply(ConfigUpdate {
            version: next.version + 1,
            workloads,
            services,
            removed_routes: old,
            routes: route_resources(routes),
            ..Default::default()
        });
        generation = next.route_generation;
        *current = Some(Arc::new(next));
    });
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let dump = m.config_dump().await;
        if dump["routes"]["generation"] == generation {
            let diagnostics = &dump["routes"]["diagnostics"];
            assert!(
                diagnostics.as_array().is_none_or(|d| d.is_empty()),
                "routes do not compile: {diagnostics}"
            );
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "routes never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const SILENT_VIP: &str = "10.96.0.21";

/// A pod whose HBONE port accepts connections and never answers (a hung node), behind a
/// Service `silent` (VIP [`SILENT_VIP`], port 80, bound to the waypoint), with `routes` in
/// force. Returns how many connections it accepted.
pub async fn silent_pod(m: &Mesh, routes: &[Route<'_>]) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let (ip, listener) = loop {
        let r: [u8; 3] = rand::random();
        let ip = IpAddr::from([127, r[0], r[1], r[2].clamp(2, 254)]);
        if let Ok(l) = TcpListener::bind((ip, 15008)).await {
            break (ip, l);
        }
    };
    let a = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let workload = Workload {
        uid: "app/silent-0".into(),
        name: "silent-0".into(),
        namespace: "app".into(),
        service_account: "backend".into(),
        trust_domain: TD.into(),
        ips: vec![ip.to_string()],
        captured: true,
        waypoint: bound(),
        ..Default::default()
    };
    let silent = Service {
        key: "app/silent".into(),
        name: "silent".into(),
        namespace: "app".into(),
        hostname: "silent.app.svc.cluster.local".into(),
        vips: vec![SILENT_VIP.into()],
        ports: vec![port(80, 8080, "http", "")],
        endpoints: vec![Endpoint {
            workload_uid: "app/silent-0".into(),
            ports: HashMap::new(),
        }],
        waypoint: bound(),
    };
    update_mesh(m, vec![workload], vec![silent], routes).await;
    accepted
}

// ---- Telemetry and tracing (telemetry tests) ----

/// The request headers as a JSON object (`/headers` answers with it): name → value (the last
/// one, for a repeated name).
pub fn headers_json(h: &http::HeaderMap) -> String {
    let map: serde_json::Map<String, serde_json::Value> = h
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// The Python interpreter with the test packages (`$MESH_PYTHON`, else `python3`).
pub fn python() -> String {
    std::env::var("MESH_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `tests/py/<name>` in the repository.
pub fn py_script(name: &str) -> String {
    format!("{}/../tests/py/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Every sample of a Prometheus exposition, as the official `prometheus_client` parser reads
/// it: `{"name", "labels", "value", "type"}`.
pub fn prom_samples(text: &str) -> Vec<serde_json::Value> {
    use std::io::Write;
    let mut child = std::process::Command::new(python())
        .arg(py_script("prom_parse.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (cargo xtask deps)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed the parser");
    let out = child.wait_with_output().expect("parser ran");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected the exposition:\n{text}"
    );
    serde_json::from_slice(&out.stdout).expect("parser output is JSON")
}

/// An independent OTLP/gRPC collector (`tests/py/otlp_receiver.py`): the spans it received,
/// in arrival order. Ends with the test (its stdin closes, and it is killed on drop).
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<serde_json::Value>>>,
    _child: tokio::process::Child,
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(python())
            .arg(py_script("otlp_receiver.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 with grpcio and opentelemetry-proto (cargo xtask deps)");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("the receiver starts in time")
            .expect("receiver output")
            .expect("the receiver says where it listens");
        let port: u16 = first
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let s = spans.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str(&line) {
                    s.lock().unwrap().push(v);
                }
            }
        });
        OtlpReceiver {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            spans,
            _child: child,
        }
    }

    pub fn spans(&self) -> Vec<serde_json::Value> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (to the deadline) until a span satisfies `f`; returns every span so far.
    pub async fn wait_for(
        &self,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let spans = self.spans();
            if spans.iter().any(&f) {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no span {what} within {DEADLINE:?}; got {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---- L7 policy and JWT (authz tests) ----

pub const KEYS_VIP: &str = "10.96.0.14";

/// A pod behind Service `keys` whose HTTP/1.1 app (8080) answers `/jwks` with the JWKS set
/// here (500 while it is `None`) and every other path with the request's headers as JSON.
pub struct KeysPod {
    pub ip: IpAddr,
    pub jwks: Arc<Mutex<Option<String>>>,
    /// `/jwks` requests served.
    pub fetches: Arc<AtomicUsize>,
}

pub async fn start_keys_pod(ca: &CertAuthority) -> KeysPod {
    let seen = Arc::new(Seen::default());
    let ip = loop {
        let r: [u8; 3] = rand::random();
        let ip = IpAddr::from([127, r[0], r[1], r[2].clamp(2, 254)]);
        if let Ok(l) = TcpListener::bind((ip, 15008)).await {
            start_hbone_server(ca, l, seen.clone());
            break ip;
        }
    };
    let app = TcpListener::bind((ip, 8080)).await.expect("bind 8080");
    let jwks: Arc<Mutex<Option<String>>> = Arc::default();
    let fetches = Arc::new(AtomicUsize::new(0));
    let (j, f) = (jwks.clone(), fetches.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = app.accept().await {
            let (j, f) = (j.clone(), f.clone());
            let serve = service_fn(move |req: Request<Incoming>| {
                let (j, f) = (j.clone(), f.clone());
                async move {
                    let resp = if req.uri().path() == "/jwks" {
                        f.fetch_add(1, Ordering::SeqCst);
                        match j.lock().unwrap().clone() {
                            Some(body) => Response::new(full(&body)),
                            None => Response::builder().status(500).body(full("down")).unwrap(),
                        }
                    } else {
                        let map: serde_json::Map<String, serde_json::Value> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into())
                            })
                            .collect();
                        Response::new(full(&serde_json::Value::Object(map).to_string()))
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), serve),
            );
        }
    });
    KeysPod { ip, jwks, fetches }
}

/// A policy resource as meshd sends it: (kind, namespace, name, spec).
pub fn policy_resource(
    kind: &str,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> meshcore::proto::config::Policy {
    meshcore::proto::config::Policy {
        key: format!("{kind}/{ns}/{name}"),
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
        spec_json: spec.to_string(),
    }
}

/// One standard backend pod behind `web`, the keys pod behind `keys` (also bound to the
/// waypoint), and `policies` in force.
pub async fn authz_mesh(policies: Vec<meshcore::proto::config::Policy>) -> (Mesh, KeysPod) {
    meshcore::tls::install_crypto_provider();
    let ca = CertAuthority::new_in_memory(TD).expect("ca");
    let (ip, seen) = start_backend(&ca, "backend-0").await;
    let web = vec![Pod {
        name: "backend-0".into(),
        ip,
        labels: Vec::new(),
        seen,
    }];
    let keys = start_keys_pod(&ca).await;
    let mut s = store(&web, &[]);
    let keys_svc = s
        .service("app/web")
        .map(|svc| Service {
            key: "app/keys".into(),
            name: "keys".into(),
            hostname: "keys.app.svc.cluster.local".into(),
            vips: vec![KEYS_VIP.into()],
            endpoints: vec![Endpoint {
                workload_uid: "app/keys-0".into(),
                ports: HashMap::new(),
            }],
            ..svc.as_ref().clone()
        })
        .expect("web service");
    s.apply(ConfigUpdate {
        version: 2,
        workloads: vec![Workload {
            uid: "app/keys-0".into(),
            name: "keys-0".into(),
            namespace: "app".into(),
            service_account: "backend".into(),
            trust_domain: TD.into(),
            ips: vec![keys.ip.to_string()],
            captured: true,
            ..Default::default()
        }],
        services: vec![keys_svc],
        policies,
        ..Default::default()
    });
    let cert = Arc::new(ca.mint(&waypoint_id(), DAY).expect("mint waypoint"));
    let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(s)));
    let mut config = Config::new(
        "app/wp",
        IpAddr::from([127, 0, 0, 1]),
        Source::Channel { config: rx, cert },
    );
    for a in [
        &mut config.hbone_addr,
        &mut config.ready_addr,
        &mut config.metrics_addr,
    ] {
        a.set_port(0);
    }
    let waypoint = app::build(config)
        .expect("build")
        .start()
        .await
        .expect("start");
    let mesh = Mesh {
        waypoint,
        backend_ip: web[0].ip,
        seen: web[0].seen.clone(),
        pods: web,
        config: tx,
        pool: Pool::new(PoolSettings::default()),
        client_cert: Arc::new(ca.mint(&client_id(), DAY).expect("mint client")),
    };
    (mesh, keys)
}

impl Mesh {
    /// Replaces the policies, as a delta from meshd would.
    pub fn set_policies(&self, policies: Vec<meshcore::proto::config::Policy>) {
        self.config.send_modify(|current| {
            let mut next = current.as_deref().cloned().unwrap_or_default();
            let old: Vec<String> = next.policies().map(|p| p.key.clone()).collect();
            next.apply(ConfigUpdate {
                version: next.version + 1,
                removed_policies: old,
                policies,
                ..Default::default()
            });
            *current = Some(Arc::new(next));
        });
    }
}

/// A response body that sends `partial` and then nothing, never ending (`Act::StallBody`).
struct StallingBody(bool);

impl hyper::body::Body for StallingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        if self.0 {
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            b"partial",
        )))))
    }
}
