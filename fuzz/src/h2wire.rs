//! HTTP/2 as a hostile client writes it: frames (RFC 9113 §4.1) and HPACK header blocks
//! (RFC 7541) encoded by hand from fuzzer choices, including what a real client library refuses
//! to send (illegal frames, bad lengths, repeated dynamic-table references).

use libfuzzer_sys::arbitrary::{Result, Unstructured};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const PRIORITY: u8 = 2;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PUSH_PROMISE: u8 = 5;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

const NAMES: &[&str] = &[
    ":method",
    ":authority",
    ":scheme",
    ":path",
    ":protocol",
    ":status",
    "baggage",
    "forwarded",
    "traceparent",
    "content-length",
    "te",
    "connection",
    "host",
    "x-big",
];
const VALUES: &[&str] = &[
    "CONNECT",
    "GET",
    "POST",
    "127.0.0.1:8080",
    "10.0.0.1:8080",
    "[fd00::1]:8080",
    "[::ffff:127.0.0.1]:80",
    "payments.billing:9090",
    "127.0.0.1",
    ":80",
    "",
    "https",
    "/",
    "trailers",
    "0",
    "-1",
    "h2",
];

/// One frame: header then payload. The length field is the payload's real length unless
/// `length` overrides it (to lie).
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len().min(0xff_ffff) as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(&payload[..len as usize]);
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut v: u64) {
    let max = (1u64 << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 0, 7, s.len() as u64);
    out.extend_from_slice(s);
}

fn name_or_value(u: &mut Unstructured<'_>, pool: &[&str]) -> Result<Vec<u8>> {
    Ok(match u.int_in_range(0..=7)? {
        0 => u.arbitrary::<&[u8]>()?.to_vec(),
        // Large values, cheap in input bytes: what header-size limits are for.
        1 => vec![b'a'; usize::from(u.arbitrary::<u16>()?)],
        _ => u.choose(pool)?.as_bytes().to_vec(),
    })
}

/// An HPACK header block: literals (indexed into the dynamic table or not), references to
/// static and dynamic entries (sometimes many times over), and table size updates.
pub fn header_block(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if u.ratio(3, 4)? {
        // Most blocks are a plausible CONNECT, so the request path beyond validation is reached.
        for (name, value) in [(":method", "CONNECT"), (":authority", "127.0.0.1:8080")] {
            out.push(0x00);
            string(&mut out, name.as_bytes());
            let value = if name == ":authority" && u.arbitrary()? {
                name_or_value(u, VALUES)?
            } else {
                value.as_bytes().to_vec()
            };
            string(&mut out, &value);
        }
    }
    for _ in 0..u.int_in_range(0..=6)? {
        match u.int_in_range(0..=9)? {
            0..=3 => {
                out.push(0x00);
                string(&mut out, &name_or_value(u, NAMES)?);
                string(&mut out, &name_or_value(u, VALUES)?);
            }
            4 | 5 => {
                out.push(0x40);
                string(&mut out, &name_or_value(u, NAMES)?);
                string(&mut out, &name_or_value(u, VALUES)?);
            }
            6 => integer(&mut out, 0x80, 7, u.int_in_range(0..=70)?),
            7 => {
                // The newest dynamic entry, repeated: tiny on the wire, large once decoded.
                for _ in 0..u.int_in_range(1..=400)? {
                    integer(&mut out, 0x80, 7, 62);
                }
            }
            8 => integer(&mut out, 0x20, 5, u.int_in_range(0..=70_000)?),
            _ => out.extend_from_slice(u.arbitrary::<&[u8]>()?),
        }
    }
    Ok(out)
}

/// Client stream ids: mostly the next few odd ones, sometimes anything.
fn stream_id(u: &mut Unstructured<'_>) -> Result<u32> {
    Ok(match u.int_in_range(0..=7)? {
        0 => u.arbitrary()?,
        1 => 0,
        _ => 2 * u.int_in_range(0..=8)? + 1,
    })
}

