//! `echo serve`: dual-stack listeners (`[::]:PORT`, IPV6_V6ONLY off) and the
//! per-connection protocol handler (WHO / ECHO / SINK / error), logging one
//! line per connection; HTTP and gRPC ports are handed to `http_serve`.
//! Runs until SIGINT or SIGTERM.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use echo::{
    ErrorReply, LineRead, MAX_LINE, ProtocolError, Request, SinkReply, WhoReply, normalize_addr,
    parse_request, read_line_limited,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::control::Control;
use crate::http_serve;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("any_port").required(true).multiple(true)
    .args(["ports", "http_ports", "grpc_ports"])))]
pub struct ServeArgs {
    /// Line-protocol (WHO/ECHO/SINK) port, as [::]:PORT (dual-stack); repeatable.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// HTTP port (HTTP/1.1 + h2c; echo-basic JSON replies, WebSocket echo, gRPC); repeatable.
    #[arg(long = "http-port", value_name = "PORT")]
    pub http_ports: Vec<u16>,
    /// gRPC port: the same server as --http-port (gRPC is told apart by content-type),
    /// named separately for manifests; repeatable.
    #[arg(long = "grpc-port", value_name = "PORT")]
    pub grpc_ports: Vec<u16>,
    /// Name reported as `served_by` [default: $POD_NAME, else the hostname].
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// HTTP answers fail from the start: a status (503), `reset` or `stall` (`POST /control`
    /// changes it later; see `echo::Behaviour`).
    #[arg(long, value_name = "FAILURE", value_parser = echo::Failure::parse)]
    pub fail: Option<echo::Failure>,
    /// With --fail: only every N-th request fails.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub fail_every: u64,
    /// Delay every HTTP answer by this much (e.g. 300ms, 2s).
    #[arg(long, value_name = "DURATION", value_parser = echo::parse_duration)]
    pub delay: Option<Duration>,
    /// Serve FILE as-is at URL path PATH on the HTTP ports (e.g. a JWKS:
    /// `--file /jwks.json=keys.json`); repeatable.
    #[arg(long = "file", value_name = "PATH=FILE", value_parser = parse_file_route)]
    pub files: Vec<(String, PathBuf)>,
}

fn parse_file_route(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((path, file)) if path.starts_with('/') && !file.is_empty() => {
            Ok((path.to_owned(), PathBuf::from(file)))
        }
        _ => Err(format!("{s:?}: use PATH=FILE with PATH starting with /")),
    }
}

/// The server flags of the Gateway API conformance image `echo-advanced` (Istio's echo app), so
/// the conformance manifests' `args` run unchanged: `--port` and `--grpc` ports serve HTTP/h2c
/// with gRPC told apart by content-type, `--tcp` ports the line protocol. `--tls` ports are not
/// served (local mode has no certificates for them); `--crt`, `--key`, `--version` and
/// `--cluster` are accepted and ignored.
#[derive(Debug, clap::Args)]
pub struct AdvancedArgs {
    #[arg(long = "port", value_name = "PORT")]
    pub http_ports: Vec<u16>,
    #[arg(long = "grpc", value_name = "PORT")]
    pub grpc_ports: Vec<u16>,
    #[arg(long = "tcp", value_name = "PORT")]
    pub tcp_ports: Vec<u16>,
    #[arg(long = "tls", value_name = "PORT")]
    pub tls_ports: Vec<u16>,
    #[arg(long, value_name = "PATH")]
    pub crt: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub key: Option<String>,
    #[arg(long = "version", value_name = "VERSION")]
    pub service_version: Option<String>,
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// Pod name reported in replies [default: $POD_NAME, else the hostname].
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub name: Option<String>,
}

