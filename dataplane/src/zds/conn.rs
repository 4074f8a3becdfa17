//! The ZDS transport: a unix SOCK_SEQPACKET socket, one message per packet, at most one fd per
//! message (SCM_RIGHTS, received with MSG_CMSG_CLOEXEC; truncated data or control is an error).
//! Owns the socket calls (the unsafe remainder of ZDS lives here); message meaning is
//! [`super::sides`]'s.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;

use super::{MAX_MESSAGE, ZdsError};

/// Room for this many fds in the receive control buffer. One is allowed; the room for more is
/// there so that extra fds a hostile peer sends land in our table where we can close them
/// (fds that do not fit are dropped by the kernel, which also flags MSG_CTRUNC).
const CONTROL_FDS: usize = 16;
/// The control buffer in u64 words, so that cmsg headers inside it are aligned.
const CONTROL_WORDS: usize = 16;

/// One connected ZDS socket.
pub struct ZdsConn {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsConn {
    /// Connects to the agent's socket (ztunnel's side). A full accept backlog is an error like
    /// any other: the caller retries with back-off.
    pub async fn connect(path: &Path) -> Result<ZdsConn, ZdsError> {
        let sock_err = |source: io::Error| ZdsError::Socket {
            path: path.display().to_string(),
            source,
        };
        let fd = seqpacket_socket().map_err(sock_err)?;
        let addr = UnixAddr::new(path).map_err(|e| sock_err(e.into()))?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(|e| sock_err(e.into()))?;
        Ok(ZdsConn { fd: register(fd)? })
    }

    /// Wraps an already connected unix SOCK_SEQPACKET socket (e.g. one end of a socketpair).
    pub fn from_fd(fd: OwnedFd) -> Result<ZdsConn, ZdsError> {
        let ty = socket::getsockopt(&fd, socket::sockopt::SockType).map_err(io::Error::from)?;
        if ty != SockType::SeqPacket {
            return Err(ZdsError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ZDS needs a SOCK_SEQPACKET socket, got {ty:?}"),
            )));
        }
        set_nonblocking(&fd)?;
        Ok(ZdsConn { fd: register(fd)? })
    }

    /// Sends one message, with `fd` attached if given. A message over [`MAX_MESSAGE`] is
    /// refused here: the peer would reject it anyway, and a clear local error is better.
    pub async fn send(&self, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        if msg.len() > MAX_MESSAGE {
            return Err(ZdsError::Protocol(format!(
                "refusing to send a {}-byte message (the limit is {MAX_MESSAGE})",
                msg.len()
            )));
        }
        let raw = fd.map(|f| f.as_raw_fd());
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| send_once(inner.as_raw_fd(), msg, raw)) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => return Err(closed_or(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one message and the fd that came with it, if any. Cancel-safe: a message is
    /// either taken whole or left in the socket.
    pub async fn recv(&self) -> Result<(Vec<u8>, Option<OwnedFd>), ZdsError> {
        let received = loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| recv_once(inner.as_raw_fd())) {
                Ok(r) => break r.map_err(closed_or)?,
                Err(_would_block) => continue,
            }
        };
        // From here on every fd that came is an OwnedFd: any early return closes them.
        let Received {
            mut data,
            len,
            flags,
            mut fds,
            other_cmsg,
        } = received;
        if flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || fds.len() > 1 {
            return Err(ZdsError::Truncated);
        }
        if other_cmsg {
            return Err(ZdsError::Protocol(
                "message carried a control message other than SCM_RIGHTS".into(),
            ));
        }
        if len == 0 {
            // SOCK_SEQPACKET reads 0 at end of stream; no ZDS message encodes to nothing
            // that a peer would need to send.
            return Err(ZdsError::Closed);
        }
        data.truncate(len);
        Ok((data, fds.pop()))
    }
}

/// The agent's listening socket.
pub struct ZdsListener {
    fd: AsyncFd<OwnedFd>,
}

