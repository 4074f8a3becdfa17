//! The HBONE request path as a hostile authenticated peer meets it: a real mTLS connection over
//! loopback to `meshcore::hbone::serve_connection` (the same entry point ztunnel's inbound
//! listener uses), then arbitrary HTTP/2 bytes from the client — valid CONNECTs, illegal frames,
//! HPACK tricks — with a stub handler that rejects, accepts and echoes, or drops requests.
//!
//! Checks: no panic; once the client has sent its last byte and closed, the server ends the
//! connection within a deadline (no hang, no task left behind); every request the handler sees
//! names an authority and carries at most 64 KiB of headers (HPACK references to the dynamic
//! table included, which make a small frame decode large). Memory is bounded by libFuzzer's -rss_limit_mb across runs, so a
//! leak per connection shows up too.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use mesh_fuzz::h2wire;
use meshcore::Identity;
use meshcore::ca::CertAuthority;
use meshcore::hbone::{HboneError, InboundRequest, ServerSettings, serve_connection};
use meshcore::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{Mutex, mpsc};

/// How long the server may take to finish a connection after the client has closed it.
const SERVER_DONE: Duration = Duration::from_secs(5);
/// Echoed bytes per accepted tunnel: enough to move flow-control windows, bounded per run.
const ECHO_LIMIT: u64 = 256 * 1024;
/// The header block a request may carry (issue 7, as Istio's ztunnel), counted as HTTP/2 does:
/// name + value + 32 per field. A larger one must be refused before the handler sees it.
const MAX_HEADER_LIST: usize = 64 * 1024;

struct Harness {
    rt: Runtime,
    addr: SocketAddr,
    client: tokio_rustls::TlsConnector,
    /// How each `serve_connection` ended, one per accepted TCP connection.
    results: Mutex<mpsc::UnboundedReceiver<Result<(), HboneError>>>,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        // A Rust binary's runtime ignores SIGPIPE before main, as ztunnel does; libFuzzer's C++
        // main does not, so a TLS write (writev) to a connection the server already closed
        // would kill the fuzzer instead of returning EPIPE.
        // SAFETY: once, before any socket exists; SIG_IGN is a standard disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let ca = CertAuthority::new_in_memory("td").expect("in-memory CA");
        let day = Duration::from_secs(86_400);
        let server_id = Identity::new("td", "srv", "server");
        let server = ca.mint(&server_id, day).expect("server cert");
        let client = ca
            .mint(&Identity::new("td", "cli", "client"), day)
            .expect("client cert");
        let server_tls = tls::server_config(&server).expect("server TLS");
        let client_tls = tls::client_config(&client, &[server_id]).expect("client TLS");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (tx, rx) = mpsc::unbounded_channel();
        let addr = rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let tls = Arc::clone(&server_tls);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let r = serve_connection(tcp, tls, ServerSettings::default(), handle).await;
                        let _ = tx.send(r);
                    });
                }
            });
            addr
        });
        Harness {
            rt,
            addr,
            client: tokio_rustls::TlsConnector::from(client_tls),
            results: Mutex::new(rx),
        }
    })
}

/// The stub: what it does depends on the authority, so the fuzzer can steer it.
async fn handle(req: InboundRequest) {
    assert!(
        !req.authority.is_empty(),
        "handler got a request without authority"
    );
    let size: usize = req.authority.len()
        + 32
        + req
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum::<usize>();
    assert!(
        size <= MAX_HEADER_LIST,
        "handler got a request with a {size}-byte header list"
    );
    match req.authority.len() % 4 {
        0 => req.reject(http::StatusCode::SERVICE_UNAVAILABLE),
        1 => req.reject(http::StatusCode::UNAUTHORIZED),
        2 => drop(req),
        _ => {
            let Ok(tunnel) = req.accept(http::HeaderMap::new()) else {
                return;
            };
            let (r, mut w) = tokio::io::split(tunnel);
            let _ = tokio::io::copy(&mut r.take(ECHO_LIMIT), &mut w).await;
            let _ = w.shutdown().await;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(chunks) = h2wire::client_bytes(&mut Unstructured::new(data)) else {
        return;
    };
    let h = harness();
    h.rt.block_on(async {
        let tcp = TcpStream::connect(h.addr)
            .await
            .expect("connect to the HBONE server");
        let tls = h
            .client
            .connect(tls::dummy_server_name(), tcp)
            .await
            .expect("mTLS handshake");
        let (mut rd, mut wr) = tokio::io::split(tls);
        // Drain whatever the server answers, so neither side blocks on a full socket buffer.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        for chunk in &chunks {
            if wr.write_all(chunk).await.is_err() || wr.flush().await.is_err() {
                break; // the server closed on us: allowed for bad input
            }
        }
        let _ = wr.shutdown().await;
        let mut results = h.results.lock().await;
        match tokio::time::timeout(SERVER_DONE, results.recv()).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the HBONE accept loop stopped"),
            Err(_) => panic!(
                "server still serving the connection {SERVER_DONE:?} after the client closed"
            ),
        }
        drop(wr);
        let _ = tokio::time::timeout(SERVER_DONE, reader).await;
    });
});
