//! Each side's view of a ZDS session: the order of messages, which may carry an fd, and acks.
//! Owns the sequence rules (hello first; `keep` only before `snapshot_sent`; exactly one fd
//! with `add` and none otherwise); a violation is a [`ZdsError::Protocol`] that names it.

use std::os::fd::{BorrowedFd, OwnedFd};

use prost::Message;

use super::proto::{
    Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo,
    WorkloadRequest, WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use super::{EXCHANGE_TIMEOUT, MAX_MESSAGE, ZdsConn, ZdsError};

/// What the agent asked ztunnel to do, as ztunnel receives it.
#[derive(Debug)]
pub enum Request {
    /// Serve this pod; its network namespace comes with it.
    Add {
        uid: String,
        info: Option<WorkloadInfo>,
        netns: OwnedFd,
    },
    /// Keep serving this pod (snapshot only): the agent knows it but holds no netns fd.
    Keep { uid: String },
    /// Stop serving this pod.
    Del { uid: String },
    /// Every pod the agent knows has been sent: forget the others.
    SnapshotSent,
}

/// ztunnel's side of a session.
pub struct ZtunnelSession {
    conn: ZdsConn,
    /// A request was returned by `next` and not yet acked.
    unacked: bool,
    snapshot_sent: bool,
}

impl ZtunnelSession {
    /// Sends the hello (version V1) on a fresh connection.
    pub async fn start(conn: ZdsConn) -> Result<ZtunnelSession, ZdsError> {
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        with_timeout(conn.send(&hello.encode_to_vec(), None)).await?;
        Ok(ZtunnelSession {
            conn,
            unacked: false,
            snapshot_sent: false,
        })
    }

    /// The next request. The caller must [`ack`](Self::ack) each before reading the next.
    /// Waits as long as the agent is quiet (an idle agent is normal).
    pub async fn next(&mut self) -> Result<Request, ZdsError> {
        if self.unacked {
            return Err(ZdsError::Protocol(
                "next() called before the previous request was acked".into(),
            ));
        }
        let (bytes, fd) = self.conn.recv().await?;
        let request = decode_request(&bytes, fd, self.snapshot_sent)?;
        if matches!(request, Request::SnapshotSent) {
            self.snapshot_sent = true;
        }
        self.unacked = true;
        Ok(request)
    }

    /// Acknowledges the last request: `Ok` or the reason it failed (sent as `Ack.error`).
    /// A reason too long for one message is cut, keeping its start.
    pub async fn ack(&mut self, result: Result<(), String>) -> Result<(), ZdsError> {
        if !self.unacked {
            return Err(ZdsError::Protocol("ack with no request pending".into()));
        }
        let error = match result {
            Ok(()) => String::new(),
            Err(reason) if reason.is_empty() => "failed (no reason given)".into(),
            Err(reason) => fit(reason, MAX_MESSAGE - 16),
        };
        let response = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error })),
        };
        with_timeout(self.conn.send(&response.encode_to_vec(), None)).await?;
        self.unacked = false;
        Ok(())
    }
}

/// Checks one agent → ztunnel message against the rules. A stray fd is closed on return.
fn decode_request(
    bytes: &[u8],
    fd: Option<OwnedFd>,
    snapshot_sent: bool,
) -> Result<Request, ZdsError> {
    use workload_request::Payload;
    let request = WorkloadRequest::decode(bytes)?;
    let violation = |what: String| Err(ZdsError::Protocol(what));
    match (request.payload, fd) {
        (None, _) => violation("request with no payload (an unknown kind?)".into()),
        (Some(Payload::Add(add)), Some(netns)) => {
            require_uid("add", &add.uid)?;
            Ok(Request::Add {
                uid: add.uid,
                info: add.workload_info,
                netns,
            })
        }
        (Some(Payload::Add(add)), None) => {
            violation(format!("add for uid {:?} came without a netns fd", add.uid))
        }
        (Some(other), Some(_stray)) => violation(format!(
            "{} came with an fd; only add carries one",
            request_name(&other)
        )),
        (Some(Payload::Keep(_)), None) if snapshot_sent => {
            violation("keep after snapshot_sent (keep is for the snapshot only)".into())
        }
        (Some(Payload::Keep(keep)), None) => {
            require_uid("keep", &keep.uid)?;
            Ok(Request::Keep { uid: keep.uid })
        }
        (Some(Payload::Del(del)), None) => {
            require_uid("del", &del.uid)?;
            Ok(Request::Del { uid: del.uid })
        }
        (Some(Payload::SnapshotSent(_)), None) if snapshot_sent => {
            violation("second snapshot_sent on one session".into())
        }
        (Some(Payload::SnapshotSent(_)), None) => Ok(Request::SnapshotSent),
    }
}

