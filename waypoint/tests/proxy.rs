//! The waypoint's data path end to end (see `common` for the harness): HBONE in with the
//! client's identity, HTTP/1.1, HTTP/2, gRPC, WebSocket and TCP through to a backend pod over
//! HBONE with the waypoint's identity; refusals, 503s, readiness, the plain-HTTP listener.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use meshcore::hbone::HboneError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    // Where the waypoint's HBONE records are sealed: what this kernel offers (the probe's
    // answer to this test, on the same kernel) decides, with `--kernel-tls` at its default.
    let kernel = meshcore::ktls::probe();
    let dump = m.config_dump().await;
    let encryption = &dump["hboneRecordEncryption"];
    assert_eq!(encryption["kernelTls"], kernel.to_string(), "{dump}");
    assert_eq!(encryption["setting"], "auto", "{dump}");
    let kernel_path = kernel == (meshcore::ktls::KernelTls::Available { rekey: true });
    assert_eq!(
        encryption["path"],
        if kernel_path {
            "kernel (kTLS)"
        } else {
            "userspace (rustls)"
        },
        "{dump}"
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
    let metrics = m.metrics().await;
    assert!(
        metrics.contains("mesh_waypoint_connect_refused_total{status=\"404\"} 3"),
        "{metrics}"
    );
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

/// A workload binding: the client dialled the pod's own IP; the waypoint sends the request to
/// that pod, same port.
#[tokio::test]
async fn pod_addressed_traffic_goes_to_that_pod() {
    let m = mesh().await;
    let mut c = m.http1(&format!("{}:8080", m.backend_ip)).await;
    let resp = send1(&mut c, get("/direct-to-pod", "backend-0")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        body_text(resp).await,
        "path=/direct-to-pod version=HTTP/1.1 host=backend-0"
    );
    assert_eq!(
        m.seen.peers.lock().unwrap().clone(),
        vec![waypoint_id().to_string()]
    );
}

/// A bidirectional gRPC-shaped stream: each message comes back before the next is sent (a
/// proxy that buffered either direction would stall), then the status trailers.
#[tokio::test]
async fn grpc_bidi_stream_ping_pongs_then_ends_with_trailers() {
    let m = mesh().await;
    let mut c = m.http2(&format!("{WEB_VIP}:81")).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
    let req = Request::post("http://web.app.svc.cluster.local:81/pkg.Svc/Chat")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(tokio_stream_from(rx)).boxed())
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(
        b"\x00\x00\x00\x00\x01a",
    ))))
    .await
    .unwrap();
    let resp = tokio::time::timeout(DEADLINE, c.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    assert_eq!(
        next_data(&mut body).await.as_bytes(),
        b"\x00\x00\x00\x00\x01a"
    );
    tx.send(Ok(Frame::data(Bytes::from_static(
        b"\x00\x00\x00\x00\x01b",
    ))))
    .await
    .unwrap();
    assert_eq!(
        next_data(&mut body).await.as_bytes(),
        b"\x00\x00\x00\x00\x01b"
    );
    drop(tx);
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("end in time")
        .expect("end");
    let trailers = rest.trailers().cloned().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "7");
}
