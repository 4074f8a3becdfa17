//! Socket queries and actions of the fast path's watch and copy: TCP state and counters
//! (`TCP_INFO`, `SIOCOUTQ`), half-close, tokio readiness. Owns no decision.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

pub(super) const TCP_CLOSE: u8 = 7;
/// States in which the peer's FIN (or a reset: CLOSE) has arrived.
const FIN_RECEIVED: [u8; 5] = [
    6,  /* TIME_WAIT */
    7,  /* CLOSE */
    8,  /* CLOSE_WAIT */
    9,  /* LAST_ACK */
    11, /* CLOSING */
];

pub(super) fn fin_received(s: &TcpStream) -> io::Result<bool> {
    Ok(FIN_RECEIVED.contains(&tcp_info(s.as_raw_fd())?.0))
}

pub(super) fn clear_readiness(s: &TcpStream) {
    let _ = s.try_io(Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

pub(super) fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown on a socket fd we own; errors (peer already gone) are moot here.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Bytes ever written into this socket's send side: acknowledged (`tcpi_bytes_acked`) plus
/// still queued (`SIOCOUTQ`), read in that order so that a concurrent ACK can only make the
/// sum smaller than the truth, never larger. Compared as growth since a baseline taken before
/// splicing (the handshake may count in `tcpi_bytes_acked`).
pub(super) fn written(fd: RawFd) -> io::Result<u64> {
    let (_, acked) = tcp_info(fd)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + outq.max(0) as u64)
}

pub(super) use crate::ebpf::tcp_info;
