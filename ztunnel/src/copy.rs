//! Metered bidirectional copy between a connection's client side and its server side.
//!
//! Owns only the byte pump: a read buffer per direction whose reader is a socket (small at
//! first, growing with traffic, and while small none at all when the socket is idle; an HBONE
//! tunnel's bytes pass as HTTP/2's own chunks instead),
//! half-close propagation, and counting into a [`ConnMetrics`] as bytes flow. It does not
//! open, authorize or close connections (the proxy paths own the streams; dropping them closes
//! them) and does not choose labels ([`crate::metrics`]).
//!
//! # Counting
//!
//! A chunk is counted right after the destination side accepted it (`poll_write` returned
//! `n`), so the counters advance *while* a connection is open and equal the returned totals:
//! client→server bytes are [`ConnMetrics::received`], server→client bytes are
//! [`ConnMetrics::sent`] (Istio's direction, from the reporter's point of view).
//!
//! # Half-close
//!
//! When one side's read hits EOF, the other side's write is shut down (a TCP FIN) and the other
//! direction keeps copying. The copy ends when both directions have ended, or on the first
//! error of either.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use meshcore::hbone::H2Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::metrics::ConnMetrics;

/// Bytes a direction's buffer starts with: most connections are small requests and replies,
/// and thousands of idle ones should not cost 128 KiB each (Istio's ztunnel also starts at
/// 1 KiB).
pub const INITIAL_BUFFER_SIZE: usize = 1024;

/// The most a direction's buffer grows to (bulk transfers are as fast as with it from the
/// start). 256 KiB: one read takes what a bulk sender's socket holds, and one HBONE write
/// goes out as sixteen full TLS records in one `writev` (64 KiB made four times the syscalls).
pub const BUFFER_SIZE: usize = 256 * 1024;

/// A direction whose reads ask for at most this many bytes holds no buffer while its socket
/// has nothing to read: thousands of idle connections then cost no buffer each. Larger ones
/// (a connection that moved bulk) keep theirs, which a read would otherwise allocate and fault
/// in again each time.
const RELEASE_WHEN_IDLE: usize = 16 * 1024;

/// A read that fills the buffer means more is waiting: the buffer grows by this factor, up to
/// [`BUFFER_SIZE`] (1 → 4 → 16 → 64 → 256 KiB), and never shrinks.
const GROWTH: usize = 4;

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// From the client side to the server side (Istio's "received").
    pub client_to_server: u64,
    /// From the server side to the client side (Istio's "sent").
    pub server_to_client: u64,
}

/// How [`bidirectional_until`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached EOF and were shut down.
    Completed(Totals),
    /// `cancel` completed first. Nothing was shut down: drop the streams to close them.
    Cancelled(Totals),
}

impl Outcome {
    /// The bytes moved, however it ended.
    pub fn totals(&self) -> Totals {
        match *self {
            Outcome::Completed(t) | Outcome::Cancelled(t) => t,
        }
    }
}

/// Copies both ways until both directions end, counting bytes into `metrics` as they flow.
///
/// Half-close aware (see the module docs). Returns `(client_to_server, server_to_client)`
/// bytes. On an I/O error of either side the copy stops and returns that error; bytes moved
/// until then have already been counted.
pub async fn bidirectional<A, B>(
    client: &mut A,
    server: &mut B,
    metrics: &ConnMetrics,
) -> io::Result<(u64, u64)>
where
    A: Side,
    B: Side,
{
    let mut transfer = Transfer::new(client, server, metrics);
    std::future::poll_fn(|cx| transfer.poll(cx)).await?;
    let t = transfer.totals();
    Ok((t.client_to_server, t.server_to_client))
}

/// [`bidirectional`], but stops as soon as `cancel` completes (e.g. a policy change now denies
/// the connection).
///
/// On cancel it returns [`Outcome::Cancelled`] with the bytes moved so far and leaves both
/// streams as they are; the caller drops them to close the connection (and may mark the close
/// with [`ConnMetrics::set_response_flags`]). `cancel` is polled before the copy on every wake,
/// so a cancel that is already complete wins even if data is ready.
pub async fn bidirectional_until<A, B, C>(
    client: &mut A,
    server: &mut B,
    metrics: &ConnMetrics,
    cancel: C,
) -> io::Result<Outcome>
where
    A: Side,
    B: Side,
    C: Future<Output = ()>,
{
    let mut cancel = pin!(cancel);
    let mut transfer = Transfer::new(client, server, metrics);
    let cancelled = std::future::poll_fn(|cx| {
        if cancel.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(true));
        }
        transfer.poll(cx).map_ok(|()| false)
    })
    .await?;
    let totals = transfer.totals();
    Ok(if cancelled {
        Outcome::Cancelled(totals)
    } else {
        Outcome::Completed(totals)
    })
}

/// Which Istio counter a direction feeds.
#[derive(Clone, Copy)]
enum Way {
    ClientToServer,
    ServerToClient,
}