fn request_name(p: &workload_request::Payload) -> String {
    use workload_request::Payload;
    match p {
        Payload::Add(a) => format!("add for uid {:?}", a.uid),
        Payload::Keep(k) => format!("keep for uid {:?}", k.uid),
        Payload::Del(d) => format!("del for uid {:?}", d.uid),
        Payload::SnapshotSent(_) => "snapshot_sent".into(),
    }
}

fn require_uid(kind: &str, uid: &str) -> Result<(), ZdsError> {
    if uid.is_empty() {
        return Err(ZdsError::Protocol(format!("{kind} with an empty uid")));
    }
    Ok(())
}

/// Cuts `s` to at most `max` bytes on a char boundary.
fn fit(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The agent's side of a session with one ztunnel.
pub struct AgentSession {
    conn: ZdsConn,
    snapshot_sent: bool,
    /// A request went out and its ack has not been read: set while an exchange runs, left set
    /// if it was abandoned (timeout, cancelled future). Acks correlate only by order, so a late
    /// ack would be mistaken for the next request's: the session is unusable after that.
    in_flight: bool,
}

impl AgentSession {
    /// Waits for ztunnel's hello on an accepted connection.
    pub async fn accept(conn: ZdsConn) -> Result<AgentSession, ZdsError> {
        let (bytes, fd) = with_timeout(conn.recv()).await?;
        if fd.is_some() {
            return Err(ZdsError::Protocol("hello came with an fd".into()));
        }
        let hello = ZdsHello::decode(bytes.as_slice())?;
        if hello.version != Version::V1 as i32 {
            return Err(ZdsError::Protocol(format!(
                "hello with version {} (this agent speaks V1 = 1)",
                hello.version
            )));
        }
        Ok(AgentSession {
            conn,
            snapshot_sent: false,
            in_flight: false,
        })
    }

    /// Sends `add` with the pod's netns and waits for the ack: `Ok(Err(reason))` when ztunnel
    /// answered with an error.
    pub async fn add(
        &mut self,
        uid: &str,
        info: WorkloadInfo,
        netns: BorrowedFd<'_>,
    ) -> Result<Result<(), String>, ZdsError> {
        require_uid("add", uid)?;
        let payload = workload_request::Payload::Add(AddWorkload {
            uid: uid.to_string(),
            workload_info: Some(info),
        });
        self.exchange(payload, Some(netns)).await
    }

    pub async fn keep(&mut self, uid: &str) -> Result<Result<(), String>, ZdsError> {
        require_uid("keep", uid)?;
        if self.snapshot_sent {
            return Err(ZdsError::Protocol(format!(
                "keep for uid {uid:?} after snapshot_sent (keep is for the snapshot only)"
            )));
        }
        let payload = workload_request::Payload::Keep(KeepWorkload {
            uid: uid.to_string(),
        });
        self.exchange(payload, None).await
    }

    pub async fn del(&mut self, uid: &str) -> Result<Result<(), String>, ZdsError> {
        require_uid("del", uid)?;
        let payload = workload_request::Payload::Del(DelWorkload {
            uid: uid.to_string(),
        });
        self.exchange(payload, None).await
    }

    pub async fn snapshot_sent(&mut self) -> Result<Result<(), String>, ZdsError> {
        if self.snapshot_sent {
            return Err(ZdsError::Protocol(
                "snapshot_sent twice on one session".into(),
            ));
        }
        let result = self
            .exchange(
                workload_request::Payload::SnapshotSent(SnapshotSent {}),
                None,
            )
            .await;
        // Sent is sent, whatever the ack said: keep is no longer allowed either way.
        self.snapshot_sent = true;
        result
    }

    /// One request and its ack, within [`EXCHANGE_TIMEOUT`] for the ack.
    async fn exchange(
        &mut self,
        payload: workload_request::Payload,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Result<(), String>, ZdsError> {
        if self.in_flight {
            return Err(ZdsError::Protocol(
                "an earlier request was abandoned before its ack; reconnect the session".into(),
            ));
        }
        let bytes = WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        self.in_flight = true;
        with_timeout(self.conn.send(&bytes, fd)).await?;
        let (reply, stray) = with_timeout(self.conn.recv()).await?;
        if stray.is_some() {
            return Err(ZdsError::Protocol("ack came with an fd".into()));
        }
        let response = WorkloadResponse::decode(reply.as_slice())?;
        let Some(workload_response::Payload::Ack(ack)) = response.payload else {
            return Err(ZdsError::Protocol(
                "response with no ack (an unknown kind?)".into(),
            ));
        };
        self.in_flight = false;
        Ok(if ack.error.is_empty() {
            Ok(())
        } else {
            Err(ack.error)
        })
    }
}

async fn with_timeout<T>(
    fut: impl std::future::Future<Output = Result<T, ZdsError>>,
) -> Result<T, ZdsError> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, fut)
        .await
        .map_err(|_| ZdsError::Timeout(EXCHANGE_TIMEOUT))?
}
