//! Hostile or broken ZDS peers, on socketpairs: each side must refuse what breaks the protocol,
//! say what the peer did, and close any fd it was handed with the bad message.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use dataplane::zds::proto::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request::Payload,
};
use dataplane::zds::{
    AgentSession, EXCHANGE_TIMEOUT, MAX_MESSAGE, Request, ZdsConn, ZdsError, ZtunnelSession,
};
use nix::sys::socket::{self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType};
use prost::Message;

fn pair() -> (ZdsConn, ZdsConn) {
    let (a, b) = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    (
        ZdsConn::from_fd(a).expect("wrap a"),
        ZdsConn::from_fd(b).expect("wrap b"),
    )
}

/// Sends raw bytes with any number of fds, bypassing every check of ours.
fn raw_send(conn: &ZdsConn, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    socket::sendmsg::<()>(
        conn.as_fd().as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .expect("raw sendmsg");
}

fn request(payload: Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn del(uid: &str) -> Vec<u8> {
    request(Payload::Del(DelWorkload { uid: uid.into() }))
}

fn add(uid: &str) -> Vec<u8> {
    request(Payload::Add(AddWorkload {
        uid: uid.into(),
        workload_info: Some(WorkloadInfo::default()),
    }))
}

fn ack(error: &str) -> Vec<u8> {
    WorkloadResponse {
        payload: Some(dataplane::zds::proto::workload_response::Payload::Ack(
            dataplane::zds::proto::Ack {
                error: error.into(),
            },
        )),
    }
    .encode_to_vec()
}

/// A pipe whose read end tells whether every copy of the write end was closed.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> Pipe {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).expect("pipe");
        Pipe { read, write }
    }

    /// Drops our write end; true if no copy remains anywhere (the read end sees EOF).
    fn all_writers_closed(self) -> bool {
        drop(self.write);
        let mut buf = [0u8; 1];
        matches!(nix::unistd::read(self.read.as_raw_fd(), &mut buf), Ok(0))
    }
}

/// ztunnel's session after its hello was read off by the hostile agent.
async fn ztunnel_facing_hostile_agent() -> (ZtunnelSession, ZdsConn) {
    let (zt, agent) = pair();
    let session = ZtunnelSession::start(zt).await.expect("hello");
    let (hello, fd) = agent.recv().await.expect("hello arrives");
    assert!(fd.is_none());
    assert_eq!(
        ZdsHello::decode(hello.as_slice()).expect("hello").version,
        Version::V1 as i32
    );
    (session, agent)
}

/// The agent's session after a hostile ztunnel said a proper hello.
async fn agent_facing_hostile_ztunnel() -> (AgentSession, ZdsConn) {
    let (agent, zt) = pair();
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    zt.send(&hello.encode_to_vec(), None).await.expect("hello");
    (AgentSession::accept(agent).await.expect("accept"), zt)
}

fn protocol_error_mentions<T>(r: &Result<T, ZdsError>, words: &[&str]) -> bool {
    match r {
        Err(ZdsError::Protocol(m)) => words.iter().all(|w| m.contains(w)),
        _ => false,
    }
}

#[tokio::test]
async fn oversized_message_is_refused_not_cut() {
    let (mut zt, agent) = ztunnel_facing_hostile_agent().await;
    // A valid del whose uid makes it 1 KiB + a bit: cut to 1 KiB it would not decode, or
    // decode wrong.
    let big = del(&"u".repeat(MAX_MESSAGE));
    assert!(big.len() > MAX_MESSAGE);
    raw_send(&agent, &big, &[]);
    let got = zt.next().await;
    assert!(matches!(got, Err(ZdsError::Truncated)), "{got:?}");

    // Our own side refuses to send one.
    let (mut agent_side, _zt) = agent_facing_hostile_ztunnel().await;
    let got = agent_side.del(&"u".repeat(MAX_MESSAGE)).await;
    assert!(protocol_error_mentions(&got, &["limit"]), "{got:?}");
}

#[tokio::test]
async fn two_fds_are_refused_and_both_closed() {
    let (mut zt, agent) = ztunnel_facing_hostile_agent().await;
    let pipe = Pipe::new();
    let second = pipe.write.try_clone().expect("dup");
    raw_send(&agent, &add("uid-1"), &[pipe.write.as_fd(), second.as_fd()]);
    drop(second);
    let got = zt.next().await;
    assert!(matches!(got, Err(ZdsError::Truncated)), "{got:?}");
    assert!(
        pipe.all_writers_closed(),
        "the fds that came with the bad message leaked"
    );
}

#[tokio::test]
async fn add_without_fd_is_refused() {
    let (mut zt, agent) = ztunnel_facing_hostile_agent().await;
    raw_send(&agent, &add("uid-1"), &[]);
    let got = zt.next().await;
    assert!(
        protocol_error_mentions(&got, &["add", "uid-1", "without"]),
        "{got:?}"
    );
}

#[tokio::test]
async fn del_with_fd_is_refused_and_the_fd_closed() {
    let (mut zt, agent) = ztunnel_facing_hostile_agent().await;
    let pipe = Pipe::new();
    raw_send(&agent, &del("uid-1"), &[pipe.write.as_fd()]);
    let got = zt.next().await;
    assert!(
        protocol_error_mentions(&got, &["del", "uid-1", "fd"]),
        "{got:?}"
    );
    assert!(pipe.all_writers_closed(), "the stray fd leaked");
}

