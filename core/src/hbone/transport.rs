//! The byte stream under an HBONE connection's HTTP/2: TLS in user space (rustls) or in the
//! kernel ([`super::kernel`]). Owns only the choice between the two for h2's reads and writes;
//! each side's buffering and records are its own.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::kernel::KernelStream;
use super::{ReadAhead, Wire};

/// What h2 reads and writes: TLS records sealed by rustls in user space, or by the kernel
/// ([`super::kernel`], where the settings allow it and the socket took the `tls` ULP).
pub(crate) enum Transport {
    User(Box<tokio_rustls::TlsStream<Wire>>),
    Kernel(Box<ReadAhead<KernelStream>>),
}

impl Transport {
    /// Which of the two this connection uses, as the config dump and logs name it.
    pub(crate) fn path(&self) -> &'static str {
        match self {
            Transport::User(_) => "userspace",
            Transport::Kernel(_) => "kernel",
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::User(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Transport::Kernel(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::User(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Transport::Kernel(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::User(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Transport::Kernel(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::User(s) => s.is_write_vectored(),
            Transport::Kernel(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::User(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Transport::Kernel(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::User(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Transport::Kernel(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
