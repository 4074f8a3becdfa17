//! `mesh-echo client URL`: the Istio echo client's command line and output (what the Gateway API
//! mesh conformance suite runs inside a client pod: `client http://echo/v1 --method=GET
//! -H Name:value --count=N`, parsed by its utils/echo/parse.go), so the suite's expectations can
//! be checked unchanged. http:// is HTTP/1.1 (keep-alive; `--http2` for h2c prior knowledge),
//! grpc:// calls the echo service's Unary. Redirects are not followed. Exits non-zero if a
//! request fails (no response at all); any HTTP status is a response.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use echo::istio_text::{ClientResponse, format_response};
use echo::pb::EchoRequest;
use echo::pb::echo_client::EchoClient;
use echo::{RequestAssertions, parse_duration};
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::metadata::{MetadataKey, MetadataValue};

use crate::client::{connect_any, emit_line, resolve};

#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// http://HOST[:PORT]/PATH or grpc://HOST:PORT.
    pub url: String,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Request header NAME:VALUE (`Host:NAME` sets the Host/authority); repeatable.
    #[arg(short = 'H', long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,
    /// Requests sent one after another; outputs are separated by a blank line.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// HTTP/2 cleartext (prior knowledge) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// Connect here instead of the URL's host (like curl --connect-to), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: Option<String>,
    /// Limit for connecting and for each request (e.g. 500ms, 5s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let uri: Uri = args
        .url
        .parse()
        .with_context(|| format!("{:?} is not a URL", args.url))?;
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("{:?} has no host", args.url))?
        .clone();
    let mut headers = Vec::new();
    let mut host = authority.to_string();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| anyhow!("-H {h:?} is not NAME:VALUE"))?;
        if name.eq_ignore_ascii_case("host") {
            host = value.trim().to_owned();
        } else {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    match uri.scheme_str() {
        Some("http") => {
            let default_port = authority.port_u16().unwrap_or(80);
            let dial = args
                .addr
                .clone()
                .unwrap_or_else(|| format!("{}:{default_port}", authority.host()));
            let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            http_requests(&args, &dial, &host, &path, &headers).await
        }
        Some("grpc") => {
            let dial = args.addr.clone().unwrap_or_else(|| authority.to_string());
            grpc_requests(&args, &dial, &host, &headers).await
        }
        _ => bail!(
            "{:?}: only http:// and grpc:// URLs are supported",
            args.url
        ),
    }
}

async fn connect(args: &ClientArgs, dial: &str) -> anyhow::Result<Sender> {
    let addrs = resolve(dial, args.timeout).await?;
    let stream = connect_any(&addrs, args.timeout).await?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if args.http2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::handshake(io).await.context("HTTP/1.1 handshake")?;
        tokio::spawn(conn);
        Ok(Sender::H1(sender))
    }
}

async fn http_requests(
    args: &ClientArgs,
    dial: &str,
    host: &str,
    path: &str,
    headers: &[(String, String)],
) -> anyhow::Result<()> {
    let method = Method::from_bytes(args.method.as_bytes())
        .with_context(|| format!("--method {:?} is not an HTTP method", args.method))?;
    let mut sender: Option<Sender> = None;
    for i in 0..args.count as usize {
        // Reuse the connection while the server keeps it open.
        let reusable = match sender.as_mut() {
            Some(Sender::H1(s)) => s.ready().await.is_ok(),
            Some(Sender::H2(s)) => s.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            sender = Some(connect(args, dial).await?);
        }
        let Some(s) = sender.as_mut() else {
            bail!("no connection to {dial}");
        };
        let mut req = Request::builder().method(method.clone());
        req = match s {
            Sender::H1(_) => req.uri(path).header(http::header::HOST, host),
            Sender::H2(_) => req.uri(format!("http://{host}{path}")),
        };
        for (n, v) in headers {
            let name = HeaderName::from_bytes(n.as_bytes())
                .with_context(|| format!("header name {n:?}"))?;
            let value = HeaderValue::from_str(v).with_context(|| format!("header value {v:?}"))?;
            req = req.header(name, value);
        }
        let req = req.body(Empty::new()).context("building request")?;
        let send = async {
            let resp = match s {
                Sender::H1(s) => s.send_request(req).await?,
                Sender::H2(s) => s.send_request(req).await?,
            };
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(args.timeout, send)
            .await
            .map_err(|_| anyhow!("request {i} timed out after {:?}", args.timeout))?
            .with_context(|| format!("request {i} to {dial}"))?;
        let resp_headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let echo: Option<RequestAssertions> = serde_json::from_slice(&body).ok();
        let raw = String::from_utf8_lossy(&body);
        let url = format!("http://{host}{path}");
        emit(
            i,
            &ClientResponse {
                index: i,
                url: &url,
                status: parts.status.as_u16(),
                headers: &resp_headers,
                echo: echo.as_ref(),
                raw_body: &raw,
            },
        )?;
    }
    Ok(())
}

async fn grpc_requests(
    args: &ClientArgs,
    dial: &str,
    host: &str,
    headers: &[(String, String)],
) -> anyhow::Result<()> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{dial}"))
        .with_context(|| format!("{dial:?} is not HOST:PORT"))?
        .origin(
            format!("http://{host}")
                .parse()
                .with_context(|| format!("{host:?} is not an authority"))?,
        )
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    let mut client = EchoClient::new(
        endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {dial}"))?,
    );
    let url = format!("grpc://{host}");
    for i in 0..args.count as usize {
        let mut req = tonic::Request::new(EchoRequest::default());
        for (n, v) in headers {
            let key = MetadataKey::from_bytes(n.to_ascii_lowercase().as_bytes())
                .map_err(|_| anyhow!("-H name {n:?} is not ASCII metadata"))?;
            let value = MetadataValue::try_from(v.as_str())
                .map_err(|_| anyhow!("-H value {v:?} is not ASCII metadata"))?;
            req.metadata_mut().append(key, value);
        }
        // Istio's client reports an OK call as StatusCode=200 (the suite maps gRPC 0 to 200).
        let (status, echo) = match client.unary(req).await {
            Ok(resp) => {
                let r = resp.into_inner();
                let mut echo = RequestAssertions {
                    path: r.method,
                    host: r.authority,
                    method: "POST".into(),
                    proto: "HTTP/2.0".into(),
                    headers: Default::default(),
                    http_port: String::new(),
                    namespace: r.namespace,
                    ingress: String::new(),
                    service: String::new(),
                    pod: r.pod,
                    body_bytes: 0,
                };
                for h in r.metadata {
                    echo.headers
                        .entry(echo::canonical_header_key(&h.key))
                        .or_default()
                        .push(h.value);
                }
                (200, Some(echo))
            }
            Err(status) => (status.code() as u16, None),
        };
        emit(
            i,
            &ClientResponse {
                index: i,
                url: &url,
                status,
                headers: &[],
                echo: echo.as_ref(),
                raw_body: "",
            },
        )?;
    }
    Ok(())
}

fn emit(i: usize, r: &ClientResponse<'_>) -> anyhow::Result<()> {
    let text = format_response(r);
    if i > 0 {
        emit_line("")?;
    }
    emit_line(text.trim_end())
}
