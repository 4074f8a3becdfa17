//! What every proxy path shares: the node's context, one enrolled pod's facts, the accept loop
//! (which applies the node's connection caps, [`crate::limits`]) and the app dial with its
//! timeout.
//!
//! Owns no sockets and no policy; [`crate::outbound`] and [`crate::inbound`] do the work.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use meshcore::Identity;
use meshcore::hbone::Pool;
use meshcore::proto::config::Workload;
use meshcore::store::{canonical, workload_identity};

use meshcore::policy::DecisionCache;

use crate::capture::Capture;
use crate::certs::CertManager;
use crate::config::ConfigRx;
use crate::limits::Admission;
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::policy::{LiveConns, PoliciesRx};

/// Node-wide state every connection handler can reach.
pub struct Ctx {
    pub node: String,
    pub config: ConfigRx,
    pub certs: Arc<CertManager>,
    pub pool: Pool,
    pub capture: Capture,
    /// Where HBONE's records are sealed: what the kernel offers and what `--kernel-tls` allows.
    pub kernel_tls: dataplane::record_encryption::RecordEncryption,
    pub policies: PoliciesRx,
    pub decisions: Arc<DecisionCache>,
    pub live: Arc<LiveConns>,
    /// Connections routed to each destination pod, until they end (listed in the config dump).
    pub routed: Arc<crate::routed::Routed>,
    pub metrics: Arc<Metrics>,
    /// What each enrolled pod looks like, for the admin config dump (pod uid → details).
    pub enrolled: std::sync::Mutex<std::collections::BTreeMap<String, serde_json::Value>>,
    /// Enrolled pods by uid (the fast path's destinations).
    pub local_pods: std::sync::Mutex<std::collections::HashMap<String, Arc<Pod>>>,
    /// Accepted connections in flight, and the stop signal.
    pub drain: Arc<crate::drain::Drain>,
    /// Caps on connections and handshakes in flight ([`crate::limits::Limits::default`] sizes
    /// them from the open-files limit).
    pub admission: Admission,
    /// `--missing-waypoint` and the bypass log's throttles ([`crate::outbound`]).
    pub waypoints: crate::outbound::Waypoints,
    /// A span per sampled connection, when `--trace-collector` is set.
    pub spans: Option<dataplane::conn_result::ConnSpans>,
    /// Where enrolled pods come from (`--enrollment`), and that source's state.
    pub enrollment: crate::pods::SourceStatus,
}

/// One enrolled pod, as its listeners see it.
pub struct Pod {
    pub workload: Arc<Workload>,
    /// Shared: connections keep it for policy checks while they are open.
    pub identity: Arc<Identity>,
    /// The pod's names as every connection's access log carries them (shared, not copied).
    pub names: PodNames,
    pub ips: HashSet<IpAddr>,
    pub netns: Netns,
    /// Whether the app is dialled from the client's address ([`crate::origsrc`]).
    pub orig_src: bool,
}

/// A pod's uid ("ns/name"), namespace and SPIFFE identity, as shared strings.
#[derive(Clone, Debug)]
pub struct PodNames {
    pub uid: Arc<str>,
    pub namespace: Arc<str>,
    pub identity: Arc<str>,
}

impl Pod {
    pub fn new(workload: Arc<Workload>, netns: Netns) -> Pod {
        let identity = Arc::new(workload_identity(&workload));
        let ips = workload
            .ips
            .iter()
            .filter_map(|s| s.parse().ok())
            .map(canonical)
            .collect();
        let names = PodNames {
            uid: workload.uid.as_str().into(),
            namespace: workload.namespace.as_str().into(),
            identity: identity.to_string().into(),
        };
        Pod {
            workload,
            identity,
            names,
            ips,
            netns,
            orig_src: false,
        }
    }

    pub fn owns(&self, ip: IpAddr) -> bool {
        self.ips.contains(&canonical(ip))
    }
}

/// How long ztunnel waits for an app to accept a connection before answering 503 (HBONE) or
/// closing (plaintext). A port nobody listens on answers at once (`fwmark_reflect` in enrolled
/// pods brings the kernel's RST back to ztunnel); this bounds the rest — a SYN the app's
/// firewall drops, a full backlog — so a client cannot make ztunnel hold sockets for the
/// kernel's ~2 min of SYN retries.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an accept loop pauses after an accept error (e.g. out of file descriptors): long
/// enough not to spin on a condition that persists, short enough to recover at once.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts on one of a pod's listeners until the task is aborted, handling each connection
/// on a task of its own (counted by [`Ctx::drain`] until it ends). A connection over the
/// node's caps ([`Ctx::admission`]) is closed at once. An accept error (e.g. out of file
/// descriptors) pauses the loop for [`ACCEPT_ERROR_BACKOFF`] and is logged at most once per
/// [`crate::limits::LOG_PERIOD`], so one bad moment never closes the listener, spins or floods the log.
pub async fn accept_loop<F, Fut>(
    ctx: Arc<Ctx>,
    pod: Arc<Pod>,
    listener: tokio::net::TcpListener,
    listener_kind: &'static str,
    handle: F,
) where
    F: Fn(Arc<Ctx>, Arc<Pod>, tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let admitted = match ctx.admission.connections.enter(peer.ip()) {
                    Ok(pass) => pass,
                    Err(full) => {
                        if let Some(suppressed) = ctx.admission.connections_refused.hit() {
                            tracing::warn!(pod = %pod.workload.uid, listener = listener_kind, %peer, reason = %full,
                                refused_since_last_line = suppressed, "connection refused: too many connections in flight");
                        }
                        continue;
                    }
                };
                let tracked = ctx.drain.track();
                let conn = handle(ctx.clone(), pod.clone(), tcp, peer);
                tokio::spawn(async move {
                    conn.await;
                    drop(tracked);
                    drop(admitted);
                });
            }
            Err(e) => {
                if let Some(suppressed) = ctx.admission.accept_errors.hit() {
                    tracing::warn!(pod = %pod.workload.uid, listener = listener_kind, error = %e,
                        errors_since_last_line = suppressed, "accept failed; pausing this listener briefly");
                }
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

impl Pod {
    /// Connects to the pod's app at `target` for a client at `client`: from the client's
    /// address when this pod preserves it ([`crate::origsrc`]), else from the pod's own.
    pub async fn dial_app(
        &self,
        client: std::net::IpAddr,
        target: std::net::SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let dial = async {
            match crate::origsrc::source_for(client, target) {
                Some(src) if self.orig_src => {
                    self.netns
                        .transparent_socket(src, target)?
                        .connect(target)
                        .await
                }
                _ => self.netns.connect(target).await,
            }
        };
        match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the app did not accept within {DIAL_TIMEOUT:?}"),
            )),
        }
    }
}

/// A mesh port that captured traffic must never be sent to (it would loop into ztunnel).
pub fn is_mesh_port(port: u16) -> bool {
    matches!(
        port,
        meshcore::HBONE_PORT | meshcore::OUTBOUND_PORT | meshcore::INBOUND_PLAINTEXT_PORT
    )
}
