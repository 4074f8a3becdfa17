//! gRPC message framing over HTTP/2 (the 5-byte length prefix) and the status/trailer values
//! the echo server sends, kept pure so the hand-written server and its tests share them.
//! Compression is not supported: a compressed message is an error the server reports as
//! INTERNAL, which is what a client that ignores `grpc-accept-encoding` deserves.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest message accepted (gRPC's default receive limit).
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("compressed gRPC message received, but mesh-echo negotiates no compression")]
    Compressed,
    #[error("gRPC message of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("gRPC stream ended inside a message ({0} bytes left over)")]
    Truncated(usize),
}

/// One message with its length prefix (uncompressed).
pub fn encode_message(msg: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + msg.len());
    buf.put_u8(0);
    // MAX_MESSAGE and prost's own limits keep lengths far below u32::MAX.
    buf.put_u32(u32::try_from(msg.len()).unwrap_or(u32::MAX));
    buf.put_slice(msg);
    buf.freeze()
}

/// Accumulates body bytes and yields whole messages.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if the buffer holds one.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(FrameError::Compressed);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// At end of stream: an error if a partial message is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(FrameError::Truncated(n)),
        }
    }
}

/// `grpc-message` encoding: percent-encode everything outside printable ASCII, and `%`.
pub fn percent_encode_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_across_split_pushes() {
        let a = encode_message(b"hello");
        let b = encode_message(b"");
        let mut all = a.to_vec();
        all.extend_from_slice(&b);
        let mut d = Decoder::default();
        d.push(&all[..3]);
        assert_eq!(d.next_message(), Ok(None));
        d.push(&all[3..]);
        assert_eq!(d.next_message().unwrap().as_deref(), Some(&b"hello"[..]));
        assert_eq!(d.next_message().unwrap().as_deref(), Some(&b""[..]));
        assert_eq!(d.next_message(), Ok(None));
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn rejects_compressed_and_truncated() {
        let mut d = Decoder::default();
        d.push(&[1, 0, 0, 0, 0]);
        assert_eq!(d.next_message(), Err(FrameError::Compressed));
        let mut d = Decoder::default();
        d.push(&[0, 0, 0, 0, 9, 1]);
        assert_eq!(d.next_message(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated(6)));
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode_message("a b%é"), "a b%25%C3%A9");
    }
}
