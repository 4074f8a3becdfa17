//! What every proxy path shares: the node's context and one enrolled pod's facts.
//!
//! Owns no sockets and no policy; [`crate::outbound`] and [`crate::inbound`] do the work.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use meshcore::hbone::Pool;
use meshcore::proto::config::Workload;
use meshcore::store::{canonical, workload_identity};
use meshcore::Identity;

use meshcore::policy::DecisionCache;

use crate::capture::Capture;
use crate::certs::CertManager;
use crate::config::ConfigRx;
use crate::netns::Netns;
use crate::policy::{LiveConns, PoliciesRx};

/// Node-wide state every connection handler can reach.
pub struct Ctx {
    pub node: String,
    pub config: ConfigRx,
    pub certs: Arc<CertManager>,
    pub pool: Pool,
    pub capture: Capture,
    pub policies: PoliciesRx,
    pub decisions: Arc<DecisionCache>,
    pub live: Arc<LiveConns>,
}

/// One enrolled pod, as its listeners see it.
pub struct Pod {
    pub workload: Arc<Workload>,
    pub identity: Identity,
    pub ips: HashSet<IpAddr>,
    pub netns: Netns,
}

impl Pod {
    pub fn new(workload: Arc<Workload>, netns: Netns) -> Pod {
        let identity = workload_identity(&workload);
        let ips = workload.ips.iter().filter_map(|s| s.parse().ok()).map(canonical).collect();
        Pod { workload, identity, ips, netns }
    }

    pub fn owns(&self, ip: IpAddr) -> bool {
        self.ips.contains(&canonical(ip))
    }
}

/// Copies both ways until done, or until `cancel` is notified (a policy change denied the
/// connection), returning bytes (a→b, b→a).
pub async fn copy_until<A, B>(a: &mut A, b: &mut B, cancel: &tokio::sync::Notify) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::select! {
        r = tokio::io::copy_bidirectional(a, b) => r,
        _ = cancel.notified() => Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "closed: denied by a policy change")),
    }
}

/// A mesh port that captured traffic must never be sent to (it would loop into ztunnel).
pub fn is_mesh_port(port: u16) -> bool {
    matches!(port, meshcore::HBONE_PORT | meshcore::OUTBOUND_PORT | meshcore::INBOUND_PLAINTEXT_PORT)
}
