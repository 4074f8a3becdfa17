//! Serving one accepted inbound HBONE connection, the same way in ztunnel and the waypoint:
//! with the proxy's drain and handshake cap, and its end logged.
//!
//! Anyone who can reach a 15008 port can fail a TLS handshake: one line each would let them
//! flood the log, so a failure before the peer authenticated is a debug line and a periodic
//! summary; an error after it is a warning. Owns only that glue; TLS, HTTP/2 and CONNECT
//! are `meshcore::hbone`'s, what each CONNECT does is the caller's `handler`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use meshcore::admission::Throttle;
use meshcore::hbone::{HboneError, InboundRequest, ServerSettings};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::drain::Drain;

/// Where an inbound HBONE connection is served and how its end is reported.
pub struct Inbound<'a, G> {
    pub tls: Arc<rustls::ServerConfig>,
    pub drain: &'a Arc<Drain>,
    /// Held until the handshakes end (a slot of the caller's handshake cap).
    pub handshake_slot: G,
    pub peer: SocketAddr,
    /// The enrolled pod reached (ztunnel); `None` for a proxy's own listener.
    pub pod: Option<&'a str>,
    pub handshakes_failed: &'a Throttle,
    /// Hand the connection's records to the kernel after the handshake (kTLS), where it can.
    pub kernel_tls: bool,
}

/// Serves `tcp` until it ends or the drain stops it, calling `handler` per CONNECT; logs the end.
pub async fn serve<H, F, G>(tcp: TcpStream, handler: H, at: Inbound<'_, G>)
where
    H: Fn(InboundRequest) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let drain = at.drain.clone();
    let result = meshcore::hbone::serve_connection_limited(
        tcp,
        at.tls,
        ServerSettings {
            kernel_tls: at.kernel_tls,
            ..ServerSettings::default()
        },
        handler,
        async move { drain.stopping().await },
        at.handshake_slot,
    )
    .await;
    log_end(result, at.peer, at.pod, at.handshakes_failed);
}

/// Logs how an HBONE connection from `peer` ended. `pod` names the enrolled pod it reached
/// (ztunnel), `None` for a proxy's own listener (the waypoint); `handshakes_failed` throttles
/// the summary of pre-authentication failures.
pub fn log_end(
    result: Result<(), HboneError>,
    peer: SocketAddr,
    pod: Option<&str>,
    handshakes_failed: &Throttle,
) {
    match result {
        Ok(()) => {}
        Err(e) if e.is_before_authentication() => {
            debug!(pod, %peer, error = %e, "HBONE handshake failed");
            if let Some(suppressed) = handshakes_failed.hit() {
                warn!(pod, last_peer = %peer, last_error = %e, failed_since_last_line = suppressed,
                    "HBONE handshakes failing before the peer authenticated (each one is logged at debug)");
            }
        }
        Err(e) => warn!(pod, %peer, error = %e, "HBONE connection ended with error"),
    }
}
