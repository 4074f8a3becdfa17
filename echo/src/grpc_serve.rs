//! The gRPC echo service (`mesh.echo.v1.Echo`, echo/proto/echo.proto), written directly on
//! hyper rather than tonic's server so that every call can end with exactly the status and
//! trailers its request asks for — including custom trailers after an OK unary reply, which
//! tonic's server cannot send. Served on every HTTP port for `content-type: application/grpc`.
//!
//! Owns gRPC call handling; the framing rules live in `echo::grpc_frame`.

use std::convert::Infallible;

use bytes::Bytes;
use echo::grpc_frame::{Decoder, encode_message, percent_encode_message};
use echo::pb::{EchoReply, EchoRequest, Header};
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use crate::http_serve::{Body, Identity};

const SERVICE_PREFIX: &str = "/mesh.echo.v1.Echo/";
/// Upper bound on ServerStream's `count`, so one request cannot ask for an endless stream.
const MAX_STREAM_REPLIES: u32 = 100_000;

// gRPC status codes used here (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
const INVALID_ARGUMENT: i32 = 3;
const UNIMPLEMENTED: i32 = 12;
const INTERNAL: i32 = 13;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary,
    ServerStream,
    ClientStream,
    Bidi,
}

type FrameTx = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// How a call ends: the trailers frame.
struct Ending {
    code: i32,
    message: String,
    trailers: Vec<Header>,
}

impl Ending {
    fn error(code: i32, message: impl Into<String>) -> Self {
        Ending {
            code,
            message: message.into(),
            trailers: Vec::new(),
        }
    }
}

pub fn handle(req: Request<Incoming>, id: &Identity) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let kind = match path.strip_prefix(SERVICE_PREFIX) {
        Some("Unary") => Kind::Unary,
        Some("ServerStream") => Kind::ServerStream,
        Some("ClientStream") => Kind::ClientStream,
        Some("Bidi") => Kind::Bidi,
        _ => {
            let msg = format!(
                "mesh-echo serves only {SERVICE_PREFIX}{{Unary,ServerStream,ClientStream,Bidi}}, not {path}"
            );
            return trailers_only(&Ending::error(UNIMPLEMENTED, msg));
        }
    };
    let (parts, body) = req.into_parts();
    let authority = match parts.uri.authority() {
        Some(a) => a.to_string(),
        None => parts
            .headers
            .get(HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .unwrap_or_default(),
    };
    let metadata = parts
        .headers
        .iter()
        .map(|(k, v)| Header {
            key: k.as_str().to_owned(),
            value: String::from_utf8_lossy(v.as_bytes()).into_owned(),
        })
        .collect();
    let base = EchoReply {
        pod: id.pod.clone(),
        namespace: id.namespace.clone(),
        metadata,
        authority,
        method: path,
        ..EchoReply::default()
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let ending = run_call(kind, body, base, &tx).await;
        // The client may be gone already; nothing to tell then.
        let _ = tx.send(Ok(Frame::trailers(trailer_map(&ending)))).await;
    });
    let mut resp = Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

/// Reads the call's requests, sends its replies, and says how the call ends.
async fn run_call(kind: Kind, mut body: Incoming, base: EchoReply, tx: &FrameTx) -> Ending {
    let mut decoder = Decoder::default();
    let mut last: Option<EchoRequest> = None;
    let mut received = 0u32;
    let mut index = 0u32;
    loop {
        let req = match next_request(&mut body, &mut decoder).await {
            Ok(Some(req)) => req,
            Ok(None) => break,
            Err(ending) => return ending,
        };
        received += 1;
        if matches!(kind, Kind::Unary | Kind::ServerStream) && received > 1 {
            return Ending::error(
                UNIMPLEMENTED,
                "more than one request message on a unary-request method",
            );
        }
        if kind == Kind::Bidi {
            // Reply as each request arrives, so a client can wait for it before sending on.
            if !send_reply(tx, &base, &req.message, index, received).await {
                return Ending::error(INTERNAL, "client went away");
            }
            index += 1;
        }
        last = Some(req);
    }
    let last = match (kind, last) {
        (Kind::Unary | Kind::ServerStream, None) => {
            return Ending::error(INTERNAL, "missing request message");
        }
        (_, last) => last.unwrap_or_default(),
    };
    let replies = match kind {
        Kind::Unary | Kind::ClientStream => 1,
        Kind::ServerStream => last.count.clamp(1, MAX_STREAM_REPLIES),
        Kind::Bidi => 0,
    };
    for i in 0..replies {
        if !send_reply(tx, &base, &last.message, i, received).await {
            return Ending::error(INTERNAL, "client went away");
        }
    }
    Ending {
        code: last.status_code,
        message: last.status_message,
        trailers: last.trailers,
    }
}

async fn next_request(
    body: &mut Incoming,
    decoder: &mut Decoder,
) -> Result<Option<EchoRequest>, Ending> {
    loop {
        match decoder.next_message() {
            Ok(Some(msg)) => {
                return EchoRequest::decode(msg)
                    .map(Some)
                    .map_err(|e| Ending::error(INTERNAL, format!("decoding EchoRequest: {e}")));
            }
            Ok(None) => {}
            Err(e) => return Err(Ending::error(INTERNAL, e.to_string())),
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    decoder.push(data);
                }
            }
            Some(Err(e)) => return Err(Ending::error(INTERNAL, format!("reading request: {e}"))),
            None => {
                return decoder
                    .finish()
                    .map(|()| None)
                    .map_err(|e| Ending::error(INTERNAL, e.to_string()));
            }
        }
    }
}

async fn send_reply(
    tx: &FrameTx,
    base: &EchoReply,
    message: &str,
    index: u32,
    received: u32,
) -> bool {
    let reply = EchoReply {
        message: message.to_owned(),
        index,
        received,
        ..base.clone()
    };
    let frame = Frame::data(encode_message(&reply.encode_to_vec()));
    tx.send(Ok(frame)).await.is_ok()
}

/// grpc-status, grpc-message and the requested trailers. A requested trailer that is not a
/// valid header, or that would overwrite gRPC's own (`grpc-*`), turns the call INVALID_ARGUMENT.
fn trailer_map(ending: &Ending) -> HeaderMap {
    let mut map = HeaderMap::new();
    let mut code = ending.code;
    let mut message = ending.message.clone();
    for t in &ending.trailers {
        let name = HeaderName::from_bytes(t.key.as_bytes());
        let value = HeaderValue::from_str(&t.value);
        match (name, value) {
            (Ok(name), Ok(value)) if !name.as_str().starts_with("grpc-") => {
                map.append(name, value);
            }
            _ => {
                code = INVALID_ARGUMENT;
                message = format!(
                    "requested trailer {:?}: {:?} is not a valid custom trailer",
                    t.key, t.value
                );
                debug!(%message, "refusing trailer");
            }
        }
    }
    map.insert("grpc-status", HeaderValue::from(code));
    if !message.is_empty()
        && let Ok(v) = HeaderValue::from_str(&percent_encode_message(&message))
    {
        map.insert("grpc-message", v);
    }
    map
}

/// A call that fails before any reply: status in the response headers, no body.
fn trailers_only(ending: &Ending) -> Response<Body> {
    let mut resp = Response::new(crate::http_serve::full(Bytes::new()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.extend(trailer_map(ending));
    resp
}
