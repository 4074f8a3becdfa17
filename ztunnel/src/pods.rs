//! Enrollment: which pods of this node are in the mesh, and their in-pod listeners and capture.
//!
//! Reconciles the config against what is running: a local pod that is `captured` and has a
//! network namespace gets listeners (outbound 15001 on loopback, inbound 15006 and HBONE 15008
//! on all addresses) and then capture; a pod that leaves (label removed, deleted) loses capture
//! first, then its listeners. On shutdown the listeners close; capture stays in place (pods
//! fail closed until a ztunnel adopts them) unless told to unenroll everything ([`OnExit`]).
//! Certificates are prefetched as soon as a pod appears. Owns pod lifecycles only.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshcore::proto::config::Workload;
use meshcore::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::capture::{Enrollment, Exclusions};
use crate::netns::Netns;
use crate::proxy::{Ctx, Pod};
use crate::{inbound, origsrc, outbound};

struct Enrolled {
    pod: Arc<Pod>,
    /// The pod's network namespace, as [`open_pod_netns`] compares them (read once at start).
    netns_id: Option<NetnsId>,
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

/// What a stopping ztunnel does to the pods it enrolled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    /// A restart (the default, and what a DaemonSet rollout is): capture stays, so a pod's
    /// connections fail until the next ztunnel adopts it, and none leaves unencrypted.
    KeepCapture,
    /// Removing ztunnel from the node: every pod goes back to direct, plaintext traffic.
    Unenroll,
}

/// Runs until `shutdown` flips to true, then closes every pod's listeners and, with
/// [`OnExit::Unenroll`], removes its capture.
pub async fn run(ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>, on_exit: OnExit) {
    let mut config = ctx.config.clone();
    let mut enrolled: HashMap<String, Enrolled> = HashMap::new();
    // Also retry on a timer: a pod whose netns could not be entered yet gets another chance.
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut swept = false;
    loop {
        reconcile(&ctx, &mut enrolled);
        // Once the first config is applied, whatever an earlier run left enrolled and we did
        // not enroll again belongs to pods that are gone or left the mesh.
        if !swept && ctx.config.borrow().is_some() {
            ctx.capture.sweep();
            swept = true;
        }
        tokio::select! {
            r = config.changed() => if r.is_err() { break },
            _ = tick.tick() => {},
            _ = shutdown.changed() => break,
        }
    }
    for (uid, e) in enrolled.drain() {
        match on_exit {
            OnExit::Unenroll => stop(&ctx, &uid, e),
            OnExit::KeepCapture => {
                for t in e.tasks {
                    t.abort();
                }
                info!(pod = %uid, "listeners closed; capture kept (fails closed until a ztunnel returns)");
            }
        }
    }
}

fn wanted(ctx: &Ctx) -> HashMap<String, Arc<Workload>> {
    let Some(store) = ctx.config.borrow().clone() else {
        return HashMap::new();
    };
    store
        .local_workloads(&ctx.node)
        .filter(|w| w.captured && !w.netns.is_empty() && !w.ips.is_empty())
        .map(|w| (w.uid.clone(), w.clone()))
        .collect()
}