#[tokio::test]
async fn keep_after_snapshot_is_refused() {
    let (mut zt, agent) = ztunnel_facing_hostile_agent().await;
    raw_send(
        &agent,
        &request(Payload::Keep(KeepWorkload { uid: "a".into() })),
        &[],
    );
    assert!(matches!(zt.next().await, Ok(Request::Keep { uid }) if uid == "a"));
    zt.ack(Ok(())).await.expect("ack");
    raw_send(
        &agent,
        &request(Payload::SnapshotSent(SnapshotSent {})),
        &[],
    );
    assert!(matches!(zt.next().await, Ok(Request::SnapshotSent)));
    zt.ack(Ok(())).await.expect("ack");
    raw_send(
        &agent,
        &request(Payload::Keep(KeepWorkload { uid: "b".into() })),
        &[],
    );
    let got = zt.next().await;
    assert!(
        protocol_error_mentions(&got, &["keep", "snapshot_sent"]),
        "{got:?}"
    );
}

#[tokio::test]
async fn garbage_is_refused_on_both_sides() {
    let (mut zt, agent) = ztunnel_facing_hostile_agent().await;
    raw_send(&agent, &[0xff; 12], &[]);
    let got = zt.next().await;
    assert!(matches!(got, Err(ZdsError::Decode(_))), "{got:?}");

    // Well-formed protobuf of no kind ztunnel knows (field 9).
    let (mut zt, agent) = ztunnel_facing_hostile_agent().await;
    raw_send(&agent, &[0x48, 0x01], &[]);
    let got = zt.next().await;
    assert!(protocol_error_mentions(&got, &["no payload"]), "{got:?}");

    // A hello that is not one.
    let (agent_end, zt_end) = pair();
    raw_send(&zt_end, &[0xff; 12], &[]);
    let got = AgentSession::accept(agent_end).await;
    assert!(matches!(got, Err(ZdsError::Decode(_))), "{:?}", got.err());

    // A hello of the wrong version.
    let (agent_end, zt_end) = pair();
    raw_send(&zt_end, &ZdsHello { version: 7 }.encode_to_vec(), &[]);
    let got = AgentSession::accept(agent_end).await;
    assert!(
        protocol_error_mentions(&got, &["version"]),
        "{:?}",
        got.err()
    );

    // An ack that is garbage.
    let (mut agent_side, zt_end) = agent_facing_hostile_ztunnel().await;
    let netns = std::fs::File::open("/proc/self/ns/net").expect("netns");
    let exchange = agent_side.add("uid-1", WorkloadInfo::default(), netns.as_fd());
    let hostile = async {
        let (_, fd) = zt_end.recv().await.expect("add arrives");
        assert!(fd.is_some());
        raw_send(&zt_end, &[0xff; 12], &[]);
    };
    let (got, ()) = tokio::join!(exchange, hostile);
    assert!(matches!(got, Err(ZdsError::Decode(_))), "{got:?}");
}

#[tokio::test]
async fn ack_with_fd_is_refused_and_the_fd_closed() {
    let (mut agent_side, zt_end) = agent_facing_hostile_ztunnel().await;
    let pipe = Pipe::new();
    let exchange = agent_side.del("uid-1");
    let hostile = async {
        zt_end.recv().await.expect("del arrives");
        raw_send(&zt_end, &ack(""), &[pipe.write.as_fd()]);
    };
    let (got, ()) = tokio::join!(exchange, hostile);
    assert!(protocol_error_mentions(&got, &["ack", "fd"]), "{got:?}");
    assert!(pipe.all_writers_closed(), "the stray fd leaked");
}

#[tokio::test]
async fn peer_closing_mid_exchange_is_closed() {
    // ztunnel reads the add, then goes away without acking.
    let (mut agent_side, zt_end) = agent_facing_hostile_ztunnel().await;
    let netns = std::fs::File::open("/proc/self/ns/net").expect("netns");
    let exchange = agent_side.add("uid-1", WorkloadInfo::default(), netns.as_fd());
    let hostile = async move {
        zt_end.recv().await.expect("add arrives");
        drop(zt_end);
    };
    let (got, ()) = tokio::join!(exchange, hostile);
    assert!(matches!(got, Err(ZdsError::Closed)), "{got:?}");

    // The agent goes away while ztunnel waits for the next request.
    let (mut zt, agent) = ztunnel_facing_hostile_agent().await;
    drop(agent);
    let got = zt.next().await;
    assert!(matches!(got, Err(ZdsError::Closed)), "{got:?}");
}

#[tokio::test]
async fn no_ack_times_out_and_the_session_stays_unusable() {
    let (mut agent_side, zt_end) = agent_facing_hostile_ztunnel().await;
    let got = agent_side.del("uid-1").await;
    assert!(
        matches!(got, Err(ZdsError::Timeout(t)) if t == EXCHANGE_TIMEOUT),
        "{got:?}"
    );
    // The ack arrives late: it must not be taken for the next request's.
    zt_end.send(&ack("late"), None).await.expect("late ack");
    let got = agent_side.del("uid-2").await;
    assert!(protocol_error_mentions(&got, &["abandoned"]), "{got:?}");
}

#[tokio::test]
async fn no_hello_times_out() {
    let (agent_end, _zt_end) = pair();
    let got = AgentSession::accept(agent_end).await;
    assert!(matches!(got, Err(ZdsError::Timeout(_))), "{:?}", got.err());
}
