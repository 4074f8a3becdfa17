//! One pod's enrollment, whichever source decided it ([`crate::pods`]): the per-namespace
//! settings, ztunnel's in-pod listeners (outbound 15001 on loopback, inbound 15006 and HBONE
//! 15008 on all addresses), then capture — and taking all of it back. Also what the admin dump
//! and the fast path see of enrolled pods. Owns one pod at a time; never decides which pods.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use meshcore::proto::config::Workload;
use meshcore::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::capture::Enrollment;
use crate::exclusions::{excl_annotations, exclusions};
use crate::netns::Netns;
use crate::pod_netns::{NetnsId, netns_id};
use crate::proxy::{Ctx, Pod};
use crate::{inbound, origsrc, outbound};

pub struct Enrolled {
    pub pod: Arc<Pod>,
    /// The pod's network namespace, as [`crate::pod_netns`] compares them (read once at start).
    pub netns_id: Option<NetnsId>,
    tasks: Vec<JoinHandle<()>>,
    capture: Enrollment,
    /// The inbound plaintext listeners' fds (owned by `tasks`), for re-applying capture.
    inbound_fds: Vec<RawFd>,
    /// The exclusion annotations' raw values capture was last set up with.
    excl_annotations: [Option<String>; 2],
    /// The pod's [`POD_SYSCTLS`] values before enrollment, restored on unenroll.
    sysctls_before: Vec<(&'static str, String)>,
}

/// ztunnel dials each inbound connection's app inside the pod and, relaying the client's FIN,
/// closes first: every connection leaves a TIME_WAIT on one of ztunnel's ports, and at a few
/// thousand connections per second from one client the ~28k ports run out (EADDRNOTAVAIL).
/// With reuse on, a port in TIME_WAIT for over a second may be reused (safe with TCP
/// timestamps). The setting is per network namespace, so only enrolled pods are affected.
const TCP_TW_REUSE: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";

/// In a handover the next ztunnel's listeners join ours (SO_REUSEPORT); when ours close,
/// connections the kernel queued on them move to the next one instead of being reset.
const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// The app's socket for a connection ztunnel dials inherits the SYN's mark, so its replies to
/// a preserved client address find their way back to ztunnel ([`origsrc`]).
const TCP_FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// The kernel's own replies (the RST of a closed port) carry the mark of the packet they answer,
/// so those to ztunnel's marked dials from a client's address come back to ztunnel by the same
/// policy route ([`origsrc`]) instead of leaving the pod: a closed port answers 503 at once, not
/// after minutes of SYN retries, and no stray RST reaches the real client. Per family.
const FWMARK_REFLECT_V4: &str = "/proc/sys/net/ipv4/fwmark_reflect";
const FWMARK_REFLECT_V6: &str = "/proc/sys/net/ipv6/fwmark_reflect";

/// Per-namespace settings of an enrolled pod: (path, value, kernel default, what goes wrong
/// without it).
const POD_SYSCTLS: [(&str, &str, &str, &str); 5] = [
    (
        TCP_FWMARK_ACCEPT,
        "1",
        "0",
        "apps see ztunnel's connections come from their own pod IP",
    ),
    (
        FWMARK_REFLECT_V4,
        "1",
        "0",
        "IPv4 connections to a closed port hang until the dial times out",
    ),
    (
        FWMARK_REFLECT_V6,
        "1",
        "0",
        "IPv6 connections to a closed port hang until the dial times out",
    ),
    (TCP_TW_REUSE, "1", "2", "busy pods may run out of ports"),
    (
        TCP_MIGRATE_REQ,
        "1",
        "0",
        "a ztunnel handover resets connections queued on the old listeners",
    ),
];

/// Applies [`POD_SYSCTLS`]; returns what to restore on unenroll. A pod an earlier ztunnel
/// enrolled already holds our values, whose origin is lost: those restore to the default.
fn set_pod_sysctls(pod: &Pod) -> Vec<(&'static str, String)> {
    let mut before = Vec::new();
    for (path, value, default, without) in POD_SYSCTLS {
        match pod.netns.swap_sysctl(path, value) {
            Ok(old) if old.trim() == value => before.push((path, default.to_string())),
            Ok(old) => before.push((path, old)),
            Err(e) => {
                warn!(pod = %pod.workload.uid, sysctl = path, error = %e, "cannot set in the pod; {without}")
            }
        }
    }
    before
}

/// Sets the pod up and captures it: listeners first, capture only once something listens, so
/// no captured connection meets a closed port. On error nothing of it is left in the pod.
pub fn start(ctx: &Arc<Ctx>, w: Arc<Workload>, netns: Netns) -> anyhow::Result<Enrolled> {
    let mut pod = Pod::new(w, netns);
    let sysctls_before = crate::pod_record::remember(
        &pod.netns,
        &crate::pod_record::instance_name(ctx.capture.instance()),
        set_pod_sysctls(&pod),
    );
    pod.orig_src = preserve_source(&pod, &sysctls_before);
    let pod = Arc::new(pod);
    match listen_and_capture(ctx, &pod) {
        Ok((tasks, inbound_fds, capture)) => Ok(Enrolled {
            netns_id: netns_id(&pod.netns),
            sysctls_before,
            excl_annotations: excl_annotations(&pod.workload),
            pod,
            tasks,
            capture,
            inbound_fds,
        }),
        Err(e) => {
            undo_pod_setup(&pod, &sysctls_before);
            Err(e)
        }
    }
}

type Listening = (Vec<JoinHandle<()>>, Vec<RawFd>, Enrollment);

/// Opens the pod's listeners and points capture at them; on error aborts what it started.
fn listen_and_capture(ctx: &Arc<Ctx>, pod: &Arc<Pod>) -> anyhow::Result<Listening> {
    let mut tasks = Vec::new();
    let mut inbound_fds = Vec::new();
    let v4_any = Ipv4Addr::UNSPECIFIED.into();
    let v6_any = Ipv6Addr::UNSPECIFIED.into();
    let listeners = [
        (
            Kind::Outbound,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
        ),
        (
            Kind::Outbound,
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT),
        ),
        (
            Kind::Plaintext,
            SocketAddr::new(v4_any, INBOUND_PLAINTEXT_PORT),
        ),
        (
            Kind::Plaintext,
            SocketAddr::new(v6_any, INBOUND_PLAINTEXT_PORT),
        ),
        (Kind::Hbone, SocketAddr::new(v4_any, HBONE_PORT)),
        (Kind::Hbone, SocketAddr::new(v6_any, HBONE_PORT)),
    ];
    for (kind, addr) in listeners {
        let listener = match pod.netns.listen(addr) {
            Ok(l) => l,
            // A pod without IPv6 still gets IPv4 service.
            Err(e) if addr.is_ipv6() => {
                warn!(pod = %pod.workload.uid, %addr, error = %e, "no IPv6 listener in pod");
                continue;
            }
            Err(e) => {
                tasks.iter().for_each(|t: &JoinHandle<()>| t.abort());
                anyhow::bail!("listen on {addr} in {}: {e}", pod.netns.path().display());
            }
        };
        // Every listener: eBPF capture hands new connections to exactly these sockets, never to
        // another member of their SO_REUSEPORT group. Each lives as long as its task; unenroll
        // removes the map entries first.
        inbound_fds.push(listener.as_raw_fd());
        let (ctx, pod) = (ctx.clone(), pod.clone());
        tasks.push(tokio::spawn(async move {
            match kind {
                Kind::Outbound => outbound::serve(ctx, pod, listener).await,
                Kind::Plaintext => inbound::serve_plaintext(ctx, pod, listener).await,
                Kind::Hbone => inbound::serve_hbone(ctx, pod, listener).await,
            }
        }));
    }
    let excl = exclusions(&pod.workload);
    let ips: Vec<std::net::IpAddr> = pod.ips.iter().copied().collect();
    match ctx.capture.enroll(&pod.netns, &inbound_fds, &ips, &excl) {
        Ok(capture) => Ok((tasks, inbound_fds, capture)),
        Err(e) => {
            tasks.iter().for_each(|t| t.abort());
            Err(e.into())
        }
    }
}

