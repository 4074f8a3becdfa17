//! TCP passthrough: a connection on a TCP port (or one that did not look like HTTP) goes to one
//! endpoint of its destination, bytes copied both ways untouched (half-close kept). Owns that
//! copy and its [`Record`]; endpoint choice is `balance`'s, the stream `upstream`'s.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::app::Ctx;
use crate::balance::{self, Picked};
use crate::pipeline::Downstream;
use crate::routing::TcpDecision;
use crate::telemetry::{Flag, Kind, Record};
use crate::upstream::Io;
use meshcore::route::lb::HashRequest;

/// Passes `client` (whose first bytes, already read, are `prefix`) through to an endpoint.
pub async fn passthrough<S: Io>(
    ctx: Arc<Ctx>,
    down: Arc<Downstream>,
    mut client: S,
    prefix: Bytes,
) {
    let mut record = Record::new(
        down.principal.clone(),
        down.addr.to_string(),
        down.target.name(),
        down.target.port(),
        Kind::Tcp {
            sent: 0,
            received: 0,
        },
    );
    record.tcp_opened(&ctx.metrics);
    let router = ctx.router.borrow().clone();
    let TcpDecision::Forward(backend) = router.tcp(&down.target);
    record.route = "default".to_string();
    let endpoints = match ctx.config.borrow().as_deref() {
        Some(store) => balance::endpoints(store, &router, &backend),
        None => Vec::new(),
    };
    let headers = http::HeaderMap::new();
    let hash_request = HashRequest {
        headers: &headers,
        path_and_query: "",
        source_ip: Some(down.addr.ip()),
    };
    let picked = ctx
        .balancer
        .pick(&router, &backend, &endpoints, &hash_request, &[]);
    let Some(Picked {
        endpoint,
        in_flight: _in_flight,
        ..
    }) = picked
    else {
        record.flag = Some(Flag::NoHealthyUpstream);
        record.finish(&ctx.metrics);
        return;
    };
    record.upstream = endpoint.addr.to_string();
    let mut server = match ctx.upstream.open(&endpoint).await {
        Ok(s) => s,
        Err(e) => {
            record.flag = Some(Flag::UpstreamConnect);
            record.error = Some(e.to_string());
            record.finish(&ctx.metrics);
            return;
        }
    };
    let result = async {
        server.write_all(&prefix).await?;
        tokio::io::copy_bidirectional(&mut client, &mut server).await
    }
    .await;
    match result {
        Ok((received, sent)) => {
            record.kind = Kind::Tcp {
                sent,
                received: received + prefix.len() as u64,
            };
        }
        Err(e) => record.error = Some(e.to_string()),
    }
    record.finish(&ctx.metrics);
}
