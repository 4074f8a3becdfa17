//! Telling HTTP from other bytes by the first few a client sends, and giving them back.
//!
//! Owns reading just enough to decide (an HTTP/1 method and a space, or the HTTP/2 preface)
//! and [`Rewind`], which replays what was read before the rest of the stream. Does not serve
//! anything.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What the first bytes were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    /// Not HTTP, or nothing in time (a server-first protocol), or the client closed.
    Other,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// Classifies what has been read so far: `None` while it could still go either way.
fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Sniffed::Http2);
    }
    if METHODS.iter().any(|m| buf.starts_with(m)) {
        return Some(Sniffed::Http1);
    }
    let could_be = |p: &[u8]| p.starts_with(&buf[..buf.len().min(p.len())]);
    if could_be(H2_PREFACE) || METHODS.iter().any(|m| could_be(m)) {
        return None;
    }
    Some(Sniffed::Other)
}

/// Reads until the first bytes decide. `timeout`: how long to wait for the *first* byte
/// (`None`: forever, for a port declared HTTP). Returns what was read, to replay.
pub async fn sniff<S: AsyncRead + Unpin>(
    io: &mut S,
    timeout: Option<Duration>,
) -> io::Result<(Sniffed, Bytes)> {
    let mut buf = BytesMut::with_capacity(64);
    loop {
        if let Some(kind) = (!buf.is_empty()).then(|| classify(&buf)).flatten() {
            return Ok((kind, buf.freeze()));
        }
        let first = buf.is_empty();
        let read = io.read_buf(&mut buf);
        let n = match (timeout, first) {
            (Some(t), true) => match tokio::time::timeout(t, read).await {
                Ok(r) => r?,
                Err(_) => return Ok((Sniffed::Other, buf.freeze())),
            },
            _ => read.await?,
        };
        if n == 0 {
            return Ok((Sniffed::Other, buf.freeze()));
        }
    }
}

/// A stream that first yields `prefix`, then the stream's own bytes.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_on_as_few_bytes_as_it_can() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::Http2));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Sniffed::Other));
        assert_eq!(classify(b"GETX"), Some(Sniffed::Other));
        assert_eq!(classify(b"SSH-2.0"), Some(Sniffed::Other));
    }

    #[tokio::test]
    async fn silence_is_tcp_and_bytes_are_replayed() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let (kind, prefix) = sniff(&mut a, Some(Duration::from_millis(20)))
            .await
            .unwrap();
        assert_eq!((kind, prefix.len()), (Sniffed::Other, 0));
        tokio::io::AsyncWriteExt::write_all(&mut b, b"POST /x")
            .await
            .unwrap();
        let (kind, prefix) = sniff(&mut a, None).await.unwrap();
        assert_eq!(kind, Sniffed::Http1);
        let mut r = Rewind::new(prefix, a);
        drop(b);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"POST /x");
    }
}