fn reconcile(ctx: &Arc<Ctx>, enrolled: &mut HashMap<String, Enrolled>) {
    let want = wanted(ctx);
    let identities: HashSet<_> = want
        .values()
        .map(|w| meshcore::store::workload_identity(w))
        .collect();
    for id in &identities {
        ctx.certs.prefetch(id);
    }
    let stale: Vec<String> = enrolled
        .iter()
        .filter(|(uid, e)| want.get(*uid).is_none_or(|w| !same_pod(w, &e.pod.workload)))
        .map(|(uid, _)| uid.clone())
        .collect();
    for uid in stale {
        if let Some(e) = enrolled.remove(&uid) {
            stop(ctx, &uid, e);
        }
    }
    for (uid, w) in want {
        if let Some(e) = enrolled.get_mut(&uid) {
            update_exclusions(ctx, &uid, e, &w);
            continue;
        }
        let taken: Vec<NetnsId> = enrolled.values().filter_map(|e| e.netns_id).collect();
        match start(ctx, w, &taken) {
            Ok(e) => {
                ctx.enrolled.lock().unwrap_or_else(|p| p.into_inner()).insert(uid.clone(), serde_json::json!({
                    "uid": uid, "identity": e.pod.identity.to_string(), "ips": e.pod.workload.ips,
                    "netns": e.pod.netns.path().display().to_string(), "capture": ctx.capture.mode().to_string(),
                }));
                ctx.local_pods
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(uid.clone(), e.pod.clone());
                info!(pod = %uid, identity = %e.pod.identity, netns = %e.pod.netns.path().display(), capture = %ctx.capture.mode(), "pod enrolled");
                enrolled.insert(uid, e);
            }
            Err(err) => error!(pod = %uid, error = %err, "pod enrollment failed; will retry"),
        }
    }
    ctx.certs.retain(&identities);
    prune_metrics(ctx);
}

/// Drops the metric series of workloads the config no longer has (pods churn; series must not
/// pile up).
fn prune_metrics(ctx: &Ctx) {
    let Some(store) = ctx.config.borrow().clone() else {
        return;
    };
    let workloads: HashSet<(&str, &str)> = store
        .workloads()
        .map(|w| (w.namespace.as_str(), w.name.as_str()))
        .collect();
    let pruned = ctx
        .metrics
        .prune(|ns, name| workloads.contains(&(ns, name)));
    if pruned > 0 {
        tracing::debug!(
            series = pruned,
            "pruned metric series of workloads that are gone"
        );
    }
}

/// Whether a config change leaves the pod's proxy valid as it is.
fn same_pod(a: &Workload, b: &Workload) -> bool {
    a.ips == b.ips
        && a.netns == b.netns
        && a.service_account == b.service_account
        && a.namespace == b.namespace
        && a.trust_domain == b.trust_domain
}

fn excl_annotations(w: &Workload) -> [Option<String>; 2] {
    [EXCLUDE_OUTBOUND_ANNOTATION, EXCLUDE_INBOUND_ANNOTATION].map(|k| w.annotations.get(k).cloned())
}

/// Applies changed exclusion annotations to an enrolled pod in place (both modes replace their
/// per-pod state atomically), so its listeners and open connections are untouched.
fn update_exclusions(ctx: &Ctx, uid: &str, e: &mut Enrolled, w: &Workload) {
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

fn start(ctx: &Arc<Ctx>, w: Arc<Workload>, taken: &[NetnsId]) -> anyhow::Result<Enrolled> {
    let netns = open_pod_netns(&w.netns, taken)?;
    let mut pod = Pod::new(w, netns);
    let sysctls_before = set_pod_sysctls(&pod);
    pod.orig_src = preserve_source(&pod, &sysctls_before);
    let pod = Arc::new(pod);
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
                undo_pod_setup(&pod, &sysctls_before);
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
    // Capture only once something listens, so no captured connection meets a closed port.
    let excl = exclusions(&pod.workload);
    let ips: Vec<std::net::IpAddr> = pod.ips.iter().copied().collect();
    match ctx.capture.enroll(&pod.netns, &inbound_fds, &ips, &excl) {
        Ok(capture) => Ok(Enrolled {
            netns_id: netns_id(&pod.netns),
            sysctls_before,
            excl_annotations: excl_annotations(&pod.workload),
            pod,
            tasks,
            capture,
            inbound_fds,
        }),
        Err(e) => {
            tasks.iter().for_each(|t| t.abort());
            undo_pod_setup(&pod, &sysctls_before);
            Err(e.into())
        }
    }
}

/// Where pod network namespaces are bound in local mode (`ip netns`); a netns path from the
/// config must lie here (the Kubernetes mode hands namespaces over by fd instead).
pub const POD_NETNS_DIRS: [&str; 2] = ["/run/netns/", "/var/run/netns/"];

/// A network namespace's identity: (device, inode) of its nsfs file.
pub type NetnsId = (u64, u64);

fn netns_id(netns: &Netns) -> Option<NetnsId> {
    use std::os::unix::fs::MetadataExt;
    netns.file().metadata().ok().map(|m| (m.dev(), m.ino()))
}

fn path_netns_id(path: &str) -> Option<NetnsId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A netns path from the config that must not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum NetnsRefused {
    #[error("netns path {0:?} is not under {dirs} (pods' namespaces live there)", dirs = POD_NETNS_DIRS.join(" or "))]
    OutsidePodDirs(String),
    #[error("netns {0:?} is the host's network namespace, not a pod's")]
    Host(String),
    #[error(
        "netns {0:?} is the network namespace ztunnel itself runs in (the node's), not a pod's"
    )]
    Node(String),
    #[error("netns {0:?} is already enrolled as another pod's")]
    Duplicate(String),
    #[error("cannot open netns {0:?}: {1}")]
    Open(String, std::io::Error),
}

