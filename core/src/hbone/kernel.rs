//! HBONE over kernel TLS: rustls makes the handshake, the kernel seals and opens the records.
//!
//! Owns: the handshake in rustls' unbuffered API (reading whole records only, so no byte of the
//! connection after the handshake is taken from the kernel), the hand-over of the traffic keys
//! to the socket, and [`KernelStream`], the plaintext byte stream h2 reads and writes after it:
//! control records (alerts, KeyUpdate, session tickets) come out of the kernel one by one with
//! their type and are handled here; key updates each way (the peer's, and ours before the
//! suite's confidentiality limit) go through rustls' `KernelConnection`, which derives the next
//! keys.
//!
//! Must not touch: policy, h2, the pool. Which connections come here is decided by the callers
//! ([`super::client`], [`super::server`]): only where [`crate::ktls::probe`] found both suites
//! and key updates, and only once the socket took the `tls` ULP (else the user-space path).

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, TlsGetRecordType, recv, recvmsg, setsockopt, sockopt,
};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Connections handed to the kernel since the process started (both ends).
static HANDED_OVER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many HBONE connections (client and server) this process has handed to kernel TLS.
pub fn handed_over() -> u64 {
    HANDED_OVER.load(std::sync::atomic::Ordering::Relaxed)
}

/// The most plaintext one record carries (RFC 8446 §5.1).
const RECORD_PLAINTEXT: usize = 1 << 14;
/// The largest TLS 1.3 record on the wire: 5-byte header, the plaintext, 256 bytes of
/// expansion (RFC 8446 §5.2).
const MAX_RECORD: usize = 5 + RECORD_PLAINTEXT + 256;
/// The most handshake bytes held before rustls has a whole message (certificate chains span
/// records).
const MAX_HANDSHAKE_BUFFER: usize = 64 * 1024;
/// The most post-handshake handshake bytes (session tickets) held while a message completes.
const MAX_CONTROL_BUFFER: usize = 16 * 1024;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;

fn tls_error(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("kernel TLS: {what}: {e}"),
    )
}

/// Attaches the kernel's `tls` upper-layer protocol to a connected socket. Until keys are set
/// it passes bytes through, so a refusal here leaves the socket as it was (the caller then uses
/// the user-space path).
pub(crate) fn attach(tcp: &TcpStream) -> io::Result<()> {
    setsockopt(tcp, sockopt::TcpUlp::default(), b"tls").map_err(io::Error::from)
}

/// The two ends' unbuffered connections, driven alike.
pub(crate) trait Handshake: Send {
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> Status<'c, 'i>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Keys), rustls::Error>;
    fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>>;
}

/// What [`Handshake::process`] says, with the end's type erased where the driver needs no more.
pub(crate) enum Status<'c, 'i> {
    Client(UnbufferedStatus<'c, 'i, ClientConnectionData>),
    Server(UnbufferedStatus<'c, 'i, ServerConnectionData>),
}

/// The key schedule after the handshake: derives the next keys on a KeyUpdate.
pub(crate) enum Keys {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Keys {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_tx_secret(),
            Keys::Server(k) => k.update_tx_secret(),
        }
    }

    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Keys::Client(k) => k.update_rx_secret(),
            Keys::Server(k) => k.update_rx_secret(),
        }
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Keys::Client(k) => k.negotiated_cipher_suite(),
            Keys::Server(k) => k.negotiated_cipher_suite(),
        };
        // HBONE is TLS 1.3 only (rustls: 2^24 records for AES-GCM); the same if it ever is not.
        suite
            .tls13()
            .map_or(1 << 24, |s| s.common.confidentiality_limit)
    }
}

impl Handshake for UnbufferedClientConnection {
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> Status<'c, 'i> {
        Status::Client(self.process_tls_records(incoming))
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Keys), rustls::Error> {
        let (secrets, keys) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Keys::Client(keys)))
    }
    fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        (**self).peer_certificates().map(<[_]>::to_vec)
    }
}

impl Handshake for UnbufferedServerConnection {
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> Status<'c, 'i> {
        Status::Server(self.process_tls_records(incoming))
    }
    fn into_kernel(self) -> Result<(ExtractedSecrets, Keys), rustls::Error> {
        let (secrets, keys) = self.dangerous_into_kernel_connection()?;
        Ok((secrets, Keys::Server(keys)))
    }
    fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        (**self).peer_certificates().map(<[_]>::to_vec)
    }
}

/// One step of the handshake driver, out of either end's state.
enum Step {
    /// Encoded handshake bytes to send (already appended to the outgoing buffer).
    Encoded,
    Transmit,
    NeedMore,
    /// Decrypted application data (the client's first frames can ride with its Finished).
    Data,
    Done,
}

