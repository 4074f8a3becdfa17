//! Same-node fast path (`--fast-path`, eBPF capture only): a captured outbound connection whose
//! destination is an enrolled pod of this node is, once authorized, spliced in the kernel
//! instead of going over HBONE through this same ztunnel.
//!
//! Identity is what HBONE would prove, known first-hand: the source is the pod whose netns the
//! outbound listener lives in, the destination the pod ztunnel dials inside its own netns. The
//! destination's L4 policy is evaluated with the source's identity exactly as
//! [`crate::inbound`] does, before any byte reaches the app, and the connection is registered
//! in [`crate::policy::LiveConns`] so a policy change closes it. Then the two plaintext legs
//! (the app's connection to ztunnel, ztunnel's connection to the destination app) go into the
//! sockhashes of [`crate::ebpf::Ebpf::splice`] and bytes flow app↔app inside the kernel; this
//! module only watches for FINs (propagating a half-close once the other leg has everything),
//! resets and cancellation, and reports. A direction whose in-flight bytes pass the kernel's
//! bound falls back to a userspace copy ([`fallback`]) for the rest of the connection. Owns
//! that decision and the watch; not the kernel objects ([`crate::ebpf`]) nor routing
//! ([`crate::outbound`]).

mod fallback;
mod sock;

use sock::{TCP_CLOSE, clear_readiness, fin_received, shutdown_write, tcp_info, written};

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshcore::policy::Connection;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::copy::{Outcome, Totals};
use crate::ebpf::{Ebpf, Spliced};
use crate::metrics::{FLAG_CONNECT, FLAG_DENY};
use crate::policy::check;
use crate::proxy::{Ctx, Pod, is_mesh_port};
use crate::telemetry::{End, tcp_labels};

/// The enrolled local pod `workload_uid`, if the fast path is on and it is one.
pub fn local_destination(ctx: &Ctx, workload_uid: &str) -> Option<Arc<Pod>> {
    ctx.capture.ebpf().filter(|e| e.fast_path())?;
    ctx.local_pods
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(workload_uid)
        .cloned()
}

#[derive(Debug, thiserror::Error)]
enum FastPathError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("splice: {0}")]
    Splice(#[from] crate::ebpf::EbpfError),
}

/// Handles one captured connection from `src` to `target` in `dst_pod` (both on this node).
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    ctx: Arc<Ctx>,
    src: Arc<Pod>,
    dst_pod: Arc<Pod>,
    tcp: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    target: SocketAddr,
    start: Instant,
) {
    let Some(ebpf) = ctx.capture.ebpf() else {
        return;
    };
    if !dst_pod.owns(target.ip()) || is_mesh_port(target.port()) {
        warn!(direction = "outbound", src.workload = %src.workload.uid, %peer, %dst, %target, fast_path = true,
            error = "target is not the destination pod's app", "connection failed");
        return;
    }
    // What the destination would see over HBONE: the source pod's address of the target's family.
    let src_ip = source_ip(&src, target.ip());
    let conn = Connection {
        src_identity: Some(src.identity.clone()),
        src_ip,
        dst_ip: target.ip(),
        dst_port: target.port(),
    };
    let store = ctx.config.borrow().clone();
    let service = store
        .as_ref()
        .and_then(|s| s.service_by_vip(dst.ip()).cloned());
    let principal = src.identity.to_string();
    let src_end = || End {
        workload: Some(&src.workload),
        principal: Some(&principal),
    };
    let dst_end = || End {
        workload: Some(&dst_pod.workload),
        principal: None,
    };
    // Both reporters, as the HBONE path through this ztunnel would produce.
    let mut m_src = ctx.metrics.open(tcp_labels(
        "source",
        src_end(),
        dst_end(),
        service.as_deref(),
        true,
    ));
    let mut m_dst = ctx
        .metrics
        .open(tcp_labels("destination", src_end(), dst_end(), None, true));
    let policies = ctx.policies.borrow().clone();
    if let Err(reason) = check(&policies, &ctx.decisions, &dst_pod, &conn) {
        m_src.set_response_flags(FLAG_DENY);
        m_dst.set_response_flags(FLAG_DENY);
        warn!(direction = "outbound", src.workload = %src.workload.uid, src.identity = %src.identity, %peer, %dst,
            endpoint = %target, dst.workload = %dst_pod.workload.uid, fast_path = true, response_flags = "DENY",
            error = %reason, "connection failed");
        return;
    }
    // Not needed past the check: a connection that outlives config pushes must not keep every
    // old snapshot alive.
    drop((store, service, policies));
    let live = ctx.live.register(dst_pod.clone(), conn);
    // The destination app sees the source pod's address, as through HBONE.
    let src_ip = src
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == target.is_ipv4());
    let dialled = match src_ip {
        Some(ip) => dst_pod.dial_app(ip, target).await,
        None => dst_pod.netns.connect(target).await,
    };
    let app = match dialled {
        Ok(a) => a,
        Err(e) => {
            m_src.set_response_flags(FLAG_CONNECT);
            m_dst.set_response_flags(FLAG_CONNECT);
            warn!(direction = "outbound", src.workload = %src.workload.uid, %peer, %dst, endpoint = %target,
                fast_path = true, error = %format!("connect {target}: {e}"), "connection failed");
            return;
        }
    };
    let result = splice_until(ebpf, &tcp, &app, live.cancel.notified()).await;
    let totals = match &result {
        Ok(o) => o.totals(),
        Err((_, t)) => *t,
    };
    for m in [&m_src, &m_dst] {
        m.received(totals.client_to_server);
        m.sent(totals.server_to_client);
    }
    let dur_ms = start.elapsed().as_millis() as u64;
    let (received, sent) = (totals.client_to_server, totals.server_to_client);
    match result {
        Ok(Outcome::Completed(_)) => info!(
            direction = "outbound", src.workload = %src.workload.uid, src.namespace = %src.workload.namespace,
            src.identity = %src.identity, %peer, %dst, endpoint = %target, dst.workload = %dst_pod.workload.uid,
            dst.identity = %dst_pod.identity, protocol = "TCP", fast_path = true, sent, received, dur_ms,
            "connection complete"),
        Ok(Outcome::Cancelled(_)) => {
            m_src.set_response_flags(FLAG_DENY);
            m_dst.set_response_flags(FLAG_DENY);
            warn!(direction = "outbound", src.workload = %src.workload.uid, src.identity = %src.identity, %peer, %dst,
                endpoint = %target, dst.workload = %dst_pod.workload.uid, fast_path = true, sent, received, dur_ms,
                response_flags = "DENY", error = "closed: denied by a policy change", "connection failed")
        }
        Err((error, _)) => {
            warn!(direction = "outbound", src.workload = %src.workload.uid, %peer, %dst,
            endpoint = %target, fast_path = true, sent, received, dur_ms, %error, "connection failed")
        }
    }
    // Dropping both legs closes them (and drops them from the sockhashes).
    drop((tcp, app));
}

