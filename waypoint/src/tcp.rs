//! TCP passthrough: a connection on a TCP port (or one that did not look like HTTP) goes to one
//! endpoint of its destination, bytes copied both ways untouched (half-close kept). Owns that
//! copy and its [`Record`]; endpoint choice is `balance`'s, the stream `upstream`'s.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::app::Ctx;
use crate::authz::Verdict;
use crate::balance::{self, Outcome, Picked};
use crate::pipeline::Downstream;
use crate::routing::TcpDecision;
use crate::telemetry::{Flag, Kind, Record};
use crate::upstream::{Io, UpstreamError};
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
    // The policies that judge this destination's requests judge its connections too: speaking
    // something other than HTTP must not step around them.
    if let Verdict::Deny { policy } = crate::authz::check_connection(&ctx, &down) {
        record.flag = Some(Flag::RbacDenied);
        record.error = Some(format!("denied by {policy}"));
        record.finish(&ctx.metrics);
        return;
    }
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
    let destination = router.destination_policy(&backend);
    let connected = ctx.upstream.connect(&endpoint, &destination.pool).await;
    // For TCP, outlier detection counts connect failures (a connection made is a success).
    let outcome = match &connected {
        Ok(_) => Some(Outcome::Status(200)),
        Err(UpstreamError::Overflow(_)) => None,
        Err(_) => Some(Outcome::ConnectFailure),
    };
    if let Some(o) = outcome {
        ctx.balancer
            .report(&backend, &destination, endpoint.addr, o);
    }
    let mut server = match connected {
        Ok(s) => s,
        Err(UpstreamError::Overflow(_)) => {
            record.flag = Some(Flag::UpstreamOverflow);
            record.finish(&ctx.metrics);
            return;
        }
        Err(e) => {
            record.flag = Some(Flag::UpstreamConnect);
            record.error = Some(e.to_string());
            record.finish(&ctx.metrics);
            return;
        }
    };
    // DestinationRule tcp.idleTimeout: no byte either way for that long closes both sides.
    let idle = server.idle();
    let result = async {
        server.write_all(&prefix).await?;
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut server) => r,
            () = idle => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle longer than the DestinationRule's tcp.idleTimeout",
            )),
        }
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
