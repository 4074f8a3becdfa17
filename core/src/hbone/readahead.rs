//! Large socket reads under TLS: the read side of an HBONE connection's TCP socket, buffered.
//!
//! rustls asks its transport for at most 4 KiB more than it already holds (one record at
//! most), so a bulk tunnel read its TCP socket ~16 KiB per `recvfrom` — four times the
//! syscalls of the bytes' worth. [`ReadAhead`] sits between the socket and rustls: it reads
//! whatever the kernel has (up to [`MAX_READ`]) in one syscall and hands rustls its small
//! pieces with a `memcpy`. Writes pass straight through (vectored, as rustls writes records).
//!
//! Before the TLS handshake has proved who the peer is, the buffer stays at [`INITIAL_READ`]:
//! an unauthenticated peer flooding its handshake slots pins 16 KiB each, not 256 KiB. The
//! connection's owner calls [`ReadAhead::allow_large_reads`] once the handshake is done.
//!
//! Owns: that buffer only. It never interprets the bytes and never reads ahead of a caller's
//! demand (it reads only when its buffer is empty and someone asked), so a closed or failing
//! socket is reported to rustls exactly as the socket reported it.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The buffer a connection starts with: a few records. Idle and interactive connections never
/// need more (thousands of pooled connections should not hold 256 KiB each).
pub const INITIAL_READ: usize = 16 * 1024;

/// The most one syscall reads. The buffer grows ×4 up to here each time a read fills it.
pub const MAX_READ: usize = 256 * 1024;

/// A transport whose reads go through a growing buffer; see the module docs.
#[derive(Debug)]
pub struct ReadAhead<T> {
    io: T,
    buf: Box<[u8]>,
    /// `buf[pos..end]` has been read from the socket but not yet handed out.
    pos: usize,
    end: usize,
    /// How far the buffer may grow: [`INITIAL_READ`] until the handshake is done.
    max: usize,
}

impl<T> ReadAhead<T> {
    /// Wraps `io`; nothing is read until the first read, and the buffer stays at
    /// [`INITIAL_READ`] until [`ReadAhead::allow_large_reads`].
    pub fn new(io: T) -> Self {
        ReadAhead {
            io,
            buf: Box::default(),
            pos: 0,
            end: 0,
            max: INITIAL_READ,
        }
    }

    /// Lets the buffer grow up to [`MAX_READ`]: call once the peer is authenticated.
    pub fn allow_large_reads(&mut self) {
        self.max = MAX_READ;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.end {
            if out.remaining() >= this.buf.len().max(INITIAL_READ) {
                // The caller's buffer is at least as big as ours: no point copying twice.
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            if this.buf.is_empty() {
                this.buf = vec![0; INITIAL_READ].into_boxed_slice();
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            this.pos = 0;
            this.end = n;
            if n == this.buf.len() && n < this.max {
                // A full read means more was waiting: read more at once next time.
                let grown = (n * 4).min(this.max);
                let mut bigger = vec![0; grown].into_boxed_slice();
                bigger[..n].copy_from_slice(&this.buf[..n]);
                this.buf = bigger;
            }
            if n == 0 {
                // EOF: nothing to hand out, and `out` stays unfilled, as the socket said.
                return Poll::Ready(Ok(()));
            }
        }
        let n = (this.end - this.pos).min(out.remaining());
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Every byte comes out once, in order, whatever sizes the reader asks for; the buffer
    /// grows only when reads fill it, and EOF and writes pass through.
    #[tokio::test]
    async fn bytes_in_order_buffer_grows_with_traffic_eof_passes() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut ra = ReadAhead::new(near);
        ra.allow_large_reads();
        let data: Vec<u8> = (0..600_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        far.write_all(&data).await.unwrap();
        far.shutdown().await.unwrap();
        let mut got = Vec::new();
        let mut sizes = [5usize, 4096, 17, 18_437, 1].iter().cycle();
        loop {
            let mut chunk = vec![0; *sizes.next().unwrap()];
            let n = ra.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(ra.buf.len(), MAX_READ);

        ra.write_all(b"reply").await.unwrap();
        let mut back = [0u8; 5];
        far.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"reply");
    }

    /// Before the handshake is done a flood does not grow the buffer past [`INITIAL_READ`].
    #[tokio::test]
    async fn the_buffer_stays_small_until_large_reads_are_allowed() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut ra = ReadAhead::new(near);
        far.write_all(&vec![7u8; 512 * 1024]).await.unwrap();
        let mut b = [0u8; 4096];
        for _ in 0..64 {
            assert_eq!(ra.read(&mut b).await.unwrap(), 4096);
        }
        assert_eq!(ra.buf.len(), INITIAL_READ);
        ra.allow_large_reads();
        for _ in 0..64 {
            assert_eq!(ra.read(&mut b).await.unwrap(), 4096);
        }
        assert!(ra.buf.len() > INITIAL_READ, "{}", ra.buf.len());
    }

    #[tokio::test]
    async fn small_traffic_keeps_the_buffer_small() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let mut ra = ReadAhead::new(near);
        for i in 0..50u8 {
            far.write_all(&[i; 100]).await.unwrap();
            let mut b = [0u8; 4096];
            let n = ra.read(&mut b).await.unwrap();
            assert_eq!(&b[..n], &[i; 100][..]);
        }
        assert_eq!(ra.buf.len(), INITIAL_READ);
    }
}