macro_rules! step {
    ($status:expr, $out:expr, $plain:expr) => {{
        let UnbufferedStatus { discard, state } = $status;
        // rustls' own error stays inside, so `tls::describe_handshake_error` finds it.
        let step = match state.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
            ConnectionState::EncodeTlsData(mut enc) => {
                let mut chunk = vec![0; 4096];
                loop {
                    match enc.encode(&mut chunk) {
                        Ok(n) => {
                            $out.extend_from_slice(&chunk[..n]);
                            break;
                        }
                        Err(EncodeError::InsufficientSize(e)) => chunk.resize(e.required_size, 0),
                        Err(e) => return Err(tls_error("encoding the handshake", e)),
                    }
                }
                Step::Encoded
            }
            ConnectionState::TransmitTlsData(t) => {
                t.done();
                Step::Transmit
            }
            ConnectionState::BlockedHandshake => Step::NeedMore,
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(record) = r.next_record() {
                    let record = record.map_err(|e| tls_error("reading", e))?;
                    $plain.extend_from_slice(record.payload);
                }
                Step::Data
            }
            ConnectionState::WriteTraffic(_) => Step::Done,
            ConnectionState::ReadEarlyData(_) => {
                return Err(tls_error("handshake", "early data (0-RTT) is not accepted"));
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "kernel TLS: the peer closed during the handshake",
                ));
            }
            _ => return Err(tls_error("handshake", "unexpected connection state")),
        };
        (discard, step)
    }};
}

/// Runs the handshake on `tcp` (which already has the `tls` ULP, see [`attach`]), hands the
/// record layer to the kernel and returns the stream h2 uses, with the peer's certificates.
pub(crate) async fn handshake<H: Handshake>(
    mut tcp: TcpStream,
    mut conn: H,
) -> io::Result<(KernelStream, Option<Vec<CertificateDer<'static>>>)> {
    // One record's room to start with (an unauthenticated peer pins no more than on the user
    // path); grown a record at a time, up to MAX_HANDSHAKE_BUFFER, for long chains.
    let mut incoming = vec![0u8; MAX_RECORD];
    let mut filled = 0;
    let mut outgoing = Vec::new();
    let mut plain = Vec::new();
    loop {
        let (discard, step) = match conn.process(&mut incoming[..filled]) {
            Status::Client(status) => step!(status, outgoing, plain),
            Status::Server(status) => step!(status, outgoing, plain),
        };
        incoming.copy_within(discard..filled, 0);
        filled -= discard;
        match step {
            Step::Encoded | Step::Data => {}
            Step::Transmit => {
                tcp.write_all(&outgoing).await?;
                outgoing.clear();
            }
            Step::NeedMore => read_whole_records(&tcp, &mut incoming, &mut filled).await?,
            Step::Done if filled == 0 => break,
            // Whole records already read past the handshake: process them (they become
            // `plain`) before the kernel takes over; a `Done` that consumed nothing of them
            // would loop forever, and cannot happen with whole records.
            Step::Done if discard > 0 => {}
            Step::Done => {
                return Err(tls_error(
                    "hand-over",
                    "a partial record was read past the handshake",
                ));
            }
        }
    }
    let peer = conn.peer_certificates();
    let (secrets, keys) = conn.into_kernel().map_err(|e| tls_error("hand-over", e))?;
    set_key(&tcp, Direction::Tx, secrets.tx)?;
    set_key(&tcp, Direction::Rx, secrets.rx)?;
    let limit = keys.confidentiality_limit();
    HANDED_OVER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok((
        KernelStream {
            tcp,
            keys,
            plain: plain.into(),
            control: Vec::new(),
            read_closed: false,
            write_closed: false,
            key_update_owed: false,
            records_sent: 0,
            rekey_at: limit / 2,
        },
        peer,
    ))
}