/// Opens a pod's network namespace from the path the config names, refusing anything that is
/// not a pod's: the config is not trusted to name the host's, the node's, or another enrolled
/// pod's namespace (capture there would redirect traffic that is not the pod's).
fn open_pod_netns(path: &str, taken: &[NetnsId]) -> Result<Netns, NetnsRefused> {
    let p = Path::new(path);
    let normal = p.is_absolute()
        && !p
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if !normal || !POD_NETNS_DIRS.iter().any(|d| path.starts_with(d)) {
        return Err(NetnsRefused::OutsidePodDirs(path.to_string()));
    }
    let netns = Netns::open(p).map_err(|e| NetnsRefused::Open(path.to_string(), e))?;
    let id = netns_id(&netns);
    if id.is_some() && id == path_netns_id("/proc/1/ns/net") {
        return Err(NetnsRefused::Host(path.to_string()));
    }
    if id.is_some() && id == path_netns_id("/proc/self/ns/net") {
        return Err(NetnsRefused::Node(path.to_string()));
    }
    if id.is_some_and(|id| taken.contains(&id)) {
        return Err(NetnsRefused::Duplicate(path.to_string()));
    }
    Ok(netns)
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
}

/// Istio's per-pod port exclusion annotations (comma-separated destination ports).
pub const EXCLUDE_OUTBOUND_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_INBOUND_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// The pod's port exclusions, from its annotations. A malformed annotation is logged (pod and
/// annotation named) and ignored as a whole; the other annotation still applies.
fn exclusions(w: &Workload) -> Exclusions {
    let get = |k: &str| w.annotations.get(k).map(String::as_str);
    let (excl, errors) = exclusions_from(
        get(EXCLUDE_OUTBOUND_ANNOTATION),
        get(EXCLUDE_INBOUND_ANNOTATION),
    );
    for e in errors {
        warn!(pod = %w.uid, annotation = e.annotation, value = %e.value, error = %e.reason,
            "ignoring malformed port exclusion annotation");
    }
    excl
}

/// A port exclusion annotation that could not be parsed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{annotation}={value:?}: {reason}")]
pub struct ExclusionError {
    pub annotation: &'static str,
    pub value: String,
    pub reason: String,
}

/// Parses the two annotation values (comma-separated ports 1-65535, blanks around entries
/// allowed). An annotation with any bad entry is ignored entirely and reported; the other one
/// still counts.
pub fn exclusions_from(
    outbound: Option<&str>,
    inbound: Option<&str>,
) -> (Exclusions, Vec<ExclusionError>) {
    let mut errors = Vec::new();
    let mut parse = |annotation: &'static str, v: Option<&str>| -> Vec<u16> {
        let Some(v) = v else { return Vec::new() };
        match parse_ports(v) {
            Ok(p) => p,
            Err(reason) => {
                errors.push(ExclusionError {
                    annotation,
                    value: v.to_string(),
                    reason,
                });
                Vec::new()
            }
        }
    };
    let excl = Exclusions {
        outbound: parse(EXCLUDE_OUTBOUND_ANNOTATION, outbound),
        inbound: parse(EXCLUDE_INBOUND_ANNOTATION, inbound),
    };
    (excl, errors)
}

