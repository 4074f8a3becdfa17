//! Tests of the kernel TLS path ([`super`]): the parsing helpers here, and everything else
//! under a kernel that has kTLS, in a QEMU guest (`testbed::vm`), as this machine's kernel has
//! none.

use super::*;

#[test]
fn whole_records_stops_at_the_last_complete_record() {
    let record = |len: u16| {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&len.to_be_bytes());
        r.extend(std::iter::repeat_n(0u8, usize::from(len)));
        r
    };
    let mut bytes = record(10);
    bytes.extend(record(3));
    assert_eq!(whole_records(&bytes).unwrap(), 15 + 8);
    let partial = record(100);
    bytes.extend_from_slice(&partial[..50]);
    assert_eq!(whole_records(&bytes).unwrap(), 15 + 8);
    assert_eq!(whole_records(&bytes[..4]).unwrap(), 0, "a header cut short");
    let huge = [23, 3, 3, 0xff, 0xff];
    assert!(whole_records(&huge).is_err(), "oversized record");
    assert!(whole_records(b"GET / HTTP/1.1\r\n").is_err(), "not TLS");
}

/// Set in the guest: the test runs its checks there instead of booting another guest.
const IN_GUEST: &str = "MESH_KTLS_IN_GUEST";

/// Everything the kernel path must do, under a kernel that has kTLS with key updates
/// (Debian's 7.x, booted by `testbed::vm`; this machine's own kernel has no kTLS).
#[test]
fn under_a_kernel_with_ktls() {
    if std::env::var_os(IN_GUEST).is_none() {
        let kernel = testbed::vm::VmKernel::installed().expect("the guest kernel");
        let exe = std::env::current_exe().expect("this test's path");
        let out = kernel
            .run(
                &exe,
                &[
                    "--exact",
                    "hbone::kernel::tests::under_a_kernel_with_ktls",
                    "--nocapture",
                    "--test-threads=1",
                ],
                &[(IN_GUEST, "1")],
                std::time::Duration::from_secs(1200),
            )
            .expect("booting the guest");
        assert_eq!(
            out.exit,
            Some(0),
            "under {}, console:\n{}",
            kernel.release,
            out.console
        );
        assert!(
            out.console.contains("kernel TLS checks passed"),
            "{}",
            out.console
        );
        assert!(out.console.contains("1 passed"), "{}", out.console);
        if std::env::var_os("MESH_SHOW_GUEST").is_some() {
            println!("{}", out.console);
        }
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(guest::checks());
}

mod guest {
    use std::sync::Arc;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::super::*;
    use crate::Identity;
    use crate::ca::CertAuthority;
    use crate::tls::{self, WorkloadCert};

    struct Certs {
        server: WorkloadCert,
        client: WorkloadCert,
    }

    fn server_id() -> Identity {
        Identity::new("td", "srv", "server")
    }

    fn certs() -> Certs {
        let ca = CertAuthority::new_in_memory("td").expect("ca");
        let day = std::time::Duration::from_secs(86400);
        Certs {
            server: ca.mint(&server_id(), day).expect("server cert"),
            client: ca
                .mint(&Identity::new("td", "cli", "client"), day)
                .expect("client cert"),
        }
    }

    fn random(n: usize) -> Vec<u8> {
        (0..n).map(|_| rand::random::<u8>()).collect()
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// Writes `data` on `w` while reading as many bytes from `r`; returns what was read.
    async fn exchange<W, R>(w: &mut W, r: &mut R, data: &[u8]) -> Vec<u8>
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin,
    {
        let mut got = vec![0; data.len()];
        let (written, read) = tokio::join!(
            async {
                w.write_all(data).await?;
                w.flush().await
            },
            r.read_exact(&mut got)
        );
        written.expect("write");
        read.expect("read");
        got
    }

    pub async fn checks() {
        assert_eq!(
            crate::ktls::probe(),
            crate::ktls::KernelTls::Available { rekey: true }
        );
        let certs = certs();
        // Generous for QEMU's software CPU; a hang names its check instead of stalling.
        async fn bounded(what: &str, check: impl std::future::Future<Output = ()>) {
            let limit = std::time::Duration::from_secs(300);
            if tokio::time::timeout(limit, check).await.is_err() {
                panic!("{what}: no result in {limit:?}");
            }
        }
        bounded(
            "kernel client, rustls server",
            kernel_client_against_rustls_server(&certs),
        )
        .await;
        bounded(
            "rustls client, kernel server",
            rustls_client_against_kernel_server(&certs),
        )
        .await;
        bounded(
            "our key rotations",
            our_key_wears_out_and_is_replaced(&certs),
        )
        .await;
        bounded(
            "hostile handshakes",
            hostile_bytes_fail_the_handshake(&certs),
        )
        .await;
        bounded(
            "truncation",
            an_end_without_close_notify_is_an_error(&certs),
        )
        .await;
        bounded("hostile records", hostile_records_end_the_read(&certs)).await;
        for (client, server) in [(true, true), (true, false), (false, true)] {
            let what = format!("HBONE tunnel, client kernel {client}, server kernel {server}");
            bounded(&what, hbone_tunnel(&certs, client, server)).await;
        }
        println!("kernel TLS checks passed");
    }

    async fn kernel_client(certs: &Certs, tcp: TcpStream) -> KernelStream {
        attach(&tcp).expect("tls ULP");
        let config = tls::client_config(&certs.client, &[server_id()]).expect("config");
        let session =
            rustls::client::UnbufferedClientConnection::new(config, tls::dummy_server_name())
                .expect("session");
        let before = handed_over();
        let (stream, peer) = handshake(tcp, session).await.expect("handshake");
        assert!(peer.is_some_and(|p| !p.is_empty()), "the server's chain");
        assert_eq!(handed_over(), before + 1);
        stream
    }

    async fn kernel_client_against_rustls_server(certs: &Certs) {
        let (client, server) = pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(
            tls::server_config(&certs.server).expect("server config"),
        );
        let (mut ours, theirs) =
            tokio::join!(kernel_client(certs, client), acceptor.accept(server));
        let mut theirs = theirs.expect("rustls accept");
        let data = random(256 << 10);
        assert!(
            exchange(&mut ours, &mut theirs, &data).await == data,
            "client → server"
        );
        assert!(
            exchange(&mut theirs, &mut ours, &data).await == data,
            "server → client"
        );
        // The peer rotates its keys and asks us to rotate ours: our receive key must follow
        // (else the next records fail to decrypt), and what we send next must be under our
        // new key (else rustls rejects it).
        theirs
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("key update");
        let more = random(100 << 10);
        assert!(
            exchange(&mut theirs, &mut ours, &more).await == more,
            "after their update"
        );
        assert!(
            exchange(&mut ours, &mut theirs, &more).await == more,
            "after our answer"
        );
        // close_notify each way: a clean end of stream, not a truncation.
        ours.shutdown().await.expect("our close_notify");
        let mut rest = Vec::new();
        theirs
            .read_to_end(&mut rest)
            .await
            .expect("rustls sees close_notify");
        assert!(rest.is_empty());
        theirs.shutdown().await.expect("their close_notify");
        let mut rest = Vec::new();
        ours.read_to_end(&mut rest)
            .await
            .expect("we see close_notify");
        assert!(rest.is_empty());
    }

    async fn rustls_client_against_kernel_server(certs: &Certs) {
        let (client, server) = pair().await;
        attach(&server).expect("tls ULP");
        let session = rustls::server::UnbufferedServerConnection::new(
            tls::server_config(&certs.server).expect("server config"),
        )
        .expect("session");
        let connector = tokio_rustls::TlsConnector::from(
            tls::client_config(&certs.client, &[server_id()]).expect("client config"),
        );
        // The client writes as soon as its handshake is done: those records can reach us
        // with its Finished, and must come out first, in order.
        let first = random(100 << 10);
        let client_side = async {
            let mut tls = connector
                .connect(tls::dummy_server_name(), client)
                .await
                .expect("rustls connect");
            tls.write_all(&first).await.expect("early write");
            tls.flush().await.expect("flush");
            tls
        };
        let (theirs, ours) = tokio::join!(client_side, handshake(server, session));
        let mut theirs = theirs;
        let (mut ours, peer) = ours.expect("kernel handshake");
        let peer = peer.expect("client chain");
        assert_eq!(
            tls::peer_identity(&peer).expect("identity").to_string(),
            "spiffe://td/ns/cli/sa/client"
        );
        let mut got = vec![0; first.len()];
        ours.read_exact(&mut got).await.expect("first bytes");
        assert!(got == first, "the first bytes, in order");
        let data = random(256 << 10);
        assert!(
            exchange(&mut ours, &mut theirs, &data).await == data,
            "server → client"
        );
        theirs
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("key update");
        assert!(
            exchange(&mut theirs, &mut ours, &data).await == data,
            "after their update"
        );
        assert!(
            exchange(&mut ours, &mut theirs, &data).await == data,
            "after our answer"
        );
    }

    /// A tunnel through our HBONE client and server, each end on the kernel path or not.
    async fn hbone_tunnel(certs: &Certs, client_kernel: bool, server_kernel: bool) {
        use crate::hbone::{
            ConnectRequest, Dialer, InboundRequest, Pool, PoolKey, PoolSettings, ServerSettings,
            serve_connection,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tls = tls::server_config(&certs.server).expect("server config");
        let settings = ServerSettings {
            kernel_tls: server_kernel,
            ..ServerSettings::default()
        };
        let before = handed_over();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let echo = |req: InboundRequest| async move {
                let Ok(stream) = req.accept(http::HeaderMap::new()) else {
                    return;
                };
                let (mut rd, mut wr) = tokio::io::split(stream);
                if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                    let _ = wr.write_all(b"bye").await;
                    let _ = wr.shutdown().await;
                }
            };
            serve_connection(tcp, tls, settings, echo).await
        });
        let pool = Pool::new(PoolSettings {
            kernel_tls: client_kernel,
            ..PoolSettings::default()
        });
        let dial: Dialer = Arc::new(|a| Box::pin(TcpStream::connect(a)));
        let key = PoolKey {
            source: "pod".into(),
            src_identity: Identity::new("td", "cli", "client"),
            dst_identities: vec![server_id()],
            dst: addr,
            dst_instance: String::new(),
        };
        let stream = pool
            .connect(
                key,
                Arc::new(certs.client.clone()),
                dial,
                ConnectRequest {
                    authority: "10.0.0.7:8080".into(),
                    headers: http::HeaderMap::new(),
                },
            )
            .await
            .expect("connect");
        let data = random(256 << 10);
        let (mut rd, mut wr) = tokio::io::split(stream);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await.expect("write");
            wr.shutdown().await.expect("half-close");
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.expect("read");
        writer.await.expect("writer");
        let what = format!("client kernel {client_kernel}, server kernel {server_kernel}");
        assert_eq!(got.len(), data.len() + 3, "{what}");
        assert!(got[..data.len()] == data[..], "{what}: echoed bytes differ");
        assert_eq!(&got[data.len()..], b"bye", "{what}");
        assert_eq!(
            handed_over(),
            before + u64::from(client_kernel) + u64::from(server_kernel),
            "{what}: connections on the kernel path"
        );
        // The pool keeps its connection open (idle timeout): the server's end is not awaited.
        drop(pool);
        server.abort();
    }

    /// Bytes that are not TLS, or a record header announcing more than TLS allows, end the
    /// kernel-path handshake with an error, promptly and without a hang.
    async fn hostile_bytes_fail_the_handshake(certs: &Certs) {
        for (what, bytes) in [
            ("oversized record", vec![22, 3, 1, 0xff, 0xff]),
            ("plain HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ] {
            let (mut client, server) = pair().await;
            attach(&server).expect("tls ULP");
            let session = rustls::server::UnbufferedServerConnection::new(
                tls::server_config(&certs.server).expect("server config"),
            )
            .expect("session");
            client.write_all(&bytes).await.expect("write");
            let Err(e) = handshake(server, session).await else {
                panic!("{what}: the handshake succeeded");
            };
            println!("{what}: {e}");
        }
    }

    /// A peer that drops the TCP connection without close_notify: the read fails as a
    /// truncation, it is not a clean end of stream.
    async fn an_end_without_close_notify_is_an_error(certs: &Certs) {
        let (client, server) = pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(
            tls::server_config(&certs.server).expect("server config"),
        );
        let (mut ours, theirs) =
            tokio::join!(kernel_client(certs, client), acceptor.accept(server));
        let mut theirs = theirs.expect("rustls accept");
        let data = random(64 << 10);
        assert!(exchange(&mut theirs, &mut ours, &data).await == data);
        let (tcp, _) = theirs.into_inner();
        drop(tcp);
        let mut rest = Vec::new();
        let end = ours.read_to_end(&mut rest).await;
        assert_eq!(
            end.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::UnexpectedEof),
            "a truncated stream"
        );
    }

    async fn our_key_wears_out_and_is_replaced(certs: &Certs) {
        let (client, server) = pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(
            tls::server_config(&certs.server).expect("server config"),
        );
        let (mut ours, theirs) =
            tokio::join!(kernel_client(certs, client), acceptor.accept(server));
        let mut theirs = theirs.expect("rustls accept");
        // A limit of a few records instead of millions: several rotations in 256 KiB.
        ours.rekey_at = 4;
        let data = random(256 << 10);
        assert!(
            exchange(&mut ours, &mut theirs, &data).await == data,
            "across rotations"
        );
        assert!(
            exchange(&mut theirs, &mut ours, &data).await == data,
            "and back"
        );
    }

    async fn kernel_server(certs: &Certs, tcp: TcpStream) -> KernelStream {
        attach(&tcp).expect("tls ULP");
        let session = rustls::server::UnbufferedServerConnection::new(
            tls::server_config(&certs.server).expect("server config"),
        )
        .expect("session");
        let (stream, peer) = handshake(tcp, session).await.expect("handshake");
        assert!(peer.is_some(), "the client's chain");
        stream
    }

    /// Sends one record of `content_type` as it is, sealed under the current key.
    async fn send_raw(from: &mut KernelStream, content_type: u8, payload: &[u8]) {
        std::future::poll_fn(|cx| from.poll_send_record(cx, content_type, payload))
            .await
            .expect("send a crafted record");
    }

    /// Reads until an error, in `chunk`-sized reads; what came before it, and the error.
    async fn read_until_error(from: &mut KernelStream, chunk: usize) -> (Vec<u8>, String) {
        let mut got = Vec::new();
        let mut buf = vec![0; chunk];
        loop {
            match from.read(&mut buf).await {
                Ok(0) => panic!("a clean end of stream after {} bytes", got.len()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, e.to_string()),
            }
        }
    }

    /// Records a peer may not send, each sealed under the session's keys (the attacker is the
    /// other end of a real session, sending with the kernel's record-type control message):
    /// the reading end fails with an error that names the record, after handing out every byte
    /// of data sent before it, whether it reads in large buffers or in small ones (a record
    /// the kernel hands out in pieces must be judged whole).
    async fn hostile_records_end_the_read(certs: &Certs) {
        let mut ticket = vec![HANDSHAKE_NEW_SESSION_TICKET, 0, 0x4e, 0x20];
        ticket.resize(4 + 20_000, 7);
        // (what, the server attacks (else the client), record type, payload, expected error)
        let cases: [(&str, bool, u8, Vec<u8>, &str); 8] = [
            (
                "a fatal alert",
                true,
                CONTENT_ALERT,
                vec![2, 40],
                "the peer sent an alert: level 2, description 40",
            ),
            (
                "a one-byte alert",
                true,
                CONTENT_ALERT,
                vec![2],
                "the peer sent an alert: malformed",
            ),
            (
                "a session ticket from the client",
                false,
                CONTENT_HANDSHAKE,
                vec![HANDSHAKE_NEW_SESSION_TICKET, 0, 0, 4, 1, 2, 3, 4],
                "unexpected handshake message: type 4",
            ),
            (
                "a KeyUpdate with more handshake bytes in its record",
                true,
                CONTENT_HANDSHAKE,
                vec![
                    HANDSHAKE_KEY_UPDATE,
                    0,
                    0,
                    1,
                    0,
                    HANDSHAKE_KEY_UPDATE,
                    0,
                    0,
                    1,
                    0,
                ],
                "more handshake data in its record",
            ),
            (
                "a KeyUpdate with an undefined request",
                false,
                CONTENT_HANDSHAKE,
                vec![HANDSHAKE_KEY_UPDATE, 0, 0, 1, 2],
                "unexpected handshake message: type 24",
            ),
            (
                "a handshake message of another kind (Finished)",
                true,
                CONTENT_HANDSHAKE,
                vec![20, 0, 0, 2, 0, 0],
                "unexpected handshake message: type 20",
            ),
            (
                "a record type TLS does not define",
                false,
                99,
                vec![1, 2, 3],
                "a record of an unexpected type: Unknown(99)",
            ),
            (
                "a 20,000-byte session ticket (two records)",
                true,
                CONTENT_HANDSHAKE,
                ticket,
                "post-handshake message: too large",
            ),
        ];
        for (what, server_attacks, content_type, payload, expected) in cases {
            for chunk in [64 << 10, 1] {
                let (client, server) = pair().await;
                let (mut client, mut server) =
                    tokio::join!(kernel_client(certs, client), kernel_server(certs, server));
                let (attacker, victim) = if server_attacks {
                    (&mut server, &mut client)
                } else {
                    (&mut client, &mut server)
                };
                let before = random(if chunk == 1 { 3000 } else { 40 << 10 });
                attacker.write_all(&before).await.expect("data");
                send_raw(attacker, content_type, &payload).await;
                let (got, error) = read_until_error(victim, chunk).await;
                assert!(
                    got == before,
                    "{what} (reads of {chunk}): the data before it, {} of {} bytes",
                    got.len(),
                    before.len()
                );
                assert!(
                    error.contains(expected),
                    "{what} (reads of {chunk}): {error:?} does not say {expected:?}"
                );
                println!("{what} (reads of {chunk}): {error}");
            }
        }
        // What a client may receive: the server's session ticket (dropped, resumption is
        // off) and a close_notify, each judged whole in small reads as in large ones.
        for chunk in [64 << 10, 1] {
            let (client, server) = pair().await;
            let (mut client, mut server) =
                tokio::join!(kernel_client(certs, client), kernel_server(certs, server));
            let data = random(5000);
            send_raw(
                &mut server,
                CONTENT_HANDSHAKE,
                &[HANDSHAKE_NEW_SESSION_TICKET, 0, 0, 4, 1, 2, 3, 4],
            )
            .await;
            server.write_all(&data).await.expect("data");
            server.shutdown().await.expect("close_notify");
            let mut got = Vec::new();
            let mut buf = vec![0; chunk];
            loop {
                match client.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("a ticket, data and close_notify (reads of {chunk}): {e}"),
                }
            }
            assert!(got == data, "the data after a ticket (reads of {chunk})");
        }
    }
}
