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
//! A grown buffer goes back to [`INITIAL_READ`] at the first small read once no large one has
//! come for [`SHRINK_QUIET`]: a pooled connection that once carried a burst keeps 16 KiB while
//! it idles (its keepalive pings are such reads), and a bulk transfer, whose large reads never
//! pause that long, never sees its buffer shrink and regrow.
//!
//! Owns: that buffer only. It never interprets the bytes and never reads ahead of a caller's
//! demand (it reads only when its buffer is empty and someone asked), so a closed or failing
//! socket is reported to rustls exactly as the socket reported it.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Duration, Instant};

/// The buffer a connection starts with: a few records. Idle and interactive connections never
/// need more (thousands of pooled connections should not hold 256 KiB each).
pub const INITIAL_READ: usize = 16 * 1024;

/// The most one syscall reads. The buffer grows ×4 up to here each time a read fills it.
pub const MAX_READ: usize = 256 * 1024;

/// How long a grown buffer must go without a large read (over a sixteenth of it) before a small
/// read shrinks it back to [`INITIAL_READ`]. Longer than any pause inside a transfer; shorter
/// than the keepalive interval, so an idle connection shrinks at its first ping.
pub const SHRINK_QUIET: Duration = Duration::from_secs(5);

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
    /// When the grown buffer last had a large read (only kept while it is grown).
    last_large: Option<Instant>,
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
            last_large: None,
        }
    }

    /// Lets the buffer grow up to [`MAX_READ`]: call once the peer is authenticated.
    pub fn allow_large_reads(&mut self) {
        self.max = MAX_READ;
    }
}

impl<T> ReadAhead<T> {
    /// Replaces the buffer with one of `len` bytes, keeping the unread `buf[pos..end]` (which
    /// must fit) at its start.
    fn resize(&mut self, len: usize) {
        let unread = self.end - self.pos;
        debug_assert!(unread <= len);
        let mut fresh = vec![0; len].into_boxed_slice();
        fresh[..unread].copy_from_slice(&self.buf[self.pos..self.end]);
        self.buf = fresh;
        self.pos = 0;
        self.end = unread;
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
                this.resize((n * 4).min(this.max));
                this.last_large = Some(Instant::now());
            } else if this.buf.len() > INITIAL_READ {
                if n > this.buf.len() / 16 {
                    this.last_large = Some(Instant::now());
                } else if this.last_large.is_none_or(|t| t.elapsed() >= SHRINK_QUIET) {
                    this.resize(INITIAL_READ);
                    this.last_large = None;
                }
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

    /// A grown buffer survives small reads while large ones keep coming, shrinks at the first
    /// small read after [`SHRINK_QUIET`] without one, and regrows with the next burst.
    #[tokio::test(start_paused = true)]
    async fn a_grown_buffer_shrinks_after_a_quiet_spell_not_during_a_burst() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut ra = ReadAhead::new(near);
        ra.allow_large_reads();
        type Far = tokio::io::DuplexStream;
        async fn burst(ra: &mut ReadAhead<Far>, far: &mut Far) {
            far.write_all(&[1u8; 600 * 1024]).await.unwrap();
            let (mut b, mut left) = ([0u8; 4096], 600 * 1024);
            while left > 0 {
                left -= ra.read(&mut b).await.unwrap();
            }
        }
        async fn small(ra: &mut ReadAhead<Far>, far: &mut Far, i: u8) {
            far.write_all(&[i; 17]).await.unwrap();
            let mut p = [0u8; 64];
            assert_eq!(ra.read(&mut p).await.unwrap(), 17);
            assert_eq!(p[..17], [i; 17]);
        }
        burst(&mut ra, &mut far).await;
        assert_eq!(ra.buf.len(), MAX_READ);
        // Small reads within the quiet spell: still grown.
        for i in 0..10 {
            tokio::time::advance(SHRINK_QUIET / 20).await;
            small(&mut ra, &mut far, i).await;
        }
        assert_eq!(ra.buf.len(), MAX_READ);
        // A burst, then quiet for the whole spell: the next small read shrinks it.
        burst(&mut ra, &mut far).await;
        tokio::time::advance(SHRINK_QUIET).await;
        small(&mut ra, &mut far, 42).await;
        assert_eq!(ra.buf.len(), INITIAL_READ);
        // And it grows again when traffic does.
        burst(&mut ra, &mut far).await;
        assert_eq!(ra.buf.len(), MAX_READ);
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
