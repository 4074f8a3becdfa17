//! The on-disk record of what enrollment changed in a pod, so that it can be undone by someone
//! who was not there: a restarted ztunnel adopting a pod (whose sysctls already hold our
//! values), and `ztunnel cleanup --node` after ztunnel is gone (which must also find the
//! pods, in nftables mode nothing in the kernel lists them).
//!
//! One file per pod under [`DIR`], named by the pod's netns cookie (unique for the kernel's
//! lifetime, so no two meshes on one machine collide, and /var/run is gone with the cookies on
//! reboot): the ztunnel instance that enrolled it (as [`crate::ebpf::Instance`] names it)
//! and each sysctl's value before enrollment. Records are read as hostile: only
//! `/proc/sys/net/` paths and short numeric values are ever written back. Owns the records;
//! not the pods' settings themselves ([`crate::enroll`]) nor their removal ([`crate::cleanup`]).

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::netns::Netns;

/// Where records live (Istio's ztunnel state directory; a hostPath in Kubernetes).
pub const DIR: &str = "/var/run/ztunnel/pods";

/// One pod's record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// The enrolling ztunnel's instance name (`ztunnel-<node>-<netns cookie>`, `ztunnel@<name>`).
    pub instance: String,
    /// (sysctl path, value before enrollment).
    pub sysctls: Vec<(String, String)>,
}

impl Record {
    fn render(&self) -> String {
        let mut s = format!("instance {}\n", self.instance);
        for (p, v) in &self.sysctls {
            s += &format!("sysctl {p} {v}\n");
        }
        s
    }

    /// Parses a record, dropping every line that is not exactly what [`Record::render`] writes
    /// for a safe sysctl.
    pub fn parse(text: &str) -> Record {
        let mut r = Record::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["instance", name] if name.len() < 256 => r.instance = name.to_string(),
                ["sysctl", path, value] if safe_sysctl(path, value) => {
                    r.sysctls.push((path.to_string(), value.to_string()))
                }
                _ => {}
            }
        }
        r
    }

    /// The recorded value of `path`, if any.
    pub fn value(&self, path: &str) -> Option<&str> {
        self.sysctls
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, v)| v.as_str())
    }
}

/// A per-netns networking sysctl and a plain number: nothing else is written back.
fn safe_sysctl(path: &str, value: &str) -> bool {
    path.starts_with("/proc/sys/net/")
        && !path.contains("..")
        && path.len() < 128
        && !value.is_empty()
        && value.len() < 32
        && value.bytes().all(|b| b.is_ascii_digit())
}

/// The name records give `instance` (its bpffs directory's).
pub fn instance_name(instance: &crate::ebpf::Instance) -> String {
    instance.dir_name().unwrap_or_default()
}

/// The netns cookie of `ns` (a socket opened inside it).
pub fn cookie_of(ns: &Netns) -> io::Result<u64> {
    let s = ns.run(|| socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None))?;
    crate::ebpf::netns_cookie(s.as_raw_fd())
}

fn path_for(cookie: u64) -> PathBuf {
    Path::new(DIR).join(format!("{cookie:x}"))
}

/// Reads the record of the pod whose netns cookie is `cookie`.
pub fn read(cookie: u64) -> Option<Record> {
    std::fs::read_to_string(path_for(cookie))
        .ok()
        .map(|t| Record::parse(&t))
}

/// Writes (replaces) the record of `cookie` (atomically: a crash leaves the old or the new).
pub fn write(cookie: u64, record: &Record) -> io::Result<()> {
    std::fs::create_dir_all(DIR)?;
    let path = path_for(cookie);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, record.render())?;
    std::fs::rename(&tmp, &path)
}

/// Removes the record of `cookie` (absent is fine).
pub fn forget(cookie: u64) {
    let _ = std::fs::remove_file(path_for(cookie));
}

/// Every record: (netns cookie, record).
pub fn all() -> Vec<(u64, Record)> {
    let Ok(entries) = std::fs::read_dir(DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let cookie = u64::from_str_radix(e.file_name().to_str()?, 16).ok()?;
            Some((cookie, read(cookie)?))
        })
        .collect()
}

/// Enrollment's hook: records what `applied` changed in `ns` for `instance`, keeping the values
/// of an earlier record (an adopted pod's settings already hold ours). Returns the values to
/// restore on unenroll: `applied` with each entry replaced by the recorded original, if any.
/// Failures are logged: the pod is still enrolled, only an after-the-fact cleanup cannot
/// restore its settings.
pub fn remember(
    ns: &Netns,
    instance: &str,
    applied: Vec<(&'static str, String)>,
) -> Vec<(&'static str, String)> {
    let cookie = match cookie_of(ns) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(netns = %ns.path().display(), error = %e, "cannot record the pod's settings; `ztunnel cleanup` will not restore them");
            return applied;
        }
    };
    let earlier = read(cookie).unwrap_or_default();
    let before: Vec<(&'static str, String)> = applied
        .into_iter()
        .map(|(p, v)| match earlier.value(p) {
            Some(orig) => (p, orig.to_string()),
            None => (p, v),
        })
        .collect();
    let record = Record {
        instance: instance.to_string(),
        sysctls: before
            .iter()
            .filter(|(p, v)| safe_sysctl(p, v))
            .map(|(p, v)| (p.to_string(), v.clone()))
            .collect(),
    };
    if let Err(e) = write(cookie, &record) {
        tracing::warn!(netns = %ns.path().display(), error = %e, "cannot record the pod's settings; `ztunnel cleanup` will not restore them");
    }
    before
}

/// Unenrollment's hook: the pod is back as it was, nothing to remember.
pub fn release(ns: &Netns) {
    if let Ok(c) = cookie_of(ns) {
        forget(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_hostile_lines_are_dropped() {
        let r = Record {
            instance: "ztunnel-node-0-a2".into(),
            sysctls: vec![("/proc/sys/net/ipv4/tcp_tw_reuse".into(), "0".into())],
        };
        assert_eq!(Record::parse(&r.render()), r);
        let hostile = "instance x\n\
            sysctl /proc/sys/kernel/core_pattern 1\n\
            sysctl /proc/sys/net/../kernel/x 1\n\
            sysctl /proc/sys/net/ipv4/tcp_tw_reuse |sh\n\
            sysctl /proc/sys/net/ipv4/tcp_tw_reuse 1 2\n";
        assert!(Record::parse(hostile).sysctls.is_empty());
    }
}