fn source_ip(src: &Pod, target: IpAddr) -> IpAddr {
    let mut ips: Vec<IpAddr> = src.ips.iter().copied().collect();
    ips.sort();
    ips.iter()
        .find(|ip| ip.is_ipv4() == target.is_ipv4())
        .or(ips.first())
        .copied()
        .unwrap_or(target)
}

/// One leg of the splice, client (`a`, the app's connection to ztunnel) or server (`b`).
struct Leg<'a> {
    s: &'a TcpStream,
    cookie: u64,
    /// [`written`] of this leg before the splice: later growth is what the kernel forwarded
    /// into it.
    base: u64,
    /// The peer's FIN has arrived on this leg.
    fin: bool,
    /// That FIN has been passed on (the other leg's write side shut down).
    forwarded: bool,
    /// The program stopped redirecting this leg's bytes: [`fallback::copy_rest`] carries them
    /// (and the FIN) instead.
    copying: bool,
}

/// Splices `a` and `b` until both directions ended (Completed), `cancel` fires (Cancelled), or
/// a leg fails. Totals are the bytes the kernel forwarded plus those copied, in each direction.
async fn splice_until(
    ebpf: &Ebpf,
    a: &TcpStream,
    b: &TcpStream,
    cancel: impl Future<Output = ()>,
) -> Result<Outcome, (FastPathError, Totals)> {
    // Taken before the splice: nothing has been written to either leg yet.
    let bases = written(a.as_raw_fd())
        .and_then(|wa| Ok((wa, written(b.as_raw_fd())?)))
        .map_err(|e| (e.into(), Totals::default()))?;
    let spliced = ebpf
        .splice(a.as_raw_fd(), b.as_raw_fd())
        .map_err(|e| (e.into(), Totals::default()))?;
    let copied = [AtomicU64::new(0), AtomicU64::new(0)];
    let r = watch(ebpf, spliced, [(a, bases.0), (b, bases.1)], &copied, cancel).await;
    let totals = Totals {
        client_to_server: ebpf.spliced_bytes(spliced.a) + copied[0].load(Ordering::Relaxed),
        server_to_client: ebpf.spliced_bytes(spliced.b) + copied[1].load(Ordering::Relaxed),
    };
    ebpf.unsplice(spliced);
    match r {
        Ok(true) => Ok(Outcome::Cancelled(totals)),
        Ok(false) => Ok(Outcome::Completed(totals)),
        Err(e) => Err((e.into(), totals)),
    }
}

