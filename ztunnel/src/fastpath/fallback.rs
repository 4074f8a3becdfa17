//! The userspace copy one direction of a splice falls back to once the kernel program stopped
//! redirecting it (its in-flight bytes passed the bound, see [`crate::ebpf::Ebpf::splice_copying`]).
//! The bytes from then on stay on the receiving leg, charged to its receive buffer, so TCP
//! holds the sender back while this copy (or the receiver) is slow. Owns that copy only; the
//! watch of both legs is [`super`]'s.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{
    DRAIN_POLL_MAX, DRAIN_POLL_MIN, TCP_CLOSE, clear_readiness, shutdown_write, tcp_info, written,
};
use crate::ebpf::Ebpf;

/// Copies what arrives on `from` (whose bytes the program redirected, counted under `cookie`,
/// until it stopped) to `to`, whose [`written`] was `to_base` before the splice, until `from`'s
/// FIN, then shuts `to`'s write side. `copied` counts the bytes written to `to`.
///
/// Order: the redirected bytes sit in `to`'s forwarding queue until the kernel's worker puts
/// them into `to`'s send buffer; a byte written to `to` before that would overtake them. So
/// the copy starts only once `to` holds every counted byte (the counter is final: the
/// program never redirects this direction again).
pub(super) async fn copy_rest(
    ebpf: &Ebpf,
    cookie: u64,
    from: &TcpStream,
    to: &TcpStream,
    to_base: u64,
    copied: &AtomicU64,
) -> io::Result<()> {
    let counted = ebpf.spliced_bytes(cookie);
    let mut backoff = DRAIN_POLL_MIN;
    // The forwarding queue has no event of its own: polled, backing off.
    while written(to.as_raw_fd())?.wrapping_sub(to_base) < counted {
        if tcp_info(to.as_raw_fd())?.0 == TCP_CLOSE {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(DRAIN_POLL_MAX);
    }
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match recv(from, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Readiness was consumed by the watch (or by us): clear it, then look once
                // more before waiting, so bytes that arrived in between are not missed.
                clear_readiness(from);
                match recv(from, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        from.ready(Interest::READABLE).await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        write_all(to, &buf[..n]).await?;
        copied.fetch_add(n as u64, Ordering::Relaxed);
    }
    shutdown_write(to.as_raw_fd());
    Ok(())
}

const COPY_BUF: usize = 256 << 10;

/// One non-blocking read straight from the socket, whatever tokio's readiness says (a spliced
/// leg's readiness is the watch's business until the copy starts).
fn recv(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is writable for its length.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

async fn write_all(s: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        s.writable().await?;
        match s.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
