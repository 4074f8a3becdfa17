//! Each side's view of a ZDS session: the order of messages, which may carry an fd, and acks.
//! Owns the sequence rules (hello first; `keep` only before `snapshot_sent`; exactly one fd
//! with `add` and none otherwise); a violation is a [`ZdsError::Protocol`] that names it.

use std::os::fd::{BorrowedFd, OwnedFd};

use super::proto::WorkloadInfo;
use super::{ZdsConn, ZdsError};

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
    _conn: ZdsConn,
}

impl ZtunnelSession {
    /// Sends the hello (version V1) on a fresh connection.
    pub async fn start(_conn: ZdsConn) -> Result<ZtunnelSession, ZdsError> {
        todo!("zds: ztunnel hello")
    }

    /// The next request. The caller must [`ack`](Self::ack) each before reading the next.
    pub async fn next(&mut self) -> Result<Request, ZdsError> {
        todo!("zds: next request")
    }

    /// Acknowledges the last request: `Ok` or the reason it failed (sent as `Ack.error`).
    pub async fn ack(&mut self, _result: Result<(), String>) -> Result<(), ZdsError> {
        todo!("zds: ack")
    }
}

/// The agent's side of a session with one ztunnel.
pub struct AgentSession {
    _conn: ZdsConn,
}

impl AgentSession {
    /// Waits for ztunnel's hello on an accepted connection.
    pub async fn accept(_conn: ZdsConn) -> Result<AgentSession, ZdsError> {
        todo!("zds: agent accept")
    }

    /// Sends `add` with the pod's netns and waits for the ack: `Ok(Err(reason))` when ztunnel
    /// answered with an error.
    pub async fn add(
        &mut self,
        _uid: &str,
        _info: WorkloadInfo,
        _netns: BorrowedFd<'_>,
    ) -> Result<Result<(), String>, ZdsError> {
        todo!("zds: add")
    }

    pub async fn keep(&mut self, _uid: &str) -> Result<Result<(), String>, ZdsError> {
        todo!("zds: keep")
    }

    pub async fn del(&mut self, _uid: &str) -> Result<Result<(), String>, ZdsError> {
        todo!("zds: del")
    }

    pub async fn snapshot_sent(&mut self) -> Result<Result<(), String>, ZdsError> {
        todo!("zds: snapshot_sent")
    }
}
