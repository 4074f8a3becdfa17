//! The tunnel byte stream: one HTTP/2 CONNECT stream seen as tokio `AsyncRead + AsyncWrite`.
//!
//! Owns: HTTP/2 flow control for a tunnel and its half-close/reset semantics. Must not touch
//! the connection it lives on (the pool and the server own those).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest piece handed to h2 per write: big enough to fill a 1 MiB frame, small enough that
/// one writer cannot hog a connection's window.
const MAX_WRITE_CHUNK: usize = 1024 * 1024;

/// An HTTP/2 CONNECT stream as a byte stream.
///
/// Implements tokio's [`AsyncRead`] and [`AsyncWrite`], so it works with
/// [`tokio::io::copy_bidirectional`] and friends:
///
/// - **Writes** wait for HTTP/2 send window (`reserve_capacity`/`poll_capacity`), so a slow
///   reader on the far side slows the writer down instead of filling memory.
/// - **Reads** return window to the peer (`release_capacity`) as the bytes are handed out.
/// - [`AsyncWriteExt::shutdown`](tokio::io::AsyncWriteExt::shutdown) sends END_STREAM: a
///   half-close, like TCP's FIN. The peer's reads then end; it can still write to us.
/// - A read returns EOF (0 bytes) once the peer ended its side.
/// - Dropping the stream without shutting it down resets it (RST_STREAM CANCEL), like an
///   aborted TCP connection.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Data received but not yet read out.
    pending: Bytes,
    /// We sent END_STREAM.
    shut_down: bool,
    /// The peer ended its side (or reset it with NO_ERROR).
    eof: bool,
    /// Tells the pool when this stream stops counting against its connection.
    _guard: Option<StreamGuard>,
}

/// Something that must happen when a stream goes away (the pool's active-stream accounting).
pub(crate) struct StreamGuard(Option<Box<dyn FnOnce() + Send + Sync>>);

impl StreamGuard {
    pub(crate) fn new(on_drop: impl FnOnce() + Send + Sync + 'static) -> Self {
        StreamGuard(Some(Box::new(on_drop)))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id())
            .field("shut_down", &self.shut_down)
            .field("eof", &self.eof)
            .finish()
    }
}

impl H2Stream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        guard: Option<StreamGuard>,
    ) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            shut_down: false,
            eof: false,
            _guard: guard,
        }
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => return io,
            None => return io::Error::other("h2 I/O error"),
        }
    }
    let kind = match e.reason() {
        Some(Reason::CANCEL) | Some(Reason::STREAM_CLOSED) | Some(Reason::REFUSED_STREAM) => {
            io::ErrorKind::ConnectionReset
        }
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl H2Stream {
    /// The next chunk of received bytes exactly as HTTP/2 delivered it (no copy); `None` once
    /// the peer ended its side. The chunk's window goes back to the peer as it is handed out,
    /// so the caller holds at most one frame's worth beyond the stream window.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        ready!(self.poll_fill(cx))?;
        if self.pending.is_empty() {
            return Poll::Ready(Ok(None));
        }
        let chunk = std::mem::take(&mut self.pending);
        // An error here means the stream is gone; the next poll_data reports it.
        let _ = self.recv.flow_control().release_capacity(chunk.len());
        Poll::Ready(Ok(Some(chunk)))
    }

    /// Waits until `pending` holds received bytes or the peer has ended its side (`eof`).
    /// Empty DATA frames are skipped: only `eof` is an end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending.is_empty() && !self.eof {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                None => self.eof = true,
                // A reset with NO_ERROR is a peer that is simply done.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends as much of `data` as the peer's window allows now, without copying it; how many
    /// bytes went. Waits (Pending) while the window is closed, as [`AsyncWrite::poll_write`].
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_window(cx, data.len()))?;
        match self.send.send_data(data.slice(..n), false) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }

    /// Waits for send window for up to `len` bytes (at most [`MAX_WRITE_CHUNK`]); how much.
    fn poll_window(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        if self.shut_down {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE stream already shut down",
            )));
        }
        let want = len.min(MAX_WRITE_CHUNK);
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                // Capacity can be announced as 0 after a window update race; ask again.
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by peer",
                    )));
                }
            }
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_fill(cx))?;
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        // Give the window back only as the application consumes, so HTTP/2 flow control
        // reflects how fast we really read. An error here means the stream is gone; the next
        // poll_data reports it.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_window(cx, buf.len()))?;
        match this
            .send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
        {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 hands data to the connection task as soon as there is window; nothing to flush here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.shut_down {
            return Poll::Ready(Ok(()));
        }
        this.shut_down = true;
        // Release any window we reserved but will never use.
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if !self.shut_down {
            // Abrupt end: tell the peer, like a TCP RST. Harmless if the stream is already closed.
            self.send.send_reset(Reason::CANCEL);
        }
    }
}
