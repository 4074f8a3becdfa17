//! How an inbound HBONE connection's end is logged, the same way by ztunnel and the waypoint.
//!
//! Anyone who can reach a 15008 port can fail a TLS handshake: one line each would let them
//! flood the log, so a failure before the peer authenticated is a debug line and a periodic
//! summary; an error after it is a warning. Owns only those lines; serving the connection is
//! `meshcore::hbone`'s.

use std::net::SocketAddr;

use meshcore::admission::Throttle;
use meshcore::hbone::HboneError;
use tracing::{debug, warn};

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