/// Ok(true) when cancelled, Ok(false) when both directions ended.
///
/// How the kernel forwards (`sk_psock_skb_redirect`, Linux 6.x): a redirected skb is taken off
/// the receiving leg at once (its receive window reopens, so the sender is never slowed) and
/// queued on the *other* leg's psock, whose worker writes it into that leg's send buffer when
/// there is room. The counter of a leg ([`Ebpf::spliced_bytes`]) therefore runs ahead of what
/// the other leg has actually been given, by up to everything the sender managed to push. The
/// FIN is one more skb in that queue, of length 0: when the worker reaches it (after every byte
/// before it), "sending" it fails and the kernel reports EPIPE on the other leg and stops that
/// psock's transmit side. Hence:
/// - a FIN is passed on (`shutdown(SHUT_WR)` of the other leg) only once the other leg's send
///   side holds every byte counted before it ([`written`] growth ≥ counter), polled with a
///   short backoff while a leg drains: the queue has no event of its own;
/// - EPIPE on a leg whose other leg has had its FIN is that marker, not a failure;
/// - the counter is read only after the FIN state: both change in the same softirq under the
///   receiving socket's lock, which `TCP_INFO` takes, so the count read after it is final;
/// - likewise the program's switch of a direction to the copy (which it makes before the FIN
///   skb, as the FIN adds nothing in flight): checked after the FIN state, it is final, and a
///   copying leg's FIN is the copy's to pass on, after the bytes queued on that leg.
async fn watch<'a>(
    ebpf: &'a Ebpf,
    spliced: Spliced,
    streams: [(&'a TcpStream, u64); 2],
    copied: &'a [AtomicU64; 2],
    cancel: impl Future<Output = ()>,
) -> io::Result<bool> {
    let mut cancel = pin!(cancel);
    let (a, b) = (streams[0].0, streams[1].0);
    let leg = |(s, base): (&'a TcpStream, u64), cookie| Leg {
        s,
        cookie,
        base,
        fin: false,
        forwarded: false,
        copying: false,
    };
    let mut legs = [leg(streams[0], spliced.a), leg(streams[1], spliced.b)];
    let mut copies: [Option<CopyTask<'a>>; 2] = [None, None];
    let mut backoff = DRAIN_POLL_MIN;
    loop {
        // FIN (or reset: CLOSE) state first, for both legs: an EPIPE below is judged against it.
        for l in legs.iter_mut().filter(|l| !l.fin && !l.copying) {
            l.fin = fin_received(l.s)?;
        }
        for i in 0..2 {
            let l = &mut legs[i];
            if !l.copying && !l.forwarded && ebpf.splice_copying(l.cookie) {
                info!(
                    fast_path = true,
                    leg = if i == 0 { "client" } else { "server" },
                    "in-flight bound reached: this direction is copied from now on"
                );
                l.copying = true;
                l.fin = false;
                let (to, to_base) = streams[1 - i];
                copies[i] = Some(Box::pin(fallback::copy_rest(
                    ebpf, l.cookie, l.s, to, to_base, &copied[i],
                )));
            }
        }
        for i in 0..2 {
            if let Some(e) = legs[i].s.take_error()? {
                // The other leg's FIN reached the end of this leg's forwarding queue (see above);
                // its state is re-read, as it may have changed since the pass above.
                let other = &mut legs[1 - i];
                if e.raw_os_error() != Some(libc::EPIPE)
                    || other.copying
                    || !(other.fin || fin_received(other.s)?)
                {
                    return Err(e);
                }
                other.fin = true;
            }
        }
        let mut progress = false;
        for i in 0..2 {
            let (me, other) = (&legs[i], &legs[1 - i]);
            if me.fin && !me.forwarded {
                let counted = ebpf.spliced_bytes(me.cookie);
                let given = written(other.s.as_raw_fd())?.wrapping_sub(other.base);
                if given >= counted {
                    shutdown_write(other.s.as_raw_fd());
                    legs[i].forwarded = true;
                    progress = true;
                } else if tcp_info(other.s.as_raw_fd())?.0 == TCP_CLOSE {
                    // Reset before it had everything (its write side is still ours to shut,
                    // so nothing else closes it): the rest can never be delivered.
                    return Err(io::ErrorKind::ConnectionReset.into());
                }
            }
        }
        if legs.iter().all(|l| l.forwarded) {
            return Ok(false);
        }
        let draining = legs.iter().any(|l| l.fin && !l.forwarded);
        // FINs, resets and errors wake the readiness futures; the kernel's forwarding progress
        // (while draining before a half-close) has no event, so it is polled, backing off.
        let pause = if draining {
            if progress {
                backoff = DRAIN_POLL_MIN;
            }
            let p = backoff;
            backoff = (backoff * 2).min(DRAIN_POLL_MAX);
            p
        } else {
            backoff = DRAIN_POLL_MIN;
            IDLE_POLL
        };
        let (fa, fb) = (
            legs[0].fin || legs[0].copying,
            legs[1].fin || legs[1].copying,
        );
        let [ca, cb] = &mut copies;
        tokio::select! {
            biased;
            _ = &mut cancel => return Ok(true),
            r = run(ca) => { r?; *ca = None; legs[0].fin = true; legs[0].forwarded = true; }
            r = run(cb) => { r?; *cb = None; legs[1].fin = true; legs[1].forwarded = true; }
            r = a.ready(Interest::READABLE), if !fa => { r?; clear_readiness(a); }
            r = b.ready(Interest::READABLE), if !fb => { r?; clear_readiness(b); }
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

type CopyTask<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

/// The copy if there is one, else never.
async fn run(copy: &mut Option<CopyTask<'_>>) -> io::Result<()> {
    match copy {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

const DRAIN_POLL_MIN: Duration = Duration::from_millis(1);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(8);
const IDLE_POLL: Duration = Duration::from_millis(200);
