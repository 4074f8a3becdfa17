//! Pre-flight facts of one node's filesystem, read under a root a test (or a pod with the
//! host's `/` mounted) points elsewhere: the kernel release (`proc/sys/kernel/osrelease`), BTF
//! (`sys/kernel/btf/vmlinux`), and the mounts (`proc/mounts`: cgroup2, bpffs, and cgroup v1
//! `net_cls`/`net_prio`, which turn cgroup socket hooks off). These are what ztunnel's eBPF
//! capture needs (README "Kernel requirements"); nftables capture needs none of the eBPF ones.
//! Owns only reading and judging these files.

use std::path::Path;

use crate::report::Report;

/// The oldest kernel eBPF capture runs on: sk_lookup (5.9), SO_NETNS_COOKIE (5.14) and the
/// netns cookie in sock_ops (5.15) (shared/notes/capture.md).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// How ztunnel captures, as the manifests configure it (`--capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// eBPF only: a missing eBPF prerequisite stops ztunnel.
    Ebpf,
    /// eBPF, else nftables (ztunnel's default): a missing prerequisite costs eBPF only.
    Auto,
    Nftables,
}

/// `6.18.0-1-amd64` → (6, 18).
pub fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The checks of the node whose root is `root`.
pub fn check(root: &Path, capture: Capture, report: &mut Report) {
    if capture == Capture::Nftables {
        report.pass("capture is nftables (--capture nftables): no eBPF prerequisites to check");
        return;
    }
    // A missing eBPF prerequisite is fatal with --capture ebpf; with auto, ztunnel falls back.
    let missing = |report: &mut Report, text: String, fix: String| match capture {
        Capture::Ebpf => report.fail(text, fix),
        _ => report.warn(
            format!("{text}: ztunnel will fall back to nftables capture"),
            Some(format!("for eBPF capture: {fix}")),
        ),
    };
    let (min_major, min_minor) = MIN_KERNEL;
    let osrelease = root.join("proc/sys/kernel/osrelease");
    match std::fs::read_to_string(&osrelease) {
        Ok(release) => match parse_kernel(&release) {
            Some(v) if v >= MIN_KERNEL => report.pass(format!(
                "kernel {} (≥ {min_major}.{min_minor})",
                release.trim()
            )),
            Some(_) => missing(
                report,
                format!(
                    "kernel {} is older than {min_major}.{min_minor}",
                    release.trim()
                ),
                format!("upgrade the node's kernel to {min_major}.{min_minor} or newer"),
            ),
            None => missing(
                report,
                format!("kernel release {:?} not understood", release.trim()),
                format!("make sure the node runs Linux {min_major}.{min_minor} or newer"),
            ),
        },
        Err(e) => missing(
            report,
            format!(
                "cannot read the kernel release ({}: {e})",
                osrelease.display()
            ),
            "run meshctl check on a node, or point --host-root at the node's / (or pass --no-host)"
                .to_string(),
        ),
    }
    let btf = root.join("sys/kernel/btf/vmlinux");
    if btf.is_file() {
        report.pass("kernel BTF present (/sys/kernel/btf/vmlinux)");
    } else {
        missing(
            report,
            "no kernel BTF (/sys/kernel/btf/vmlinux missing)".to_string(),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (the default of current Debian, Ubuntu, RHEL, Fedora and cloud images)".to_string(),
        );
    }
    let mounts_path = root.join("proc/mounts");
    let mounts = match std::fs::read_to_string(&mounts_path) {
        Ok(m) => m,
        Err(e) => {
            missing(
                report,
                format!("cannot read the mounts ({}: {e})", mounts_path.display()),
                "run meshctl check on a node, or point --host-root at the node's /".to_string(),
            );
            return;
        }
    };
    // `device mountpoint fstype options dump pass`, one mount a line.
    let entries: Vec<(&str, &str, &str)> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _device = f.next()?;
            Some((f.next()?, f.next()?, f.next().unwrap_or("")))
        })
        .collect();
    match entries.iter().find(|(_, fs, _)| *fs == "cgroup2") {
        Some((at, _, _)) => report.pass(format!("cgroup v2 mounted at {at}")),
        None => missing(
            report,
            "cgroup v2 is not mounted".to_string(),
            "boot with systemd.unified_cgroup_hierarchy=1 (hybrid is fine), or mount it: mount -t cgroup2 none /sys/fs/cgroup/unified".to_string(),
        ),
    }
    match entries.iter().find(|(_, fs, _)| *fs == "bpf") {
        Some((at, _, _)) => report.pass(format!("bpffs mounted at {at}")),
        None => missing(
            report,
            "bpffs is not mounted (ztunnel pins its eBPF state there)".to_string(),
            "mount -t bpf bpf /sys/fs/bpf, and keep it across reboots with the fstab line `bpf /sys/fs/bpf bpf defaults 0 0`".to_string(),
        ),
    }
    let v1_net = entries.iter().find(|(_, fs, opts)| {
        *fs == "cgroup" && opts.split(',').any(|o| o == "net_cls" || o == "net_prio")
    });
    if let Some((at, _, _)) = v1_net {
        missing(
            report,
            format!(
                "cgroup v1 net_cls/net_prio is mounted at {at} (it turns cgroup socket hooks off)"
            ),
            format!("unmount it (umount {at}) and stop whatever mounts it at boot"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases() {
        assert_eq!(parse_kernel("6.18.0-1-amd64\n"), Some((6, 18)));
        assert_eq!(parse_kernel("5.15.0"), Some((5, 15)));
        assert_eq!(parse_kernel("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_kernel("5.4.0").unwrap() < MIN_KERNEL);
        assert!(parse_kernel("5.16").unwrap() >= MIN_KERNEL);
        assert_eq!(parse_kernel("garbage"), None);
    }
}
