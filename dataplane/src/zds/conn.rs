//! The ZDS transport: a unix SOCK_SEQPACKET socket, one message per packet, at most one fd per
//! message (SCM_RIGHTS, received with MSG_CMSG_CLOEXEC; truncated data or control is an error).
//! Owns the socket calls (the unsafe remainder of ZDS lives here); message meaning is
//! [`super::sides`]'s.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use super::ZdsError;

/// One connected ZDS socket.
pub struct ZdsConn {
    _todo: (),
}

impl ZdsConn {
    /// Connects to the agent's socket (ztunnel's side).
    pub async fn connect(_path: &Path) -> Result<ZdsConn, ZdsError> {
        todo!("zds: connect")
    }

    /// Sends one message, with `fd` attached if given.
    pub async fn send(&self, _msg: &[u8], _fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        todo!("zds: send")
    }

    /// Receives one message and the fd that came with it, if any.
    pub async fn recv(&self) -> Result<(Vec<u8>, Option<OwnedFd>), ZdsError> {
        todo!("zds: recv")
    }
}

/// The agent's listening socket.
pub struct ZdsListener {
    _todo: (),
}

impl ZdsListener {
    /// Binds `path` (replacing a stale socket file left by a dead agent), mode 0600.
    pub fn bind(_path: &Path) -> Result<ZdsListener, ZdsError> {
        todo!("zds: bind")
    }

    pub async fn accept(&self) -> Result<ZdsConn, ZdsError> {
        todo!("zds: accept")
    }
}
