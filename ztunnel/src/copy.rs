//! Metered bidirectional copy between a connection's client side and its server side.
//!
//! Owns only the byte pump: two buffers per connection (small at first, growing with traffic),
//! half-close propagation, and
//! counting into a [`ConnMetrics`] as bytes flow. It does not open, authorize or close
//! connections (the proxy paths own the streams; dropping them closes them) and does not choose
//! labels ([`crate::metrics`]).
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

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::ConnMetrics;

/// Bytes a direction's buffer starts with: most connections are small requests and replies,
/// and thousands of idle ones should not cost 128 KiB each (Istio's ztunnel also starts at
/// 1 KiB).
pub const INITIAL_BUFFER_SIZE: usize = 1024;

/// The most a direction's buffer grows to (bulk transfers are as fast as with it from the
/// start). 256 KiB: one read takes what a bulk sender's socket holds, and one HBONE write
/// goes out as sixteen full TLS records in one `writev` (64 KiB made four times the syscalls).
pub const BUFFER_SIZE: usize = 256 * 1024;

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
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
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
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
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

/// One direction's state: a reusable buffer and where it is in read → write → shutdown.
struct Direction {
    way: Way,
    buf: Box<[u8]>,
    /// `buf[pos..cap]` has been read but not yet written.
    pos: usize,
    cap: usize,
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
            buf: vec![0; INITIAL_BUFFER_SIZE].into_boxed_slice(),
            pos: 0,
            cap: 0,
            total: 0,
            read_eof: false,
            need_flush: false,
            done: false,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        metrics: &ConnMetrics,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_eof {
                if self.cap == self.buf.len() && self.buf.len() < BUFFER_SIZE {
                    // The last read filled the buffer (and it is all written out): grow.
                    let size = (self.buf.len() * GROWTH).min(BUFFER_SIZE);
                    self.buf = vec![0; size].into_boxed_slice();
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.pos = 0;
                        self.cap = n;
                        self.read_eof = n == 0;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read for now: push out what a buffered writer holds,
                        // or the peer may wait forever for bytes we already "wrote".
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }

            while self.pos < self.cap {
                let n = ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &self.buf[self.pos..self.cap])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "peer accepted no bytes",
                    )));
                }
                self.pos += n;
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
                match ready!(writer.as_mut().poll_shutdown(cx)) {
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
struct Transfer<'a, A: ?Sized, B: ?Sized> {
    client: &'a mut A,
    server: &'a mut B,
    metrics: &'a ConnMetrics,
    c2s: Direction,
    s2c: Direction,
}

impl<'a, A, B> Transfer<'a, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
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
            let r = self.c2s.poll_copy(
                cx,
                Pin::new(&mut *self.client),
                Pin::new(&mut *self.server),
                self.metrics,
            );
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Err(e));
            }
        }
        if !self.s2c.done {
            let r = self.s2c.poll_copy(
                cx,
                Pin::new(&mut *self.server),
                Pin::new(&mut *self.client),
                self.metrics,
            );
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
        assert_eq!(transfer.c2s.buf.len(), INITIAL_BUFFER_SIZE);
        assert_eq!(transfer.s2c.buf.len(), INITIAL_BUFFER_SIZE);

        // A small request and reply leave both buffers small.
        client_far.write_all(b"GET\n").await.unwrap();
        server_far.write_all(b"OK\n").await.unwrap();
        let mut buf = [0u8; 16];
        for _ in 0..2 {
            let _ = futures::poll!(std::future::poll_fn(|cx| transfer.poll(cx)));
        }
        assert_eq!(server_far.read(&mut buf).await.unwrap(), 4);
        assert_eq!(client_far.read(&mut buf).await.unwrap(), 3);
        assert_eq!(transfer.c2s.buf.len(), INITIAL_BUFFER_SIZE);
        assert_eq!(transfer.s2c.buf.len(), INITIAL_BUFFER_SIZE);

        // A bulk upload grows the upload's buffer to the maximum; the other stays small.
        let bulk = vec![7u8; 800 * 1024];
        client_far.write_all(&bulk).await.unwrap();
        let mut got = 0;
        while got < bulk.len() {
            let _ = futures::poll!(std::future::poll_fn(|cx| transfer.poll(cx)));
            let mut chunk = vec![0u8; 256 * 1024];
            got += server_far.read(&mut chunk).await.unwrap();
        }
        assert_eq!(transfer.c2s.buf.len(), BUFFER_SIZE);
        assert_eq!(transfer.s2c.buf.len(), INITIAL_BUFFER_SIZE);
        assert_eq!(transfer.totals().client_to_server, 4 + bulk.len() as u64);
    }
}
