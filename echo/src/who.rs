//! `echo who`: connects, prints the client socket's own view
//! ([`ClientInfo`]), then sends COUNT `WHO` requests sequentially and prints each
//! validated reply line. Any failure (connect, timeout, bad or error reply) is an
//! error and a non-zero exit.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use echo::{
    ClientInfo, ErrorReply, LineRead, MAX_LINE, WhoReply, normalize_addr, parse_duration,
    read_line_limited,
};
use tokio::io::{AsyncWriteExt, BufReader};

use crate::client::{connect_any, emit_json, emit_line, resolve};

#[derive(Debug, clap::Args)]
pub struct WhoArgs {
    /// Server address, HOST:PORT (e.g. 10.0.0.5:8080, [::1]:8080, echo:8080).
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: String,
    /// Message carried in each WHO request and echoed back in the reply.
    #[arg(long, default_value = "hello")]
    pub message: String,
    /// Limit for resolving, connecting, and each request/reply (e.g. 500ms, 5s, 2m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Number of WHO requests to send on the connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
}

pub async fn run(args: WhoArgs) -> anyhow::Result<()> {
    if args.message.contains(['\n', '\r']) {
        bail!("--message must not contain line breaks");
    }
    let timeout = args.timeout;
    let addrs = resolve(&args.addr, timeout).await?;
    let stream = connect_any(&addrs, timeout)
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let info = ClientInfo {
        client_local: normalize_addr(stream.local_addr().context("getsockname")?).to_string(),
        client_peer: normalize_addr(stream.peer_addr().context("getpeername")?).to_string(),
    };
    emit_json(&info)?;

    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let request = format!("WHO {}\n", args.message);
    let mut line = Vec::with_capacity(512);
    for i in 1..=args.count {
        let exchange = async {
            wr.write_all(request.as_bytes())
                .await
                .context("sending request")?;
            read_line_limited(&mut rd, &mut line, MAX_LINE)
                .await
                .context("reading reply")
        };
        let read = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| {
                anyhow!(
                    "timed out after {timeout:?} waiting for reply {i}/{} from {}",
                    args.count,
                    args.addr
                )
            })??;
        match read {
            LineRead::Line if line.ends_with(b"\n") => {}
            LineRead::Line | LineRead::Eof => bail!(
                "server {} closed the connection before replying to request {i}/{}",
                args.addr,
                args.count
            ),
            LineRead::TooLong => bail!("bad reply from {}: line too long", args.addr),
        }
        let text = std::str::from_utf8(&line)
            .map_err(|_| anyhow!("bad reply from {}: not UTF-8", args.addr))?
            .trim_end();
        if serde_json::from_str::<WhoReply>(text).is_err() {
            if let Ok(err) = serde_json::from_str::<ErrorReply>(text) {
                bail!("server {} returned an error: {}", args.addr, err.error);
            }
            bail!("bad reply from {}: {text:?}", args.addr);
        }
        emit_line(text)?;
    }
    Ok(())
}
