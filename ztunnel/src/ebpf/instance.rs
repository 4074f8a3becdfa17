//! Which ztunnel instance a process is, and the name of its bpffs directory: the one place that
//! writes and parses instance directory names, so orphan detection ([`crate::cleanup`]) can
//! never misread one kind as the other. Two kinds:
//!
//! - keyed by the process's network namespace (the default), `ztunnel-<node>-<netns cookie
//!   hex>`: local mode runs several meshes with the same node names on one kernel, each ztunnel
//!   in its node's netns, and a restart in the same netns finds its instance again. The cookie
//!   is unique for the kernel's lifetime, so a directory whose netns is gone is an orphan.
//! - named (`--ebpf-instance NAME`), `ztunnel@<NAME>`: Kubernetes runs ztunnel without host
//!   network, each ztunnel pod in a netns of its own, so the next pod of a rolling update must
//!   find the instance by a name that does not change (the node's) to adopt its pins instead
//!   of attaching a second set of hooks. `@` is not in any node name and not in the
//!   cookie-keyed prefix `ztunnel-`, which older binaries also match on: they leave it alone.
//!
//! Owns naming only; loading and removing what is pinned there is [`super`]'s business.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::{BPFFS, EbpfError, io_err, netns_cookie};

const NETNS_PREFIX: &str = "ztunnel-";
const NAMED_PREFIX: &str = "ztunnel@";
/// A bpffs entry name is at most 255 bytes (NAME_MAX), prefix included.
pub const MAX_NAME: usize = 255 - NAMED_PREFIX.len();

/// One ztunnel instance: whose pins a process loads, adopts and removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Instance {
    /// Keyed by the node and the network namespace this process runs in.
    NodeNetns { node: String },
    /// `--ebpf-instance NAME`: the same from every network namespace.
    Named(String),
}

/// What an instance directory's name says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirKind {
    /// Keyed by the network namespace with this cookie: an orphan once it is gone.
    Netns { cookie: u64 },
    /// Named: nothing says whether its ztunnel will return.
    Named,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "bad eBPF instance name {0:?}: use 1 to {MAX_NAME} ASCII letters, digits, '.', '-' or '_', starting with a letter or digit (the node name, as the DaemonSet passes it)"
)]
pub struct BadName(pub String);

/// Checks an `--ebpf-instance` value (also clap's value parser).
pub fn valid_name(name: &str) -> Result<String, BadName> {
    let ok = name.len() <= MAX_NAME
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(BadName(name.to_string()))
    }
}

impl Instance {
    /// The instance of `node`: named if `name` is given (validated), else keyed by this
    /// process's network namespace.
    pub fn new(node: &str, name: Option<&str>) -> Result<Instance, BadName> {
        match name {
            Some(n) => Ok(Instance::Named(valid_name(n)?)),
            None => Ok(Instance::NodeNetns {
                node: node.to_string(),
            }),
        }
    }

    /// The instance's directory name under bpffs (also the name pod records give it).
    pub fn dir_name(&self) -> Result<String, EbpfError> {
        match self {
            Instance::NodeNetns { node } => {
                let safe: String = node
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                Ok(format!("{NETNS_PREFIX}{safe}-{:x}", own_netns_cookie()?))
            }
            // Validated again: an `Instance` can be built without `new`.
            Instance::Named(name) => Ok(format!("{NAMED_PREFIX}{}", valid_name(name)?)),
        }
    }

    /// The instance's bpffs directory.
    pub fn dir(&self) -> Result<PathBuf, EbpfError> {
        Ok(Path::new(BPFFS).join(self.dir_name()?))
    }
}

/// What `dir`'s name says about it (`None`: not an instance directory).
pub fn dir_kind(dir: &Path) -> Option<DirKind> {
    let name = dir.file_name()?.to_str()?;
    if let Some(rest) = name.strip_prefix(NAMED_PREFIX) {
        return valid_name(rest).ok().map(|_| DirKind::Named);
    }
    let (_, hex) = name.strip_prefix(NETNS_PREFIX)?.rsplit_once('-')?;
    let cookie = u64::from_str_radix(hex, 16).ok()?;
    Some(DirKind::Netns { cookie })
}

/// Every ztunnel instance directory under bpffs, of both kinds (any node, live or not).
pub fn instance_dirs() -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(BPFFS) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| dir_kind(p).is_some())
        .collect())
}

fn own_netns_cookie() -> Result<u64, EbpfError> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(io_err("socket for SO_NETNS_COOKIE"))?;
    netns_cookie(s.as_raw_fd()).map_err(io_err("getsockopt(SO_NETNS_COOKIE) (kernel 5.14+)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_dirs_are_never_read_as_cookie_keyed() {
        let named = Instance::new("ignored", Some("node-1")).unwrap();
        let dir = named.dir().unwrap();
        assert_eq!(dir, Path::new("/sys/fs/bpf/ztunnel@node-1"));
        // "ztunnel-node-1" would be node "node", cookie 1 (the initial netns).
        assert_eq!(dir_kind(&dir), Some(DirKind::Named));
        assert_eq!(
            dir_kind(Path::new("/sys/fs/bpf/ztunnel-node-0-a2ef")),
            Some(DirKind::Netns { cookie: 0xa2ef })
        );
        assert_eq!(dir_kind(Path::new("/sys/fs/bpf/ztunnel-x-zz")), None);
        assert_eq!(dir_kind(Path::new("/sys/fs/bpf/ztunnel@")), None);
        assert_eq!(dir_kind(Path::new("/sys/fs/bpf/other")), None);
    }

    #[test]
    fn netns_keyed_dir_carries_this_netns_cookie() {
        let i = Instance::new("node/0", None).unwrap();
        let name = i.dir_name().unwrap();
        assert!(name.starts_with("ztunnel-node_0-"), "{name}");
        let Some(DirKind::Netns { cookie }) = dir_kind(Path::new(&name)) else {
            panic!("{name} is not cookie-keyed");
        };
        assert_eq!(cookie, own_netns_cookie().unwrap());
    }

    #[test]
    fn hostile_names_are_refused_with_what_to_use() {
        for bad in [
            "",
            "..",
            ".x",
            "a/b",
            "a b",
            "-x",
            "ä",
            &"a".repeat(MAX_NAME + 1),
        ] {
            let e = Instance::new("n", Some(bad)).expect_err(bad);
            assert!(e.to_string().contains("letters, digits"), "{e}");
        }
        assert!(Instance::new("n", Some(&"a".repeat(MAX_NAME))).is_ok());
        assert!(Instance::new("n", Some("ip-10-0-1-7.ec2.internal")).is_ok());
        // A Named built directly is checked when its directory is named.
        assert!(Instance::Named("../x".into()).dir().is_err());
    }
}