/// Gives an enrolled pod a new view of itself (labels, identity: what its listeners, policy
/// and telemetry read) without a gap: new listeners join the old ones' SO_REUSEPORT groups,
/// capture moves to them, then the old ones close (queued connections migrate,
/// `tcp_migrate_req`). Open connections keep the view they started with. On error the pod
/// keeps its old listeners and capture.
pub fn refresh(ctx: &Arc<Ctx>, e: &mut Enrolled, w: Arc<Workload>) -> anyhow::Result<()> {
    let mut pod = Pod::new(w, e.pod.netns.try_clone()?);
    pod.orig_src = e.pod.orig_src;
    let pod = Arc::new(pod);
    let (tasks, inbound_fds, capture) = listen_and_capture(ctx, &pod)?;
    for t in std::mem::replace(&mut e.tasks, tasks) {
        t.abort();
    }
    replace_local_pod(ctx, &e.pod, &pod);
    e.inbound_fds = inbound_fds;
    e.capture = capture;
    e.excl_annotations = excl_annotations(&pod.workload);
    e.pod = pod;
    Ok(())
}

/// Applies changed exclusion annotations to an enrolled pod in place (both modes replace their
/// per-pod state atomically), so its listeners and open connections are untouched.
pub fn update_exclusions(ctx: &Ctx, uid: &str, e: &mut Enrolled, w: &Workload) {
    let now = excl_annotations(w);
    if now == e.excl_annotations {
        return;
    }
    let excl = exclusions(w);
    let ips: Vec<std::net::IpAddr> = e.pod.ips.iter().copied().collect();
    match ctx
        .capture
        .enroll(&e.pod.netns, &e.inbound_fds, &ips, &excl)
    {
        Ok(capture) => {
            e.capture = capture;
            e.excl_annotations = now;
            info!(pod = %uid, outbound = ?excl.outbound, inbound = ?excl.inbound, "port exclusions updated");
        }
        // Keep the old record: the next reconcile retries.
        Err(err) => error!(pod = %uid, error = %err, "updating port exclusions failed; will retry"),
    }
}