/// Reads from `tcp` into `buf[filled..]` only whole TLS records (at least one): peeks, then
/// takes up to the end of the last complete record seen. Waits for more when not even one is
/// complete. The bytes after them stay in the kernel, for its TLS receive path.
async fn read_whole_records(
    tcp: &TcpStream,
    buf: &mut Vec<u8>,
    filled: &mut usize,
) -> io::Result<()> {
    loop {
        if buf.len() - *filled < MAX_RECORD {
            if buf.len() >= MAX_HANDSHAKE_BUFFER {
                return Err(tls_error("handshake", "handshake messages too large"));
            }
            buf.resize(buf.len() + MAX_RECORD, 0);
        }
        tcp.readable().await?;
        let fd = tcp.as_raw_fd();
        let room = &mut buf[*filled..];
        let taken = tcp.try_io(Interest::READABLE, || {
            let seen = recv(fd, room, MsgFlags::MSG_PEEK).map_err(io::Error::from)?;
            if seen == 0 {
                return Ok(0);
            }
            let whole = whole_records(&room[..seen])?;
            if whole == 0 {
                // Not one complete record yet: wait for the next arrival.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            recv(fd, &mut room[..whole], MsgFlags::empty()).map_err(io::Error::from)
        });
        match taken {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "kernel TLS: the peer closed during the handshake",
                ));
            }
            Ok(n) => {
                *filled += n;
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The length of the complete records at the start of `bytes`.
fn whole_records(bytes: &[u8]) -> io::Result<usize> {
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 5) {
        // Content type (change_cipher_spec, alert, handshake, application data) and version
        // 3.x, as rustls checks them before it waits for a body: a peer that is not speaking
        // TLS fails at once, not after the handshake timeout.
        if !(20..=23).contains(&header[0]) || header[1] != 3 {
            return Err(tls_error("handshake", "the peer is not speaking TLS"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if 5 + len > MAX_RECORD {
            return Err(tls_error("handshake", "the peer sent an oversized record"));
        }
        if at + 5 + len > bytes.len() {
            break;
        }
        at += 5 + len;
    }
    Ok(at)
}

#[derive(Clone, Copy)]
enum Direction {
    Tx,
    Rx,
}

/// Gives the socket the key for one direction (TLS 1.3; the record sequence number is where
/// rustls left off, or 0 after a key update).
fn set_key(
    tcp: &TcpStream,
    direction: Direction,
    (seq, secrets): (u64, ConnectionTrafficSecrets),
) -> io::Result<()> {
    use crate::ktls::Suite;
    let (suite, key, iv) = match &secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
        _ => return Err(tls_error("key", "a suite HBONE does not negotiate")),
    };
    let info = crate::ktls::crypto_info(suite, key.as_ref(), iv.as_ref(), seq)
        .map_err(|e| tls_error("key", e))?;
    let set = match direction {
        Direction::Tx => setsockopt(tcp, sockopt::TcpTlsTx, &info),
        Direction::Rx => setsockopt(tcp, sockopt::TcpTlsRx, &info),
    };
    set.map_err(|e| tls_error("the kernel refused a key", e))
}

/// A connection whose records the kernel seals and opens; reads and writes are plaintext.
pub struct KernelStream {
    tcp: TcpStream,
    keys: Keys,
    /// Application data rustls decrypted during the handshake, handed out first.
    plain: bytes::Bytes,
    /// Post-handshake handshake bytes until a message is whole.
    control: Vec<u8>,
    read_closed: bool,
    write_closed: bool,
    /// A KeyUpdate we owe the peer (asked for, or our key is worn): sent before any more data,
    /// then our sending key changes.
    key_update_owed: bool,
    /// Records sent under the current key (an upper bound: ⌈write / 16 KiB⌉ per write).
    records_sent: u64,
    rekey_at: u64,
}

impl KernelStream {
    /// Handles one non-data record the kernel handed up.
    fn control_record(&mut self, kind: TlsGetRecordType, bytes: &[u8]) -> io::Result<()> {
        match kind {
            TlsGetRecordType::Alert => match bytes {
                [_, 0] => {
                    self.read_closed = true;
                    Ok(())
                }
                [level, description] => Err(tls_error(
                    "the peer sent an alert",
                    format!("level {level}, description {description}"),
                )),
                _ => Err(tls_error("the peer sent an alert", "malformed")),
            },
            TlsGetRecordType::Handshake => {
                self.control.extend_from_slice(bytes);
                if self.control.len() > MAX_CONTROL_BUFFER {
                    return Err(tls_error("post-handshake message", "too large"));
                }
                while let [kind, a, b, c, ..] = self.control[..] {
                    let len = u32::from_be_bytes([0, a, b, c]) as usize;
                    if self.control.len() < 4 + len {
                        break;
                    }
                    let message: Vec<u8> = self.control.drain(..4 + len).collect();
                    self.handshake_message(kind, &message[4..])?;
                }
                Ok(())
            }
            other => Err(tls_error(
                "the peer sent a record of an unexpected type",
                format!("{other:?}"),
            )),
        }
    }

    fn handshake_message(&mut self, kind: u8, body: &[u8]) -> io::Result<()> {
        match (kind, body) {
            // Resumption is off at both ends of HBONE; a peer's tickets are dropped.
            (HANDSHAKE_NEW_SESSION_TICKET, _) if matches!(self.keys, Keys::Client(_)) => Ok(()),
            (HANDSHAKE_KEY_UPDATE, [request]) if *request <= 1 => {
                let next = self
                    .keys
                    .next_rx()
                    .map_err(|e| tls_error("key update", e))?;
                // The next record is under the new key: nothing may follow in this one
                // (RFC 8446 §5.1, handshake messages must not span a key change).
                if !self.control.is_empty() {
                    return Err(tls_error("key update", "more handshake data in its record"));
                }
                set_key(&self.tcp, Direction::Rx, next)?;
                if *request == 1 {
                    self.key_update_owed = true;
                }
                Ok(())
            }
            (kind, _) => Err(tls_error(
                "the peer sent an unexpected handshake message",
                format!("type {kind}"),
            )),
        }
    }

    /// Sends what this end owes before more data: a KeyUpdate, then switches its sending key.
    fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.key_update_owed {
            return Poll::Ready(Ok(()));
        }
        // KeyUpdate, update_not_requested: whether it answers the peer or rotates our worn
        // key, the peer need not answer it.
        let message = [HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0];
        ready!(self.poll_send_record(cx, CONTENT_HANDSHAKE, &message))?;
        let next = self
            .keys
            .next_tx()
            .map_err(|e| tls_error("key update", e))?;
        set_key(&self.tcp, Direction::Tx, next)?;
        self.key_update_owed = false;
        self.records_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Sends one non-data record whole (see [`crate::ktls::send_record`]), waiting for room.
    fn poll_send_record(
        &mut self,
        cx: &mut Context<'_>,
        content_type: u8,
        payload: &[u8],
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let fd = self.tcp.as_raw_fd();
            match self.tcp.try_io(Interest::WRITABLE, || {
                crate::ktls::send_record(fd, content_type, payload)
            }) {
                Ok(n) if n == payload.len() => return Poll::Ready(Ok(())),
                Ok(_) => return Poll::Ready(Err(tls_error("a control record", "sent in part"))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Counts a write's records against the key's limit (at least one; one per 16 KiB) and
    /// owes a key update once half the limit is used.
    fn count_written(&mut self, n: usize) {
        self.records_sent += (n.div_ceil(RECORD_PLAINTEXT) as u64).max(1);
        if self.records_sent >= self.rekey_at {
            self.key_update_owed = true;
        }
    }
}

/// One `recvmsg` on a kTLS socket: bytes of one record, and the record's type.
fn recv_record(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, TlsGetRecordType)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(u8);
    let msg =
        recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty()).map_err(io::Error::from)?;
    let kind = msg
        .cmsgs()
        .map_err(io::Error::from)?
        .find_map(|c| match c {
            ControlMessageOwned::TlsGetRecordType(t) => Some(t),
            _ => None,
        })
        .unwrap_or(TlsGetRecordType::ApplicationData);
    Ok((msg.bytes, kind))
}

impl AsyncRead for KernelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.plain.is_empty() {
            let n = this.plain.len().min(out.remaining());
            out.put_slice(&this.plain.split_to(n));
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.read_closed || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            ready!(this.tcp.poll_read_ready(cx))?;
            let fd = this.tcp.as_raw_fd();
            // The kernel hands out a record in pieces when the buffer is short, and a control
            // record must be judged whole (half an alert is not a malformed one), so a read
            // with less room than a record goes through a record-sized buffer, its data kept
            // in `plain`. (h2 reads through `ReadAhead`, whose reads are never that small.)
            let small = out.remaining() < RECORD_PLAINTEXT;
            let mut scratch = if small {
                vec![0; RECORD_PLAINTEXT]
            } else {
                Vec::new()
            };
            let buf: &mut [u8] = if small {
                &mut scratch
            } else {
                out.initialize_unfilled()
            };
            match this.tcp.try_io(Interest::READABLE, || recv_record(fd, buf)) {
                Ok((0, _)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "kernel TLS: the peer closed the connection without close_notify",
                    )));
                }
                Ok((n, TlsGetRecordType::ApplicationData)) if small => {
                    scratch.truncate(n);
                    this.plain = scratch.into();
                    let n = this.plain.len().min(out.remaining());
                    out.put_slice(&this.plain.split_to(n));
                    return Poll::Ready(Ok(()));
                }
                Ok((n, TlsGetRecordType::ApplicationData)) => {
                    out.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok((n, kind)) => this.control_record(kind, &buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for KernelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_owed(cx))?;
        let n = ready!(Pin::new(&mut this.tcp).poll_write(cx, buf))?;
        this.count_written(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_owed(cx))?;
        let n = ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs))?;
        this.count_written(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_owed(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.write_closed {
            ready!(this.poll_owed(cx))?;
            // close_notify (warning level, description 0), then the TCP FIN.
            ready!(this.poll_send_record(cx, CONTENT_ALERT, &[1, 0]))?;
            this.write_closed = true;
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "kernel_tests.rs"]
mod tests;