impl AdvancedArgs {
    pub fn into_serve(self) -> anyhow::Result<ServeArgs> {
        let tls = self.tls_ports;
        if !tls.is_empty() {
            warn!(ports = ?tls, "TLS ports are not served by mesh-echo; skipped");
        }
        let keep = |ports: Vec<u16>| -> Vec<u16> {
            ports.into_iter().filter(|p| !tls.contains(p)).collect()
        };
        let serve = ServeArgs {
            ports: self.tcp_ports,
            http_ports: keep(self.http_ports),
            grpc_ports: keep(self.grpc_ports),
            name: self.name,
            fail: None,
            fail_every: 1,
            delay: None,
            files: Vec::new(),
        };
        if serve.ports.is_empty() && serve.http_ports.is_empty() && serve.grpc_ports.is_empty() {
            anyhow::bail!("no port to serve: give --port, --grpc or --tcp (TLS ports are skipped)");
        }
        Ok(serve)
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // One fd per connection: the usual soft limit (1024) would refuse clients long before
    // memory runs out (`hold` opens 10,000 at once).
    match crate::fd_limit::raise() {
        Ok(limit) => info!(limit, "open-files limit"),
        Err(err) => warn!(error = %err, "cannot raise the open-files limit"),
    }
    let name: Arc<str> = match args.name.filter(|n| !n.is_empty()) {
        Some(name) => name.into(),
        None => hostname().unwrap_or_else(|| "unknown".to_owned()).into(),
    };

    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let id = Arc::new(http_serve::Identity {
        pod: name.to_string(),
        namespace: std::env::var("POD_NAMESPACE").unwrap_or_else(|_| env("NAMESPACE")),
        service: env("SERVICE_NAME"),
        ingress: env("INGRESS_NAME"),
    });

    let ctl = Arc::new(Control::new(
        echo::Behaviour {
            fail: args.fail.unwrap_or_default(),
            every: args.fail_every,
            delay: args.delay.unwrap_or_default(),
        },
        args.files,
    ));

    // Bind everything first so a bad port fails the whole command up front.
    let http_ports = args.http_ports.iter().chain(&args.grpc_ports);
    let mut listeners = Vec::new();
    for (&port, http) in args
        .ports
        .iter()
        .map(|p| (p, false))
        .chain(http_ports.map(|p| (p, true)))
    {
        let listener =
            bind_dual_stack(port).with_context(|| format!("listening on [::]:{port}"))?;
        listeners.push((listener, http));
    }
    for (listener, http) in listeners {
        let addr = listener.local_addr().context("reading listener address")?;
        if http {
            info!(%addr, name = %name, "listening (http, h2c, grpc)");
            tokio::spawn(http_serve::accept_loop(listener, id.clone(), ctl.clone()));
        } else {
            info!(%addr, name = %name, "listening");
            tokio::spawn(accept_loop(listener, name.clone()));
        }
    }

    shutdown_signal().await?;
    info!("shutting down");
    Ok(())
}

/// Waits for SIGINT or SIGTERM (the latter matters when running as PID 1 in a pod).
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        res = tokio::signal::ctrl_c() => res.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn bind_dual_stack(port: u16) -> std::io::Result<TcpListener> {
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call;
    // gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec())
        .ok()
        .filter(|s| !s.is_empty())
}

async fn accept_loop(listener: TcpListener, name: Arc<str>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let name = name.clone();
                tokio::spawn(async move { handle_conn(stream, peer, &name).await });
            }
            Err(err) => {
                // E.g. EMFILE: back off briefly instead of spinning.
                warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What happened on one connection, for the per-connection log line.
struct ConnStats {
    mode: &'static str,
    requests: u64,
    bytes: u64,
}

async fn handle_conn(stream: TcpStream, peer: SocketAddr, name: &str) {
    let start = Instant::now();
    let peer = normalize_addr(peer);
    let local = match stream.local_addr() {
        Ok(addr) => normalize_addr(addr),
        Err(err) => {
            warn!(%peer, error = %err, "getsockname failed; dropping connection");
            return;
        }
    };
    // Best effort: only affects latency.
    let _ = stream.set_nodelay(true);

    let mut stats = ConnStats {
        mode: "empty",
        requests: 0,
        bytes: 0,
    };
    let result = serve_conn(stream, peer, local, name, &mut stats).await;
    let elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    match result {
        Ok(()) => info!(
            %peer, %local, mode = stats.mode, requests = stats.requests,
            bytes = stats.bytes, elapsed_us, "connection closed"
        ),
        Err(err) => warn!(
            %peer, %local, mode = stats.mode, requests = stats.requests,
            bytes = stats.bytes, elapsed_us, error = %err, "connection failed"
        ),
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    name: &str,
    stats: &mut ConnStats,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::with_capacity(256);

    match read_line_limited(&mut rd, &mut line, MAX_LINE).await? {
        LineRead::Eof => return Ok(()),
        LineRead::TooLong => {
            stats.mode = "invalid";
            return reply_error(&mut wr, &ProtocolError::TooLong).await;
        }
        LineRead::Line => {}
    }

    match parse_request(&line) {
        Ok(Request::Who(mut message)) => {
            stats.mode = "who";
            let mut reply = WhoReply {
                served_by: name.to_owned(),
                port: local.port(),
                peer: peer.to_string(),
                local: local.to_string(),
                message: String::new(),
            };
            loop {
                reply.message = message;
                stats.requests += 1;
                write_json_line(&mut wr, &reply).await?;
                match read_line_limited(&mut rd, &mut line, MAX_LINE).await? {
                    LineRead::Eof => break,
                    LineRead::TooLong => {
                        return reply_error(&mut wr, &ProtocolError::TooLong).await;
                    }
                    LineRead::Line => {}
                }
                match parse_request(&line) {
                    Ok(Request::Who(next)) => message = next,
                    Ok(_) => {
                        let err = "only WHO requests may follow a WHO request";
                        return reply_error(&mut wr, err).await;
                    }
                    Err(err) => return reply_error(&mut wr, &err).await,
                }
            }
            wr.shutdown().await
        }
        Ok(Request::Echo) => {
            stats.mode = "echo";
            // copy_buf drains what BufReader already holds before reading more,
            // so bytes sent in the same segment as `ECHO\n` are echoed too.
            stats.bytes = tokio::io::copy_buf(&mut rd, &mut wr).await?;
            wr.shutdown().await
        }
        Ok(Request::Sink) => {
            stats.mode = "sink";
            stats.bytes = tokio::io::copy_buf(&mut rd, &mut tokio::io::sink()).await?;
            write_json_line(
                &mut wr,
                &SinkReply {
                    received: stats.bytes,
                },
            )
            .await?;
            wr.shutdown().await
        }
        Err(err) => {
            stats.mode = "invalid";
            reply_error(&mut wr, &err).await
        }
    }
}

/// Sends `{"error": ...}` and shuts down our write side (the caller then closes).
async fn reply_error<W, E>(wr: &mut W, err: &E) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    E: std::fmt::Display + ?Sized,
{
    let reply = ErrorReply {
        error: err.to_string(),
    };
    write_json_line(wr, &reply).await?;
    wr.shutdown().await
}

async fn write_json_line<W, T>(wr: &mut W, value: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: serde::Serialize,
{
    let mut buf = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    buf.push(b'\n');
    wr.write_all(&buf).await
}
