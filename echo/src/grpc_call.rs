//! `mesh-echo grpc-call`: a real gRPC client (tonic) for the echo service. Prints one JSON line
//! per reply, then one status line per call with grpc-status, grpc-message and the trailers as
//! received, so tests can check that a proxy carried streams, status and trailers intact.
//! Exits 0 only if every call ended with the status it asked for (`--status`, default OK).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use echo::parse_duration;
use echo::pb::{EchoReply, EchoRequest, Header};
use http::uri::PathAndQuery;
use serde_json::json;
use tonic::metadata::{KeyAndValueRef, MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::client::emit_json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    Unary,
    ServerStream,
    ClientStream,
    Bidi,
}

#[derive(Debug, clap::Args)]
pub struct GrpcCallArgs {
    /// Server address, HOST:PORT (plaintext HTTP/2).
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: String,
    #[arg(long, value_enum)]
    pub method: Method,
    /// unary: calls made one after another on one connection; server-stream: replies asked
    /// for; client-stream and bidi: request messages sent.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Message carried in each request and echoed in each reply.
    #[arg(long, default_value = "hello")]
    pub message: String,
    /// gRPC status code the server is asked to end each call with (0 = OK).
    #[arg(long, default_value_t = 0)]
    pub status: i32,
    /// grpc-message the server is asked to send with --status.
    #[arg(long, default_value = "")]
    pub status_message: String,
    /// Trailer the server is asked to send, KEY=VALUE; repeatable.
    #[arg(long = "trailer", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub trailers: Vec<(String, String)>,
    /// Request metadata, KEY=VALUE; repeatable.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub metadata: Vec<(String, String)>,
    /// :authority to send instead of --addr (e.g. a route's hostname).
    #[arg(long)]
    pub authority: Option<String>,
    /// Limit for connecting and for each call (e.g. 500ms, 5s, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub async fn run(args: GrpcCallArgs) -> anyhow::Result<()> {
    let mut endpoint = Endpoint::from_shared(format!("http://{}", args.addr))
        .with_context(|| format!("--addr {:?} is not HOST:PORT", args.addr))?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    if let Some(authority) = &args.authority {
        let uri = format!("http://{authority}")
            .parse()
            .with_context(|| format!("--authority {authority:?} is not a valid authority"))?;
        endpoint = endpoint.origin(uri);
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let request = EchoRequest {
        message: args.message.clone(),
        count: if args.method == Method::ServerStream {
            args.count
        } else {
            0
        },
        status_code: args.status,
        status_message: args.status_message.clone(),
        trailers: args
            .trailers
            .iter()
            .map(|(key, value)| Header {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
    };
    let (calls, messages) = match args.method {
        Method::Unary => (args.count, 1),
        Method::ServerStream => (1, 1),
        Method::ClientStream | Method::Bidi => (1, args.count),
    };
    let mut mismatched = 0;
    for _ in 0..calls {
        let code = call(&channel, &args, &request, messages).await?;
        if code != args.status {
            mismatched += 1;
        }
    }
    if mismatched > 0 {
        bail!(
            "{mismatched} of {calls} call(s) did not end with status {}",
            args.status
        );
    }
    Ok(())
}

/// One call: prints its replies and its status line; returns the status code.
async fn call(
    channel: &Channel,
    args: &GrpcCallArgs,
    request: &EchoRequest,
    messages: u32,
) -> anyhow::Result<i32> {
    let path = match args.method {
        Method::Unary => "/mesh.echo.v1.Echo/Unary",
        Method::ServerStream => "/mesh.echo.v1.Echo/ServerStream",
        Method::ClientStream => "/mesh.echo.v1.Echo/ClientStream",
        Method::Bidi => "/mesh.echo.v1.Echo/Bidi",
    };
    // Bidi is ping-pong: each request goes out only after the previous one's reply came back,
    // so a proxy that held requests until the client half-closed would stall the call.
    let ping_pong = args.method == Method::Bidi;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut sender = Some(tx);
    let mut sent = 0u32;
    if ping_pong {
        if let Some(tx) = &sender {
            tx.try_send(request.clone()).ok();
            sent = 1;
        }
    } else if let Some(tx) = sender.take() {
        let request = request.clone();
        tokio::spawn(async move {
            for _ in 0..messages {
                if tx.send(request.clone()).await.is_err() {
                    break;
                }
            }
        });
    }
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    for (k, v) in &args.metadata {
        let key = MetadataKey::from_bytes(k.as_bytes())
            .map_err(|_| anyhow!("--metadata key {k:?} is not a valid ASCII metadata key"))?;
        let value = MetadataValue::try_from(v.as_str())
            .map_err(|_| anyhow!("--metadata value {v:?} is not valid ASCII metadata"))?;
        req.metadata_mut().append(key, value);
    }
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let limit = args.timeout;
    let call = async {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let mut stream = grpc
            .streaming(req, PathAndQuery::from_static(path), codec)
            .await?
            .into_inner();
        if ping_pong && sent >= messages {
            sender = None; // half-close: every request is out
        }
        while let Some(reply) = stream.message().await? {
            emit_reply(&reply).map_err(|e| Status::internal(e.to_string()))?;
            if let Some(tx) = sender.as_ref().filter(|_| ping_pong) {
                if tx.send(request.clone()).await.is_err() {
                    return Err(Status::internal("request stream closed early"));
                }
                sent += 1;
                if sent >= messages {
                    sender = None;
                }
            }
        }
        let trailers = stream.trailers().await?.unwrap_or_default();
        Ok::<_, Status>(Status::with_metadata(Code::Ok, "", trailers))
    };
    // The whole call, streams included, is bounded (tonic's own timeout covers only headers).
    let status = match tokio::time::timeout(limit, call).await {
        Ok(Ok(status) | Err(status)) => status,
        Err(_) => Status::deadline_exceeded(format!("call not finished within {limit:?}")),
    };
    emit_json(&json!({
        "status": status.code() as i32,
        "code": format!("{:?}", status.code()),
        "message": status.message(),
        "trailers": metadata_json(status.metadata()),
    }))?;
    Ok(status.code() as i32)
}

fn emit_reply(reply: &EchoReply) -> anyhow::Result<()> {
    let mut metadata: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for h in &reply.metadata {
        metadata
            .entry(h.key.as_str())
            .or_default()
            .push(h.value.as_str());
    }
    emit_json(&json!({
        "pod": reply.pod,
        "namespace": reply.namespace,
        "message": reply.message,
        "authority": reply.authority,
        "method": reply.method,
        "index": reply.index,
        "received": reply.received,
        "metadata": metadata,
    }))
}

/// Trailers as `{name: [values]}`, without gRPC's own status fields and (for a trailers-only
/// response, whose trailers are its headers) without content-type.
fn metadata_json(md: &MetadataMap) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for kv in md.iter() {
        let (key, value) = match kv {
            KeyAndValueRef::Ascii(k, v) => (
                k.as_str(),
                String::from_utf8_lossy(v.as_encoded_bytes()).into_owned(),
            ),
            KeyAndValueRef::Binary(k, v) => (
                k.as_str(),
                String::from_utf8_lossy(v.as_encoded_bytes()).into_owned(),
            ),
        };
        if matches!(key, "grpc-status" | "grpc-message" | "content-type") {
            continue;
        }
        out.entry(key.to_owned()).or_default().push(value);
    }
    out
}
