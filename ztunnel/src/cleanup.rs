//! `ztunnel cleanup`: removing eBPF state that no running ztunnel owns.
//!
//! A ztunnel killed without a graceful stop leaves its bpffs instance directory (see
//! [`crate::ebpf`]) on purpose: its pods fail closed until it returns. Two ways to end that:
//! - `--node NAME`, run in the network namespace the stopped ztunnel ran in, removes that
//!   instance's state — the operator's decision that it will not return.
//! - `--orphans` removes only instances whose network namespace no longer exists. Nothing can
//!   ever adopt those (the directory name carries the netns cookie, unique for the kernel's
//!   lifetime), so removing them is always safe — also next to live ztunnels, which it leaves
//!   alone. Local mode and the test suite run it to sweep what a killed run left.
//!
//! Owns finding orphans; removing an instance's pins is [`crate::ebpf::remove_dir`]'s job.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

use crate::ebpf::{self, EbpfError};

/// The instance directories under bpffs whose network namespace is gone.
pub fn orphaned_instance_dirs() -> io::Result<Vec<PathBuf>> {
    // Directories first, then the live namespaces: an instance created in between belongs to a
    // live process, whose namespace the second step then sees.
    let dirs = ebpf::instance_dirs()?;
    if dirs.is_empty() {
        return Ok(dirs);
    }
    let live = live_netns_cookies()?;
    Ok(dirs
        .into_iter()
        .filter(|d| instance_cookie(d).is_some_and(|c| !live.contains(&c)))
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

/// The netns cookie in an instance directory's name (`ztunnel-<node>-<cookie hex>`).
fn instance_cookie(dir: &Path) -> Option<u64> {
    let name = dir.file_name()?.to_str()?;
    let (_, hex) = name.rsplit_once('-')?;
    u64::from_str_radix(hex, 16).ok()
}

/// Cookies of every network namespace that still exists: those some process is in, and those
/// kept by a name under /run/netns (a namespace with neither is being destroyed).
fn live_netns_cookies() -> io::Result<HashSet<u64>> {
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
            handles.push(file);
        }
    }
    // setns moves only the calling thread: do it on a thread of its own that then ends, so no
    // other thread of ours ever runs in a foreign namespace.
    std::thread::spawn(move || {
        let mut cookies = HashSet::new();
        for ns in handles {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
            cookies.insert(ebpf::netns_cookie(s.as_raw_fd())?);
        }
        Ok(cookies)
    })
    .join()
    .map_err(|_| io::Error::other("netns cookie thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_is_the_last_dash_field_in_hex() {
        let d = Path::new("/sys/fs/bpf/ztunnel-node-0-a2ef");
        assert_eq!(instance_cookie(d), Some(0xa2ef));
        assert_eq!(instance_cookie(Path::new("/sys/fs/bpf/ztunnel-x-zz")), None);
    }
}
