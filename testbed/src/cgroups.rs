//! Pods' cgroups, as a kubelet makes them: each pod's processes live in
//! `<cgroup2>/mesh-testbed/<run id>/kubepods/pod<uid>` (cgroupfs driver naming), so what finds
//! a running pod by its UID in `/proc/<pid>/cgroup` — the mesh-cni agent after a restart or a
//! namespace label — finds local mode's pods as it finds a node's. No controller is enabled:
//! the cgroups only name the processes.
//!
//! Owns those directories: making them, removing a run's tree (when its cluster drops, and when
//! a dead run's leftovers are swept) and listing what is left. Moving a process in is
//! `proc`'s (in the child, before exec).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::TestbedError;

/// Our subtree of the cgroup2 hierarchy.
const OURS: &str = "mesh-testbed";

/// Where cgroup2 is mounted (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a
/// hybrid one), from /proc/mounts.
pub(crate) fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(at))
    })
}

fn run_root(run_id: &str) -> Option<PathBuf> {
    Some(cgroup2_mount()?.join(OURS).join(run_id))
}

/// Creates (if absent) the cgroup of pod `uid` in run `run_id`; returns its directory.
pub(crate) fn pod_cgroup(run_id: &str, uid: &str) -> Result<PathBuf, TestbedError> {
    let tame = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !tame {
        return Err(TestbedError::Invalid(format!(
            "pod uid {uid:?}: a cgroup name needs 1-64 letters, digits or '-'"
        )));
    }
    let root = run_root(run_id).ok_or_else(|| {
        TestbedError::Invalid("no cgroup2 mount in /proc/mounts: pods need a cgroup".into())
    })?;
    let dir = root.join("kubepods").join(format!("pod{uid}"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| TestbedError::io(format!("creating cgroup {}", dir.display()), e))?;
    Ok(dir)
}

/// Removes run `run_id`'s cgroup tree, deepest first. Its processes must be dead: a cgroup
/// empties a moment after its last process exits, so each rmdir is retried briefly.
pub(crate) fn remove_run(run_id: &str) -> Result<(), TestbedError> {
    let Some(root) = run_root(run_id) else {
        return Ok(());
    };
    if !root.exists() {
        return Ok(());
    }
    let mut dirs = Vec::new();
    collect(&root, &mut dirs);
    // Children were pushed after their parents.
    for dir in dirs.iter().rev() {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(TestbedError::io(
                        format!("removing cgroup {}", dir.display()),
                        e,
                    ));
                }
            }
        }
    }
    Ok(())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect(&e.path(), out);
        }
    }
}

/// Run ids that have a cgroup tree.
pub(crate) fn runs() -> Vec<String> {
    let Some(mount) = cgroup2_mount() else {
        return Vec::new();
    };
    std::fs::read_dir(mount.join(OURS))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect()
}

/// The directory of run `run_id`'s tree (for reports).
pub(crate) fn run_dir(run_id: &str) -> Option<PathBuf> {
    run_root(run_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_that_is_not_a_plain_name_makes_no_cgroup() {
        for bad in ["", "../../escape", "a/b", "pod uid", &"x".repeat(65)] {
            assert!(
                matches!(
                    pod_cgroup("no-such-run", bad),
                    Err(TestbedError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
    }
}
