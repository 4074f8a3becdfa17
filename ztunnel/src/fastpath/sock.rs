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

/// (tcpi_state, tcpi_bytes_acked) of a TCP socket.
pub(super) fn tcp_info(fd: RawFd) -> io::Result<(u8, u64)> {
    // struct tcp_info: tcpi_state at byte 0, tcpi_bytes_acked (u64) at byte 120 (Linux 4.1+).
    const BYTES_ACKED: usize = 120;
    let mut buf = [0u64; 32];
    let mut len = std::mem::size_of_val(&buf) as libc::socklen_t;
    // SAFETY: buf is writable for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < BYTES_ACKED + 8 {
        return Err(io::Error::other("TCP_INFO too short (kernel < 4.1)"));
    }
    let state = buf[0].to_ne_bytes()[0];
    Ok((state, buf[BYTES_ACKED / 8]))
}