fn parse_ports(v: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for entry in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match entry.parse::<u16>() {
            Ok(p) if p != 0 => ports.push(p),
            _ => return Err(format!("{entry:?} is not a port (1-65535)")),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

#[derive(Clone, Copy)]
enum Kind {
    Outbound,
    Plaintext,
    Hbone,
}

fn stop(ctx: &Ctx, uid: &str, e: Enrolled) {
    ctx.enrolled
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(uid);
    ctx.local_pods
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(uid);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusion_annotations_parse_ports() {
        let (e, errs) = exclusions_from(Some("9090, 5432,,9090"), Some("15020"));
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(e.outbound, vec![5432, 9090]);
        assert_eq!(e.inbound, vec![15020]);
        assert_eq!(
            exclusions_from(None, Some("")),
            (Exclusions::default(), vec![])
        );
    }

    #[test]
    fn netns_paths_outside_pod_dirs_are_refused() {
        for path in [
            "/proc/1/ns/net",
            "/proc/self/ns/net",
            "run/netns/x",
            "/run/netns/../../proc/1/ns/net",
            "/tmp/x",
            "",
        ] {
            assert!(
                matches!(
                    open_pod_netns(path, &[]),
                    Err(NetnsRefused::OutsidePodDirs(_))
                ),
                "{path:?} must be refused"
            );
        }
    }

    /// A pod-looking path that leads to the host's namespace (a symlink under /run/netns) or
    /// to one already enrolled is refused. Needs root (writes under /run/netns).
    #[test]
    fn netns_of_the_host_or_another_pod_is_refused() {
        if std::env::var("MESH_SKIP_PRIVILEGED").as_deref() == Ok("1") {
            eprintln!("!!! SKIPPING privileged test: MESH_SKIP_PRIVILEGED=1 !!!");
            return;
        }
        std::fs::create_dir_all("/run/netns").expect("root is needed to write /run/netns");
        let link = format!("/run/netns/zt-unit-host-{}", std::process::id());
        let _ = std::fs::remove_file(&link);
        // The test's own namespace: the node's from ztunnel's point of view (and the host's
        // too, where /proc/1 can be read).
        std::os::unix::fs::symlink("/proc/self/ns/net", &link).expect("symlink in /run/netns");
        struct Rm(String);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let _rm = Rm(link.clone());
        let r = open_pod_netns(&link, &[]);
        assert!(
            matches!(r, Err(NetnsRefused::Host(_) | NetnsRefused::Node(_))),
            "{r:?}"
        );
        // A real pod namespace is accepted once; a second path to it is another pod's.
        let name = format!("zt-unit-pod-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (iproute2)");
        assert!(ok.success(), "ip netns add {name}");
        struct Del(String);
        impl Drop for Del {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.0])
                    .status();
            }
        }
        let _del = Del(name.clone());
        let alias = format!("/run/netns/zt-unit-alias-{}", std::process::id());
        let _ = std::fs::remove_file(&alias);
        std::os::unix::fs::symlink(format!("/run/netns/{name}"), &alias).expect("symlink");
        let _rm_alias = Rm(alias.clone());
        let first = open_pod_netns(&format!("/run/netns/{name}"), &[]).expect("a pod's netns");
        let taken = [netns_id(&first).expect("stat")];
        let r = open_pod_netns(&alias, &taken);
        assert!(matches!(r, Err(NetnsRefused::Duplicate(_))), "{r:?}");
    }

    #[test]
    fn malformed_exclusion_annotation_is_ignored_alone() {
        for bad in ["junk", "80,0", "70000", "80;81", "-1"] {
            let (e, errs) = exclusions_from(Some(bad), Some("8080"));
            assert_eq!(e.outbound, Vec::<u16>::new(), "{bad}");
            assert_eq!(
                e.inbound,
                vec![8080],
                "{bad}: the other annotation must still apply"
            );
            assert_eq!(errs.len(), 1, "{bad}");
            assert_eq!(errs[0].annotation, EXCLUDE_OUTBOUND_ANNOTATION);
        }
    }
}