impl ZdsListener {
    /// Binds `path` (replacing a stale socket file left by a dead agent), mode 0600. Creates
    /// the parent directory if missing. Refuses to replace a file that is not a socket, or a
    /// socket someone still listens on.
    pub fn bind(path: &Path) -> Result<ZdsListener, ZdsError> {
        let sock_err = |source: io::Error| ZdsError::Socket {
            path: path.display().to_string(),
            source,
        };
        remove_stale(path).map_err(sock_err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(sock_err)?;
        }
        let fd = seqpacket_socket().map_err(sock_err)?;
        let addr = UnixAddr::new(path).map_err(|e| sock_err(e.into()))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(|e| sock_err(e.into()))?;
        // Before listen(): until then a connect is refused, so nobody gets in under the
        // umask's mode.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(sock_err)?;
        socket::listen(&fd, Backlog::new(128).map_err(|e| sock_err(e.into()))?)
            .map_err(|e| sock_err(e.into()))?;
        Ok(ZdsListener { fd: register(fd)? })
    }

    pub async fn accept(&self) -> Result<ZdsConn, ZdsError> {
        loop {
            let mut guard = self.fd.readable().await?;
            let accepted = guard.try_io(|inner| {
                socket::accept4(
                    inner.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            match accepted {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                Ok(Ok(raw)) => {
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    return Ok(ZdsConn { fd: register(fd)? });
                }
                // The peer gave up before we accepted: wait for the next one.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Ok(Err(e)) => return Err(ZdsError::Io(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Hands an owned socket to tokio's reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and the same fd until the AsyncFd that owns it drops it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A socket file nobody listens on is what a dead agent leaves behind: remove it. Anything
/// else at the path is an operator's to sort out.
fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket; remove it or choose another path",
        ));
    }
    let probe = seqpacket_socket()?;
    let addr = UnixAddr::new(path)?;
    match socket::connect(probe.as_raw_fd(), &addr) {
        Err(Errno::ECONNREFUSED) | Err(Errno::ENOENT) => std::fs::remove_file(path),
        // Connected, or a backlog so full it makes us wait: someone is listening.
        Ok(()) | Err(Errno::EAGAIN) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on it (is another node agent running?)",
        )),
        Err(e) => Err(e.into()),
    }
}

/// A peer that went away is `Closed`, whatever errno said it.
fn closed_or(e: io::Error) -> ZdsError {
    match e.raw_os_error() {
        Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN) => ZdsError::Closed,
        _ => ZdsError::Io(e),
    }
}

fn send_once(sock: RawFd, msg: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let fds = fd.map(|f| [f]);
    let cmsgs: Vec<ControlMessage<'_>> = fds
        .as_ref()
        .map(|f| ControlMessage::ScmRights(f))
        .into_iter()
        .collect();
    let iov = [io::IoSlice::new(msg)];
    let sent = socket::sendmsg::<()>(sock, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != msg.len() {
        // SOCK_SEQPACKET sends whole messages or fails; anything else is a kernel surprise.
        return Err(io::Error::other(format!(
            "sent {sent} of {} bytes",
            msg.len()
        )));
    }
    Ok(())
}

struct Received {
    data: Vec<u8>,
    len: usize,
    flags: libc::c_int,
    fds: Vec<OwnedFd>,
    other_cmsg: bool,
}

/// One recvmsg, by hand rather than through nix: with MSG_CTRUNC nix refuses to show the
/// control messages, and the fds that did arrive would leak.
fn recv_once(sock: RawFd) -> io::Result<Received> {
    const _: () = assert!(
        CONTROL_WORDS * 8 >= (CONTROL_FDS * std::mem::size_of::<RawFd>()) + 16,
        "control buffer too small for CONTROL_FDS"
    );
    let mut data = vec![0u8; MAX_MESSAGE];
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at live buffers of the sizes it claims, for the whole call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    let mut other_cmsg = false;
    let control_end = control.as_ptr() as usize + msg.msg_controllen as usize;
    // SAFETY: the CMSG_* walk stays within msg_controllen, which the kernel set to what it
    // wrote; `control` is u64-aligned so each header is aligned; each fd read is bounded by
    // the control buffer's end.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let hdr = &*cmsg;
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                let data_ptr = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let data_len = (hdr.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let room = control_end.saturating_sub(data_ptr as usize);
                let count = data_len.min(room) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data_ptr.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            } else {
                other_cmsg = true;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        data,
        len: n as usize,
        flags: msg.msg_flags,
        fds,
        other_cmsg,
    })
}

impl AsFd for ZdsConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}
