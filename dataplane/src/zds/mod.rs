//! ZDS, Istio's "ztunnel discovery service": how the CNI node agent hands ztunnel the network
//! namespaces of the pods it must serve. One protobuf message per packet on a unix
//! SOCK_SEQPACKET socket; the pod's netns travels as exactly one fd (SCM_RIGHTS) with `add`.
//! The agent listens, ztunnel connects and says hello; the agent sends `add` for every pod it
//! knows (each acked before the next), `keep` for pods it knows without a netns fd, then
//! `snapshot_sent`; after that only `add` and `del`. Acks correlate by order.
//!
//! Byte-compatible with Istio's ztunnel and istio-cni (see `proto`). Owns the transport and
//! each side's view of the sequence; what a pod *means* (listeners, capture) is ztunnel's, and
//! which pods to send is the agent's.

pub mod conn;
pub mod proto;
mod sides;

pub use conn::{ZdsConn, ZdsListener};
pub use sides::{AgentSession, Request, ZtunnelSession};

/// Where the agent listens and ztunnel connects (Istio's default; ztunnel's env `INPOD_UDS`).
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// The largest message either side accepts (Istio's ztunnel reads into 1 KiB).
pub const MAX_MESSAGE: usize = 1024;

/// How long either side waits for the other's next message in a request/ack exchange.
pub const EXCHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What can go wrong on a ZDS session. Every variant names what the peer did.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ZDS socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("ZDS peer closed the session")]
    Closed,
    #[error("ZDS I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("ZDS message truncated (over {MAX_MESSAGE} bytes, or more than one fd)")]
    Truncated,
    #[error("ZDS message does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("ZDS protocol violation: {0}")]
    Protocol(String),
    #[error("ZDS peer did not answer within {0:?}")]
    Timeout(std::time::Duration),
}
