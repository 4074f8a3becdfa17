//! The line protocol spoken between `echo who`/`echo bench-*` and `echo serve`:
//! request-line parsing, bounded line reading, the JSON reply types and peer
//! address normalisation.
//!
//! Protocol summary (first line of each connection selects the mode):
//! - `WHO <message>\n` (repeatable): one [`WhoReply`] JSON line per request.
//! - `ECHO\n`: every following byte is echoed back.
//! - `SINK\n`: everything is discarded; on EOF one [`SinkReply`] line is sent.
//! - anything else: one [`ErrorReply`] line, then the server closes.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Longest request/reply line (including the newline) either side will buffer.
pub const MAX_LINE: usize = 64 * 1024;

/// Reply to one `WHO` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoReply {
    /// Server name (`--name`, else `$POD_NAME`, else hostname).
    pub served_by: String,
    /// Local port the connection arrived on.
    pub port: u16,
    /// Client address as the server sees it (`ip:port`, v4-mapped shown as v4).
    pub peer: String,
    /// Server-side local address of the connection (`ip:port`).
    pub local: String,
    /// The message from the request line, verbatim.
    pub message: String,
}

/// First line printed by `echo who`: the client socket's own view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// getsockname of the client socket.
    pub client_local: String,
    /// getpeername of the client socket.
    pub client_peer: String,
}

/// Reply sent in `SINK` mode once the client has shut down its write side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkReply {
    /// Bytes received after the `SINK\n` line.
    pub received: u64,
}

/// Reply to an unparseable request; the server closes afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Who(String),
    Echo,
    Sink,
}

/// Why a request line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("request line is not valid UTF-8")]
    NotUtf8,
    #[error("unknown request {0:?}; expected `WHO <message>`, `ECHO` or `SINK`")]
    Unknown(String),
    #[error("request line longer than {MAX_LINE} bytes")]
    TooLong,
}

/// Parses one request line. A trailing `\n` (and `\r` before it) is optional so
/// that a final unterminated line before EOF is still understood.
pub fn parse_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| ProtocolError::NotUtf8)?;
    match text {
        "ECHO" => Ok(Request::Echo),
        "SINK" => Ok(Request::Sink),
        "WHO" => Ok(Request::Who(String::new())),
        _ => match text.strip_prefix("WHO ") {
            Some(message) => Ok(Request::Who(message.to_owned())),
            None => Err(ProtocolError::Unknown(truncate(text, 64).to_owned())),
        },
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Maps v4-mapped IPv6 addresses (`[::ffff:1.2.3.4]:p`, as seen on a dual-stack
/// socket) to plain IPv4 (`1.2.3.4:p`); other addresses are returned unchanged.
pub fn normalize_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Outcome of [`read_line_limited`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRead {
    /// EOF before any byte was read.
    Eof,
    /// A line was read into the buffer; it ends with `\n` unless EOF came first.
    Line,
    /// More than `max` bytes arrived without a newline; the buffer is partial.
    TooLong,
}

/// Reads one line into `buf` (cleared first), never buffering more than
/// `max + 1` bytes, so a peer cannot make us allocate without bound.
pub async fn read_line_limited<R>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead>
where
    R: AsyncBufRead + Unpin + ?Sized,
{
    buf.clear();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let n = (&mut *reader).take(limit).read_until(b'\n', buf).await?;
    if n == 0 {
        Ok(LineRead::Eof)
    } else if buf.last() != Some(&b'\n') && buf.len() > max {
        Ok(LineRead::TooLong)
    } else {
        Ok(LineRead::Line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_request(b"WHO hi there\n"),
            Ok(Request::Who("hi there".into()))
        );
        assert_eq!(parse_request(b"WHO\r\n"), Ok(Request::Who(String::new())));
        assert_eq!(parse_request(b"WHO x"), Ok(Request::Who("x".into())));
        assert_eq!(parse_request(b"ECHO\n"), Ok(Request::Echo));
        assert_eq!(parse_request(b"SINK\r\n"), Ok(Request::Sink));
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\n"),
            Err(ProtocolError::Unknown(_))
        ));
        assert!(matches!(
            parse_request(b"WHOx\n"),
            Err(ProtocolError::Unknown(_))
        ));
        assert_eq!(parse_request(b"\xff\n"), Err(ProtocolError::NotUtf8));
    }

    #[test]
    fn unknown_request_is_truncated_on_char_boundary() {
        let long = "é".repeat(100);
        let Err(ProtocolError::Unknown(shown)) = parse_request(long.as_bytes()) else {
            panic!("expected Unknown");
        };
        assert!(shown.len() <= 64);
    }

    #[test]
    fn normalizes_v4_mapped() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:4000".parse().unwrap();
        assert_eq!(normalize_addr(mapped).to_string(), "10.1.2.3:4000");
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 1);
        assert_eq!(normalize_addr(v6), v6);
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
        assert_eq!(normalize_addr(v4), v4);
    }

    #[tokio::test]
    async fn bounded_line_reading() {
        let mut buf = Vec::new();
        let mut r: &[u8] = b"abc\ndef";
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 16).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"abc\n");
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 16).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"def");
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 16).await.unwrap(),
            LineRead::Eof
        );
        let mut r: &[u8] = b"0123456789\n";
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 4).await.unwrap(),
            LineRead::TooLong
        );
        let mut r: &[u8] = b"0123\n";
        assert_eq!(
            read_line_limited(&mut r, &mut buf, 4).await.unwrap(),
            LineRead::Line
        );
    }

    #[test]
    fn who_reply_round_trips() {
        let json = r#"{"served_by":"pod-a","port":8080,"peer":"10.0.0.1:5555","local":"10.0.0.2:8080","message":"m"}"#;
        let reply: WhoReply = serde_json::from_str(json).unwrap();
        assert_eq!(reply.port, 8080);
        assert_eq!(serde_json::to_string(&reply).unwrap(), json);
    }
}
