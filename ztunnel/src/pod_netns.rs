//! A pod's network namespace as enrollment receives it — by path from the config (local mode's
//! annotation) or as an fd from the CNI agent (ZDS) — and the checks that it is a pod's: never
//! the host's, ztunnel's own (the node's), or one already enrolled as another pod. Also reads a
//! handed-over namespace's addresses. Owns no listeners and no capture.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::netns::Netns;

/// Where pod network namespaces are bound in local mode (`ip netns`); a netns path from the
/// config must lie here (the Kubernetes mode hands namespaces over by fd instead).
pub const POD_NETNS_DIRS: [&str; 2] = ["/run/netns/", "/var/run/netns/"];

/// A network namespace's identity: (device, inode) of its nsfs file.
pub type NetnsId = (u64, u64);

pub fn netns_id(netns: &Netns) -> Option<NetnsId> {
    use std::os::unix::fs::MetadataExt;
    netns.file().metadata().ok().map(|m| (m.dev(), m.ino()))
}

fn path_netns_id(path: &str) -> Option<NetnsId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A network namespace that must not be enrolled.
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
    #[error("{0} is not a network namespace (entering it failed: {1})")]
    NotNetns(String, std::io::Error),
}

/// Opens a pod's network namespace from the path the config names, refusing anything that is
/// not a pod's: the config is not trusted to name the host's, the node's, or another enrolled
/// pod's namespace (capture there would redirect traffic that is not the pod's).
pub fn open_pod_netns(path: &str, taken: &[NetnsId]) -> Result<Netns, NetnsRefused> {
    let p = Path::new(path);
    let normal = p.is_absolute()
        && !p
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if !normal || !POD_NETNS_DIRS.iter().any(|d| path.starts_with(d)) {
        return Err(NetnsRefused::OutsidePodDirs(path.to_string()));
    }
    let netns = Netns::open(p).map_err(|e| NetnsRefused::Open(path.to_string(), e))?;
    refuse_non_pod(&netns, path, taken)?;
    Ok(netns)
}

/// Takes a pod's network namespace handed over as an fd (ZDS `add`), with the same refusals as
/// [`open_pod_netns`]; the agent is not trusted to hand over the host's or the node's either.
/// `what` names it in errors and logs (e.g. `pod <uid>`).
pub fn adopt_pod_netns(fd: OwnedFd, what: &str, taken: &[NetnsId]) -> Result<Netns, NetnsRefused> {
    let label = format!("netns fd of {what}");
    let netns = Netns::from_fd(fd, PathBuf::from(&label));
    // Entering it proves it is a network namespace (setns checks the type).
    netns
        .run(|| Ok(()))
        .map_err(|e| NetnsRefused::NotNetns(label.clone(), e))?;
    refuse_non_pod(&netns, &label, taken)?;
    Ok(netns)
}

fn refuse_non_pod(netns: &Netns, name: &str, taken: &[NetnsId]) -> Result<(), NetnsRefused> {
    let id = netns_id(netns);
    if id.is_some() && id == path_netns_id("/proc/1/ns/net") {
        return Err(NetnsRefused::Host(name.to_string()));
    }
    if id.is_some() && id == path_netns_id("/proc/self/ns/net") {
        return Err(NetnsRefused::Node(name.to_string()));
    }
    if id.is_some_and(|id| taken.contains(&id)) {
        return Err(NetnsRefused::Duplicate(name.to_string()));
    }
    Ok(())
}

