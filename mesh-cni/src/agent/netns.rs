//! Finding and opening pods' network namespaces, safely: a path from the plugin or a config
//! file is opened only if what it names is a network namespace (nsfs, NS_GET_NSTYPE) and not
//! the agent's own or the host's; a pod found by scanning host /proc is the one whose cgroup
//! names its UID. Owns these opens only; never enters a namespace.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Where local mode's (and `ip netns`') namespace bind mounts live; the only places a config
/// file's `mesh.local/netns` may point to.
pub const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];
/// The most of one /proc/<pid>/cgroup read.
const MAX_CGROUP: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not a network namespace")]
    NotNetns(String),
    #[error("{0} is the node's own network namespace, not a pod's")]
    HostNetns(String),
    #[error("{0} is not a path under /run/netns or /var/run/netns")]
    Outside(String),
}

/// A namespace's identity (device, inode) and the ones a pod's must not be.
#[derive(Clone, Debug)]
pub struct Forbidden {
    ids: Vec<(u64, u64)>,
}

impl Forbidden {
    /// The agent's own netns and the host's (`<host_proc>/1/ns/net`), where they can be read.
    pub fn new(host_proc: &Path) -> Forbidden {
        let ids = ["/proc/self/ns/net".into(), host_proc.join("1/ns/net")]
            .iter()
            .filter_map(|p: &PathBuf| std::fs::metadata(p).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        Forbidden { ids }
    }
}

/// Opens `path` if it is a pod's network namespace. Anything else — a regular file, a FIFO,
/// another namespace type, the node's own namespace — is refused before or right after the
/// open (O_NONBLOCK so a FIFO cannot hang the agent).
pub fn open_checked(path: &str, forbidden: &Forbidden) -> Result<OwnedFd, NetnsError> {
    let err = |source| NetnsError::Open {
        path: path.to_string(),
        source,
    };
    if !path.starts_with('/')
        || Path::new(path)
            .components()
            .any(|c| c == Component::ParentDir)
    {
        return Err(NetnsError::NotNetns(path.to_string()));
    }
    // nsfs files stat as regular files; refusing everything else first means no device is
    // ever opened.
    let md = std::fs::metadata(path).map_err(err)?;
    if !md.is_file() {
        return Err(NetnsError::NotNetns(path.to_string()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?;
    let fd = OwnedFd::from(file);
    check_fd(&fd, path, forbidden)?;
    Ok(fd)
}

/// `fd` is a network namespace and not a forbidden one.
fn check_fd(fd: &OwnedFd, path: &str, forbidden: &Forbidden) -> Result<(), NetnsError> {
    let nsfs = nix::sys::statfs::fstatfs(fd)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false);
    // NS_GET_NSTYPE = _IO(0xb7, 0x3): the namespace's CLONE_NEW* type.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without an argument on an fd we own; it reads nothing from our memory.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if !nsfs || kind != libc::CLONE_NEWNET {
        return Err(NetnsError::NotNetns(path.to_string()));
    }
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| NetnsError::Open {
        path: path.to_string(),
        source: e.into(),
    })?;
    #[allow(clippy::unnecessary_cast)]
    let id = (st.st_dev as u64, st.st_ino as u64);
    if forbidden.ids.contains(&id) {
        return Err(NetnsError::HostNetns(path.to_string()));
    }
    Ok(())
}

/// A config file's `mesh.local/netns` annotation → the namespace, only under [`NETNS_DIRS`]
/// and only one name deep (no `..`, no subdirectories).
pub fn open_annotated(path: &str, forbidden: &Forbidden) -> Result<OwnedFd, NetnsError> {
    let p = Path::new(path);
    let parent_ok = p
        .parent()
        .and_then(Path::to_str)
        .is_some_and(|d| NETNS_DIRS.contains(&d));
    let name_ok = matches!(p.components().next_back(), Some(Component::Normal(_)));
    if !parent_ok || !name_ok {
        return Err(NetnsError::Outside(path.to_string()));
    }
    open_checked(path, forbidden)
}

/// Whether `uid` may be searched for in cgroup paths: a Kubernetes UID (hex and dashes).
fn plausible_uid(uid: &str) -> bool {
    (8..=64).contains(&uid.len()) && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Whether one /proc/<pid>/cgroup text names pod `uid`: cgroupfs `pod<uid>` or systemd
/// `pod<uid with _>`, ending the path component (so one uid is never a prefix of another).
fn cgroup_names(text: &str, uid: &str) -> bool {
    let forms = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
    forms.iter().any(|form| {
        text.match_indices(form.as_str()).any(|(at, _)| {
            let before = text[..at].chars().next_back();
            let after = text[at + form.len()..].chars().next();
            matches!(before, Some('/') | Some('-'))
                && matches!(after, None | Some('/') | Some('.') | Some('\n'))
        })
    })
}

fn read_cgroup(host_proc: &Path, pid: &str) -> Option<String> {
    let mut text = String::new();
    File::open(host_proc.join(pid).join("cgroup"))
        .ok()?
        .take(MAX_CGROUP)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// Scans `host_proc` once for processes of the pods `uids` and opens each pod's network
/// namespace (from the first of its processes whose namespace passes the checks). The cgroup
/// is read again after the open, so a pid reused in between is not mistaken for the pod.
pub fn find_by_uid(
    host_proc: &Path,
    uids: &[String],
    forbidden: &Forbidden,
) -> HashMap<String, OwnedFd> {
    let mut found = HashMap::new();
    let wanted: Vec<&String> = uids.iter().filter(|u| plausible_uid(u)).collect();
    if wanted.is_empty() {
        return found;
    }
    let Ok(entries) = std::fs::read_dir(host_proc) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Some(text) = read_cgroup(host_proc, pid) else {
            continue;
        };
        for uid in &wanted {
            if found.contains_key(*uid) || !cgroup_names(&text, uid) {
                continue;
            }
            let path = host_proc.join(pid).join("ns/net");
            let Some(path) = path.to_str() else { continue };
            let Ok(fd) = open_checked(path, forbidden) else {
                continue;
            };
            if read_cgroup(host_proc, pid).is_some_and(|t| cgroup_names(&t, uid)) {
                found.insert((*uid).clone(), fd);
            }
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-aaaa-bbbb-cccc-000000000001";

    #[test]
    fn cgroup_forms() {
        let cgroupfs = format!("0::/kubepods/besteffort/pod{UID}/abc\n");
        let systemd = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope\n",
            UID.replace('-', "_")
        );
        assert!(cgroup_names(&cgroupfs, UID));
        assert!(cgroup_names(&systemd, UID));
        let longer = format!("0::/kubepods/pod{UID}9/x\n");
        assert!(!cgroup_names(&longer, UID), "a uid prefix is not a match");
        assert!(!cgroup_names("0::/user.slice\n", UID));
    }

    #[test]
    fn only_netns_paths_under_the_netns_dirs() {
        let f = Forbidden::new(Path::new("/proc"));
        for bad in [
            "/etc/passwd",
            "/run/netns/../../proc/1/ns/net",
            "relative",
            "/run/netns",
        ] {
            assert!(open_annotated(bad, &f).is_err(), "{bad}");
        }
        assert!(matches!(
            open_checked("/etc/hostname", &f),
            Err(NetnsError::NotNetns(_)) | Err(NetnsError::Open { .. })
        ));
        assert!(matches!(
            open_checked("/proc/self/ns/net", &f),
            Err(NetnsError::HostNetns(_))
        ));
        assert!(matches!(
            open_checked("/proc/self/ns/uts", &f),
            Err(NetnsError::NotNetns(_))
        ));
    }
}
