//! `ztunnel cleanup`: removing eBPF state that no running ztunnel owns.
//!
//! A ztunnel killed without a graceful stop leaves its bpffs instance directory (see
//! [`crate::ebpf`]) on purpose: its pods fail closed until it returns. Two ways to end that:
//! - `--node NAME`, run in the network namespace the stopped ztunnel ran in, removes that
//!   instance's state — the operator's decision that it will not return.
//!   `--ebpf-instance NAME` does the same for the named instance a ztunnel started with
//!   `--ebpf-instance NAME` used (Kubernetes: ztunnel pods have a netns each), from anywhere;
//!   `--node NAME` falls back to it when nothing of the netns-keyed instance exists here.
//! - `--orphans` removes only instances whose network namespace no longer exists. Nothing can
//!   ever adopt those (the directory name carries the netns cookie, unique for the kernel's
//!   lifetime), so removing them is always safe — also next to live ztunnels, which it leaves
//!   alone. Local mode and the test suite run it to sweep what a killed run left. It never
//!   removes a named instance: nothing tells whether its ztunnel is gone for good or its next
//!   pod is about to adopt it (a rolling update; the old pod's netns is gone by design), and
//!   removing it would drop its pods' capture. Only `--ebpf-instance` removes those.
//!
//! `--node` also puts back every pod that instance enrolled ([`restore_pods`], from the
//! [`pod_record`]s): no nftables table, policy rule/route or changed sysctl stays in a pod.
//!
//! Owns finding orphans and restoring recorded pods; removing an instance's pins is
//! [`crate::ebpf::remove_dir`]'s job.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nix::sched::{CloneFlags, setns};

use crate::ebpf::{self, DirKind, EbpfError};
use crate::netns::Netns;
use crate::{origsrc, pod_record};

/// The netns-keyed instance directories under bpffs whose network namespace is gone (never a
/// named one).
pub fn orphaned_instance_dirs() -> io::Result<Vec<PathBuf>> {
    // Directories first, then the live namespaces: an instance created in between belongs to a
    // live process, whose namespace the second step then sees.
    let dirs: Vec<(PathBuf, u64)> = ebpf::instance_dirs()?
        .into_iter()
        .filter_map(|d| match ebpf::dir_kind(&d)? {
            DirKind::Netns { cookie } => Some((d, cookie)),
            DirKind::Named => None,
        })
        .collect();
    if dirs.is_empty() {
        return Ok(Vec::new());
    }
    let live = live_netns_cookies()?;
    Ok(dirs
        .into_iter()
        .filter(|(_, c)| !live.contains(c))
        .map(|(d, _)| d)
        .collect())
}

/// Removes every orphaned instance directory; returns those removed.
pub fn remove_orphans() -> Result<Vec<PathBuf>, EbpfError> {
    let dirs = orphaned_instance_dirs().map_err(|source| EbpfError::Io {
        what: "finding orphaned eBPF state".into(),
        source,
    })?;
    for d in &dirs {
        ebpf::remove_dir(d)?;
    }
    Ok(dirs)
}

/// Every network namespace that still exists, by cookie, with a path that opens it: those some
/// process is in, and those kept by a name under /run/netns (a namespace with neither is being
/// destroyed).
fn live_netns() -> io::Result<HashMap<u64, PathBuf>> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            paths.push(entry.path().join("ns/net"));
        }
    }
    if let Ok(named) = std::fs::read_dir("/run/netns") {
        paths.extend(named.flatten().map(|e| e.path()));
    }
    // One open handle per namespace (many processes share one).
    let mut seen = HashSet::new();
    let mut handles = Vec::new();
    for p in paths {
        // A process may exit while we look: skip what vanished.
        let Ok(file) = File::open(&p) else { continue };
        let Ok(meta) = file.metadata() else { continue };
        if seen.insert((meta.dev(), meta.ino())) {
            handles.push((file, p));
        }
    }
    // setns moves only the calling thread: do it on a thread of its own that then ends, so no
    // other thread of ours ever runs in a foreign namespace.
    std::thread::spawn(move || {
        let mut cookies = HashMap::new();
        for (ns, path) in handles {
            // A name under /run/netns that `ip netns del` has unmounted but not yet removed
            // is a plain file (EINVAL): no namespace, nothing to keep alive.
            if setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
                continue;
            }
            let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
            cookies.insert(ebpf::netns_cookie(s.as_raw_fd())?, path);
        }
        Ok(cookies)
    })
    .join()
    .map_err(|_| io::Error::other("netns cookie thread panicked"))?
}

fn live_netns_cookies() -> io::Result<HashSet<u64>> {
    live_netns().map(|m| m.into_keys().collect())
}

/// One pod `ztunnel cleanup` put back as it was before enrollment.
#[derive(Debug)]
pub struct RestoredPod {
    pub netns_cookie: u64,
    /// Where its namespace was found (`None`: gone, only the record was dropped).
    pub netns: Option<PathBuf>,
}

/// Takes back, in every pod the ztunnel instance `instance` enrolled (its [`pod_record`]s),
/// what enrollment left there: the nftables table, the source-preservation rule and route, and
/// the sysctls (restored to their recorded pre-enrollment values). Records of namespaces that
/// are gone are dropped. eBPF state is not touched here ([`crate::ebpf::remove_dir`]). Needs
/// [`crate::netns::init_host_netns`] first.
pub fn restore_pods(instance: &str) -> Result<Vec<RestoredPod>, CleanupError> {
    let records: Vec<_> = pod_record::all()
        .into_iter()
        .filter(|(_, r)| r.instance == instance)
        .collect();
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let live = live_netns().map_err(CleanupError::Scan)?;
    let mut done = Vec::new();
    for (cookie, record) in records {
        let Some(path) = live.get(&cookie) else {
            pod_record::forget(cookie);
            done.push(RestoredPod {
                netns_cookie: cookie,
                netns: None,
            });
            continue;
        };
        let ns = Netns::open(path).map_err(|e| CleanupError::Pod {
            netns: path.clone(),
            error: e.to_string(),
        })?;
        // A pid may have been reused between the scan and the open: act only on the cookie.
        if pod_record::cookie_of(&ns).ok() != Some(cookie) {
            continue;
        }
        let pod_err = |error: String| CleanupError::Pod {
            netns: path.clone(),
            error,
        };
        crate::capture::remove_nft(&ns).map_err(|e| pod_err(e.to_string()))?;
        origsrc::remove(&ns);
        for (sysctl, value) in &record.sysctls {
            ns.swap_sysctl(sysctl, value)
                .map_err(|e| pod_err(format!("restoring {sysctl}: {e}")))?;
        }
        pod_record::forget(cookie);
        done.push(RestoredPod {
            netns_cookie: cookie,
            netns: Some(path.clone()),
        });
    }
    Ok(done)
}

/// Drops the records of pods whose network namespace no longer exists (any instance).
pub fn remove_orphan_records() -> io::Result<usize> {
    let records = pod_record::all();
    if records.is_empty() {
        return Ok(0);
    }
    let live = live_netns_cookies()?;
    let mut n = 0;
    for (cookie, _) in records {
        if !live.contains(&cookie) {
            pod_record::forget(cookie);
            n += 1;
        }
    }
    Ok(n)
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("listing the machine's network namespaces (/proc/*/ns/net, /run/netns): {0}")]
    Scan(io::Error),
    #[error(
        "restoring the pod in {netns}: {error} (run again, or remove it by hand: nft table inet ztunnel, ip rule pref 1338, sysctls in /var/run/ztunnel/pods)"
    )]
    Pod { netns: PathBuf, error: String },
}