/// Makes an enrolled pod visible: in the admin dump under `key` (`extra`'s fields added) and
/// to the fast path under its workload uid.
pub fn register(ctx: &Ctx, key: &str, e: &Enrolled, extra: serde_json::Value) {
    let mut entry = serde_json::json!({
        "uid": e.pod.workload.uid, "identity": e.pod.identity.to_string(), "ips": e.pod.workload.ips,
        "netns": e.pod.netns.path().display().to_string(), "capture": ctx.capture.mode().to_string(),
    });
    if let (Some(entry), serde_json::Value::Object(extra)) = (entry.as_object_mut(), extra) {
        entry.extend(extra);
    }
    ctx.enrolled
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.to_string(), entry);
    ctx.local_pods
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(e.pod.workload.uid.clone(), e.pod.clone());
}

/// The fast path's entry for `old`'s workload becomes `new`, unless another pod took it.
fn replace_local_pod(ctx: &Ctx, old: &Arc<Pod>, new: &Arc<Pod>) {
    let mut pods = ctx.local_pods.lock().unwrap_or_else(|p| p.into_inner());
    if pods
        .get(&old.workload.uid)
        .is_some_and(|p| Arc::ptr_eq(p, old))
    {
        pods.remove(&old.workload.uid);
    }
    pods.insert(new.workload.uid.clone(), new.clone());
}

/// Closes a pod's listeners, leaving its capture (a restart: it fails closed until a ztunnel
/// adopts it).
pub fn close(uid: &str, e: Enrolled) {
    for t in e.tasks {
        t.abort();
    }
    info!(pod = %uid, "listeners closed; capture kept (fails closed until a ztunnel returns)");
}

/// Unenrolls: capture first, then what enrollment set in the pod, then the listeners.
pub fn stop(ctx: &Ctx, uid: &str, e: Enrolled) {
    ctx.enrolled
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(uid);
    {
        // Only this pod's entry: a pod re-created under the same name may hold it already.
        let mut pods = ctx.local_pods.lock().unwrap_or_else(|p| p.into_inner());
        if pods
            .get(&e.pod.workload.uid)
            .is_some_and(|p| Arc::ptr_eq(p, &e.pod))
        {
            pods.remove(&e.pod.workload.uid);
        }
    }
    if let Err(err) = ctx.capture.unenroll(&e.pod.netns, e.capture) {
        // The namespace may already be gone with its pod; nothing of ours can remain then.
        warn!(pod = %uid, error = %err, "removing capture failed");
    }
    undo_pod_setup(&e.pod, &e.sysctls_before);
    for t in e.tasks {
        t.abort();
    }
    info!(pod = %uid, "pod unenrolled");
}

/// Sets the pod up so its apps see their clients' addresses ([`origsrc`]); false (logged) when
/// it cannot be, and apps then see connections from their own pod IP.
fn preserve_source(pod: &Pod, sysctls_set: &[(&'static str, String)]) -> bool {
    if !sysctls_set.iter().any(|(p, _)| *p == TCP_FWMARK_ACCEPT) {
        return false;
    }
    let ips: Vec<std::net::IpAddr> = pod.ips.iter().copied().collect();
    match origsrc::install(&pod.netns, &ips) {
        Ok(()) => true,
        Err(e) => {
            warn!(pod = %pod.workload.uid, error = %e, "cannot preserve client addresses; the app will see its own pod IP as the peer");
            false
        }
    }
}

/// Takes back what enrollment set in the pod's namespace (capture aside).
fn undo_pod_setup(pod: &Pod, sysctls_before: &[(&'static str, String)]) {
    origsrc::remove(&pod.netns);
    for (path, before) in sysctls_before {
        let _ = pod.netns.swap_sysctl(path, before);
    }
    crate::pod_record::release(&pod.netns);
}

#[derive(Clone, Copy)]
enum Kind {
    Outbound,
    Plaintext,
    Hbone,
}
