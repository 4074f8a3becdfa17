//! Protocol tests against `echo serve` using raw std sockets: WHO reply fields
//! over IPv4 (dual-stack) and IPv6, multiple ports, name defaulting, ECHO
//! round trip, SINK byte accounting, and error replies.

mod common;

use std::io::{BufRead, Read, Write};

use common::{Server, connect, exchange_to_eof, new_reader, read_line};
use echo::{ErrorReply, SinkReply, WhoReply};

fn who_on(addr: &str, expect_name: &str, expect_port: u16) {
    let mut s = connect(addr);
    let mut r = new_reader(&s);
    let client_local = s.local_addr().unwrap().to_string();
    let server_addr = s.peer_addr().unwrap().to_string();
    for msg in ["hello world", "second"] {
        s.write_all(format!("WHO {msg}\n").as_bytes()).unwrap();
        let reply: WhoReply = serde_json::from_str(&read_line(&mut r)).unwrap();
        assert_eq!(reply.served_by, expect_name);
        assert_eq!(reply.port, expect_port);
        assert_eq!(
            reply.peer, client_local,
            "peer must be the client's local addr"
        );
        assert_eq!(reply.local, server_addr);
        assert_eq!(reply.message, msg);
    }
}

#[test]
fn who_reply_fields_ipv4_via_dual_stack() {
    let server = Server::start();
    // Peer is normalised from ::ffff:127.0.0.1 to plain 127.0.0.1.
    who_on(&server.v4(), "test-pod", server.port());
}

#[test]
fn who_reply_fields_ipv6() {
    let server = Server::start();
    who_on(
        &format!("[::1]:{}", server.port()),
        "test-pod",
        server.port(),
    );
}

#[test]
fn serves_several_ports_and_name_from_pod_name_env() {
    let server = Server::start_with(2, None, &[("POD_NAME", "pod-from-env")]);
    for &port in &server.ports {
        who_on(&format!("127.0.0.1:{port}"), "pod-from-env", port);
    }
}

#[test]
fn who_without_message_and_crlf() {
    let server = Server::start();
    let out = exchange_to_eof(&server.v4(), b"WHO\r\n");
    let reply: WhoReply = serde_json::from_slice(&out).unwrap();
    assert_eq!(reply.message, "");
}

#[test]
fn echo_round_trip() {
    let server = Server::start();
    let mut s = connect(&server.v4());
    // Payload in the same write as the request line must be echoed too.
    s.write_all(b"ECHO\nabc").unwrap();
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"abc");

    // 1 MiB concurrently written and read back (writer thread avoids deadlock
    // on full socket buffers).
    let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let mut w = s.try_clone().unwrap();
    let to_send = payload.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&to_send).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");
}

#[test]
fn sink_counts_bytes() {
    let server = Server::start();
    let mut req = b"SINK\n".to_vec();
    req.extend(std::iter::repeat_n(0x5a, 300_001));
    let out = exchange_to_eof(&server.v4(), &req);
    let text = String::from_utf8(out).unwrap();
    assert!(text.ends_with('\n'));
    let reply: SinkReply = serde_json::from_str(&text).unwrap();
    assert_eq!(reply.received, 300_001);

    let empty: SinkReply =
        serde_json::from_slice(&exchange_to_eof(&server.v4(), b"SINK\n")).unwrap();
    assert_eq!(empty.received, 0);
}

#[test]
fn unknown_request_gets_error_and_close() {
    let server = Server::start();
    let mut s = connect(&server.v4());
    s.write_all(b"HELLO there\n").unwrap();
    let mut r = new_reader(&s);
    let err: ErrorReply = serde_json::from_str(&read_line(&mut r)).unwrap();
    assert!(err.error.contains("unknown request"), "{}", err.error);
    let mut rest = String::new();
    assert_eq!(
        r.read_line(&mut rest).unwrap(),
        0,
        "server should close: {rest:?}"
    );
}

#[test]
fn non_who_after_who_is_an_error() {
    let server = Server::start();
    let out = exchange_to_eof(&server.v4(), b"WHO a\nECHO\n");
    let text = String::from_utf8(out).unwrap();
    let mut lines = text.lines();
    let first: WhoReply = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(first.message, "a");
    let err: ErrorReply = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert!(err.error.contains("WHO"), "{}", err.error);
    assert_eq!(lines.next(), None);
}