/// One side of a proxied connection: a socket, or an HBONE tunnel.
///
/// A tunnel's bytes move as the `Bytes` HTTP/2 received or will send, never through a copy
/// buffer: a chunk read from a socket goes to h2 as it is, and a chunk h2 received is written
/// to the socket from h2's own buffer.
pub trait Side: AsyncRead + AsyncWrite + Unpin {
    /// The tunnel, if this side is one.
    fn tunnel(&mut self) -> Option<&mut H2Stream> {
        None
    }

    /// Ready once a read would not block. A socket answers without a buffer, so a direction
    /// can wait for bytes holding none; the default (always ready) makes it read into one.
    fn poll_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Side for tokio::net::TcpStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}
impl Side for tokio::io::DuplexStream {}
impl Side for H2Stream {
    fn tunnel(&mut self) -> Option<&mut H2Stream> {
        Some(self)
    }
}

/// One direction's state: the bytes in hand and where it is in read → write → shutdown.
struct Direction {
    way: Way,
    /// Where socket reads land. Its allocation is reused once the chunks cut from it are gone;
    /// dropped while the socket is idle, unless `read_size` grew past [`RELEASE_WHEN_IDLE`].
    buf: BytesMut,
    /// How much the next socket read asks for: grows with traffic, never shrinks.
    read_size: usize,
    /// Read but not yet written.
    out: Bytes,
    total: u64,
    read_eof: bool,
    /// Written since the last flush (flush before parking on a read, for buffered writers).
    need_flush: bool,
    /// EOF seen, everything written, and the writer shut down.
    done: bool,
}

impl Direction {
    fn new(way: Way) -> Direction {
        Direction {
            way,
            buf: BytesMut::new(),
            read_size: INITIAL_BUFFER_SIZE,
            out: Bytes::new(),
            total: 0,
            read_eof: false,
            need_flush: false,
            done: false,
        }
    }

    /// Reads the next chunk into `out`: from a tunnel as received, from a socket into `buf`.
    fn poll_fill<R: Side>(&mut self, cx: &mut Context<'_>, reader: &mut R) -> Poll<io::Result<()>> {
        if let Some(tunnel) = reader.tunnel() {
            match ready!(tunnel.poll_chunk(cx))? {
                Some(chunk) => self.out = chunk,
                None => self.read_eof = true,
            }
            return Poll::Ready(Ok(()));
        }
        // Let go of the last chunk (written out, but still a reference to `buf`'s allocation),
        // so `reserve` can reuse that allocation instead of making a new one per read.
        self.out = Bytes::new();
        let release_when_idle = self.read_size <= RELEASE_WHEN_IDLE;
        if release_when_idle && self.buf.capacity() == 0 {
            ready!(reader.poll_readable(cx))?;
        }
        self.buf.reserve(self.read_size);
        // `read_buf` fills the spare capacity without zeroing it first.
        let n = match pin!(reader.read_buf(&mut self.buf)).poll(cx) {
            Poll::Ready(n) => n?,
            Poll::Pending => {
                if release_when_idle {
                    self.buf = BytesMut::new();
                }
                return Poll::Pending;
            }
        };
        if n == 0 {
            self.read_eof = true;
            return Poll::Ready(Ok(()));
        }
        if n >= self.read_size && self.read_size < BUFFER_SIZE {
            // The read filled what it asked for: more is waiting, ask for more next time.
            self.read_size = (self.read_size * GROWTH).min(BUFFER_SIZE);
        }
        self.out = self.buf.split().freeze();
        Poll::Ready(Ok(()))
    }

    fn poll_copy<R: Side, W: Side>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        metrics: &ConnMetrics,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.out.is_empty() && !self.read_eof {
                match self.poll_fill(cx, reader) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        // Nothing more to read for now: push out what a buffered writer holds,
                        // or the peer may wait forever for bytes we already "wrote".
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }

            while !self.out.is_empty() {
                let n = match writer.tunnel() {
                    Some(tunnel) => ready!(tunnel.poll_send(cx, &self.out))?,
                    None => ready!(Pin::new(&mut *writer).poll_write(cx, &self.out))?,
                };
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "peer accepted no bytes",
                    )));
                }
                self.out.advance(n);
                self.total += n as u64;
                self.need_flush = true;
                match self.way {
                    Way::ClientToServer => metrics.received(n as u64),
                    Way::ServerToClient => metrics.sent(n as u64),
                }
            }

            if self.read_eof {
                // Propagate the half-close. `poll_shutdown` flushes first. A peer that is already
                // gone (NotConnected) makes the FIN moot, not the copy a failure.
                match ready!(Pin::new(&mut *writer).poll_shutdown(cx)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Both directions of one connection.
struct Transfer<'a, A, B> {
    client: &'a mut A,
    server: &'a mut B,
    metrics: &'a ConnMetrics,
    c2s: Direction,
    s2c: Direction,
}

impl<'a, A: Side, B: Side> Transfer<'a, A, B> {
    fn new(client: &'a mut A, server: &'a mut B, metrics: &'a ConnMetrics) -> Self {
        Transfer {
            client,
            server,
            metrics,
            c2s: Direction::new(Way::ClientToServer),
            s2c: Direction::new(Way::ServerToClient),
        }
    }

    fn totals(&self) -> Totals {
        Totals {
            client_to_server: self.c2s.total,
            server_to_client: self.s2c.total,
        }
    }

    /// Ready(Ok) once both directions are done; Ready(Err) on the first error of either.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.c2s.done {
            let r = self
                .c2s
                .poll_copy(cx, &mut *self.client, &mut *self.server, self.metrics);
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Err(e));
            }
        }
        if !self.s2c.done {
            let r = self
                .s2c
                .poll_copy(cx, &mut *self.server, &mut *self.client, self.metrics);
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Err(e));
            }
        }
        if self.c2s.done && self.s2c.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, TcpLabels};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn buffers_start_small_and_grow_only_with_traffic() {
        let m = Metrics::new();
        let conn = m.open(TcpLabels::unknown("destination"));
        let (mut client, mut client_far) = tokio::io::duplex(1024 * 1024);
        let (mut server, mut server_far) = tokio::io::duplex(1024 * 1024);
        let mut transfer = Transfer::new(&mut client, &mut server, &conn);
        assert_eq!(transfer.c2s.read_size, INITIAL_BUFFER_SIZE);
        assert_eq!(transfer.s2c.read_size, INITIAL_BUFFER_SIZE);

        // A small request and reply leave both buffers small.
        client_far.write_all(b"GET\n").await.unwrap();
        server_far.write_all(b"OK\n").await.unwrap();
        let mut buf = [0u8; 16];
        for _ in 0..2 {
            let _ = futures::poll!(std::future::poll_fn(|cx| transfer.poll(cx)));
        }
        assert_eq!(server_far.read(&mut buf).await.unwrap(), 4);
        assert_eq!(client_far.read(&mut buf).await.unwrap(), 3);
        assert_eq!(transfer.c2s.read_size, INITIAL_BUFFER_SIZE);
        assert_eq!(transfer.s2c.read_size, INITIAL_BUFFER_SIZE);
        // Waiting for the next bytes, neither direction holds a buffer.
        let _ = futures::poll!(std::future::poll_fn(|cx| transfer.poll(cx)));
        assert_eq!(transfer.c2s.buf.capacity(), 0);
        assert_eq!(transfer.s2c.buf.capacity(), 0);

        // A bulk upload grows the upload's buffer to the maximum; the other stays small.
        let bulk = vec![7u8; 800 * 1024];
        client_far.write_all(&bulk).await.unwrap();
        let mut got = 0;
        while got < bulk.len() {
            let _ = futures::poll!(std::future::poll_fn(|cx| transfer.poll(cx)));
            let mut chunk = vec![0u8; 256 * 1024];
            got += server_far.read(&mut chunk).await.unwrap();
        }
        assert_eq!(transfer.c2s.read_size, BUFFER_SIZE);
        assert_eq!(transfer.s2c.read_size, INITIAL_BUFFER_SIZE);
        assert_eq!(transfer.totals().client_to_server, 4 + bulk.len() as u64);
        // Waiting again: the bulk direction keeps its buffer, the other holds none.
        let _ = futures::poll!(std::future::poll_fn(|cx| transfer.poll(cx)));
        assert!(transfer.c2s.buf.capacity() >= BUFFER_SIZE);
        assert_eq!(transfer.s2c.buf.capacity(), 0);
    }

    /// Idle sockets: a direction waits for bytes holding no buffer, and every byte still
    /// arrives once they come.
    #[tokio::test]
    async fn an_idle_socket_direction_holds_no_buffer() {
        let m = Metrics::new();
        let conn = m.open(TcpLabels::unknown("destination"));
        let pair = || async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let far = tokio::net::TcpStream::connect(l.local_addr().unwrap());
            let (far, near) = tokio::join!(far, l.accept());
            (near.unwrap().0, far.unwrap())
        };
        let (mut client, mut client_far) = pair().await;
        let (mut server, mut server_far) = pair().await;
        let mut transfer = Transfer::new(&mut client, &mut server, &conn);
        for round in 0..3u8 {
            assert!(futures::poll!(std::future::poll_fn(|cx| transfer.poll(cx))).is_pending());
            assert_eq!(transfer.c2s.buf.capacity(), 0, "round {round}");
            assert_eq!(transfer.s2c.buf.capacity(), 0, "round {round}");
            let request = vec![round; 3000];
            client_far.write_all(&request).await.unwrap();
            let mut got = vec![0u8; request.len()];
            let forward = server_far.read_exact(&mut got);
            tokio::select! {
                r = forward => { r.unwrap(); }
                r = std::future::poll_fn(|cx| transfer.poll(cx)) => panic!("copy ended: {r:?}"),
            }
            assert_eq!(got, request);
        }
    }
}