/// The bytes a client writes on a fresh HBONE connection after TLS: usually the preface and
/// SETTINGS, then a sequence of frames of every kind. Returns the chunks to write (with a
/// flush after each, so the server sees them in separate reads).
pub fn client_bytes(u: &mut Unstructured<'_>) -> Result<Vec<Vec<u8>>> {
    let mut chunks = Vec::new();
    let mut first = Vec::new();
    if u.ratio(15, 16)? {
        first.extend_from_slice(PREFACE);
        frame(&mut first, SETTINGS, 0, 0, &[]);
    } else {
        first.extend_from_slice(u.arbitrary::<&[u8]>()?);
    }
    chunks.push(first);
    for _ in 0..u.int_in_range(0..=24)? {
        let mut out = Vec::new();
        let stream = stream_id(u)?;
        match u.int_in_range(0..=13)? {
            0..=3 => {
                let mut flags = if u.ratio(7, 8)? { END_HEADERS } else { 0 };
                if u.ratio(1, 4)? {
                    flags |= END_STREAM;
                }
                frame(&mut out, HEADERS, flags, stream, &header_block(u)?);
            }
            4 => {
                let flags = if u.arbitrary()? { END_HEADERS } else { 0 };
                frame(&mut out, CONTINUATION, flags, stream, &header_block(u)?);
            }
            5 | 6 => {
                let flags = if u.ratio(1, 3)? { END_STREAM } else { 0 };
                let payload = match u.int_in_range(0..=3)? {
                    0 => vec![0u8; usize::from(u.arbitrary::<u16>()?)],
                    _ => u.arbitrary::<&[u8]>()?.to_vec(),
                };
                frame(&mut out, DATA, flags, stream, &payload);
            }
            7 => {
                let code: u32 = u.int_in_range(0..=13)?;
                frame(&mut out, RST_STREAM, 0, stream, &code.to_be_bytes());
            }
            8 => {
                let mut payload = Vec::new();
                for _ in 0..u.int_in_range(0..=4)? {
                    let id: u16 = u.int_in_range(0..=8)?;
                    let value: u32 = match u.int_in_range(0..=2)? {
                        0 => u.arbitrary()?,
                        1 => 0,
                        _ => u.int_in_range(0..=1 << 24)?,
                    };
                    payload.extend_from_slice(&id.to_be_bytes());
                    payload.extend_from_slice(&value.to_be_bytes());
                }
                let ack = if u.ratio(1, 8)? { 1 } else { 0 };
                frame(&mut out, SETTINGS, ack, 0, &payload);
            }
            9 => {
                let increment: u32 = match u.int_in_range(0..=2)? {
                    0 => u.arbitrary()?,
                    1 => 0,
                    _ => 0x7fff_ffff,
                };
                frame(&mut out, WINDOW_UPDATE, 0, stream, &increment.to_be_bytes());
            }
            10 => {
                let data: [u8; 8] = u.arbitrary()?;
                let ack = if u.ratio(1, 4)? { 1 } else { 0 };
                frame(&mut out, PING, ack, 0, &data);
            }
            11 => {
                let mut payload = stream_id(u)?.to_be_bytes().to_vec();
                payload.extend_from_slice(&u.int_in_range(0u32..=13)?.to_be_bytes());
                frame(&mut out, GOAWAY, 0, 0, &payload);
            }
            12 => {
                let mut payload = stream_id(u)?.to_be_bytes().to_vec();
                payload.push(u.arbitrary()?);
                let kind = if u.arbitrary()? {
                    PRIORITY
                } else {
                    PUSH_PROMISE
                };
                frame(&mut out, kind, 0, stream, &payload);
            }
            _ => {
                // Anything at all, unknown frame types included.
                let kind: u8 = u.arbitrary()?;
                let flags: u8 = u.arbitrary()?;
                frame(&mut out, kind, flags, stream, u.arbitrary::<&[u8]>()?);
            }
        }
        chunks.push(out);
    }
    Ok(chunks)
}