/// The pod's addresses: those on its interfaces other than loopback, link-local excluded (every
/// IPv6 interface has one; none is the pod's address in the mesh).
pub fn netns_ips(netns: &Netns) -> std::io::Result<Vec<IpAddr>> {
    use nix::net::if_::InterfaceFlags;
    let addrs = netns.run(|| nix::ifaddrs::getifaddrs().map_err(std::io::Error::from))?;
    let mut ips: Vec<IpAddr> = addrs
        .filter(|a| !a.flags.contains(InterfaceFlags::IFF_LOOPBACK))
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
            IpAddr::V6(v6) => {
                !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified()
            }
        })
        .collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::privileged;

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

    struct Rm(String);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    fn add_netns(name: &str) -> Del {
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip (iproute2)");
        assert!(ok.success(), "ip netns add {name}");
        Del(name.to_string())
    }

    /// A pod-looking path that leads to the host's namespace (a symlink under /run/netns) or
    /// to one already enrolled is refused. Needs root (writes under /run/netns).
    #[test]
    fn netns_of_the_host_or_another_pod_is_refused() {
        if !privileged() {
            return;
        }
        std::fs::create_dir_all("/run/netns").expect("root is needed to write /run/netns");
        let link = format!("/run/netns/zt-unit-host-{}", std::process::id());
        let _ = std::fs::remove_file(&link);
        // The test's own namespace: the node's from ztunnel's point of view (and the host's
        // too, where /proc/1 can be read).
        std::os::unix::fs::symlink("/proc/self/ns/net", &link).expect("symlink in /run/netns");
        let _rm = Rm(link.clone());
        let r = open_pod_netns(&link, &[]);
        assert!(
            matches!(r, Err(NetnsRefused::Host(_) | NetnsRefused::Node(_))),
            "{r:?}"
        );
        // A real pod namespace is accepted once; a second path to it is another pod's.
        let name = format!("zt-unit-pod-{}", std::process::id());
        let _del = add_netns(&name);
        let alias = format!("/run/netns/zt-unit-alias-{}", std::process::id());
        let _ = std::fs::remove_file(&alias);
        std::os::unix::fs::symlink(format!("/run/netns/{name}"), &alias).expect("symlink");
        let _rm_alias = Rm(alias.clone());
        let first = open_pod_netns(&format!("/run/netns/{name}"), &[]).expect("a pod's netns");
        let taken = [netns_id(&first).expect("stat")];
        let r = open_pod_netns(&alias, &taken);
        assert!(matches!(r, Err(NetnsRefused::Duplicate(_))), "{r:?}");
    }

    /// The same refusals for an fd (ZDS): ztunnel's own namespace, another enrolled pod's, and
    /// an fd that is no network namespace at all; a pod's namespace is adopted and its
    /// addresses read (loopback and link-local left out).
    #[test]
    fn adopted_fds_are_checked_and_addresses_read() {
        if !privileged() {
            return;
        }
        crate::netns::init_host_netns().expect("host netns");
        let fd = |p: &str| OwnedFd::from(std::fs::File::open(p).expect("open"));
        let r = adopt_pod_netns(fd("/proc/self/ns/net"), "pod own", &[]);
        assert!(
            matches!(r, Err(NetnsRefused::Host(_) | NetnsRefused::Node(_))),
            "{r:?}"
        );
        let r = adopt_pod_netns(fd("/proc/self/ns/mnt"), "pod mnt", &[]);
        assert!(matches!(r, Err(NetnsRefused::NotNetns(..))), "{r:?}");
        let r = adopt_pod_netns(fd("/etc/hostname"), "pod file", &[]);
        assert!(matches!(r, Err(NetnsRefused::NotNetns(..))), "{r:?}");
        let name = format!("zt-unit-fd-{}", std::process::id());
        let _del = add_netns(&name);
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip")
                .args(["-n", &name])
                .args(args)
                .status()
                .expect("ip");
            assert!(ok.success(), "ip {args:?}");
        };
        ip(&["link", "add", "zt0", "type", "veth", "peer", "name", "zt1"]);
        ip(&["link", "set", "zt1", "up"]);
        ip(&["link", "set", "lo", "up"]);
        ip(&["link", "set", "zt0", "up"]);
        ip(&["addr", "add", "10.77.0.5/24", "dev", "zt0"]);
        ip(&["addr", "add", "fd77::5/64", "dev", "zt0", "nodad"]);
        let path = format!("/run/netns/{name}");
        let pod = adopt_pod_netns(fd(&path), "pod a", &[]).expect("a pod's netns");
        let ips = netns_ips(&pod).expect("addresses");
        assert_eq!(
            ips,
            vec![
                "10.77.0.5".parse::<IpAddr>().unwrap(),
                "fd77::5".parse().unwrap()
            ]
        );
        let taken = [netns_id(&pod).expect("stat")];
        let r = adopt_pod_netns(fd(&path), "pod b", &taken);
        assert!(matches!(r, Err(NetnsRefused::Duplicate(_))), "{r:?}");
    }
}
