//! Owns run identity and what outlives a run: run ids (which encode the owning pid), the
//! per-run scratch directory with its `owner` file, `sweep_stale` (removes what dead runs left)
//! and `leftovers` (lists everything of ours that still exists).
//!
//! Naming: run id `<pid>-<hex tag>`; netns `mtb<run id>-<suffix>`; scratch dir
//! `/tmp/mesh-testbed/<run id>` holding `owner` (`<pid> <starttime>`), `pids` (one line per
//! spawned process) and the logs. A dir kept on purpose (panic or TESTBED_KEEP=1) also holds
//! `KEPT`; its logs survive `sweep_stale` and it is not reported by `leftovers`.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::TestbedError;
use crate::netns;
use crate::proc::{PIDFILE, proc_stat, same_process_alive};

/// Prefix of every network namespace the testbed creates.
pub(crate) const NETNS_PREFIX: &str = "mtb";
/// Parent of all per-run scratch directories.
pub const SCRATCH_ROOT: &str = "/tmp/mesh-testbed";
const OWNER_FILE: &str = "owner";
pub(crate) const KEPT_MARKER: &str = "KEPT";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Creates a fresh, unique run id and its scratch directory (the atomic `create_dir` is what
/// guarantees uniqueness across threads and processes).
pub(crate) fn new_run() -> Result<(String, PathBuf), TestbedError> {
    let root = Path::new(SCRATCH_ROOT);
    std::fs::create_dir_all(root)
        .map_err(|e| TestbedError::io(format!("creating {}", root.display()), e))?;
    let pid = std::process::id();
    let me = proc_stat(pid).map(|s| s.start_time).unwrap_or(0);
    let existing = netns::list();
    for _ in 0..64 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(n);
        let run_id = format!("{pid}-{:02x}{:04x}", n % 256, h.finish() & 0xffff);
        let prefix = format!("{NETNS_PREFIX}{run_id}-");
        if existing.iter().any(|n| n.starts_with(&prefix)) {
            continue;
        }
        let dir = root.join(&run_id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                let owner = dir.join(OWNER_FILE);
                std::fs::write(&owner, format!("{pid} {me}\n"))
                    .map_err(|e| TestbedError::io(format!("writing {}", owner.display()), e))?;
                return Ok((run_id, dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(TestbedError::io(format!("creating {}", dir.display()), e)),
        }
    }
    Err(TestbedError::Invalid(
        "could not find an unused run id".into(),
    ))
}

/// The run id in a testbed netns name (`mtb<pid>-<tag>-<suffix>`), if it is one of ours.
pub(crate) fn run_of_netns(name: &str) -> Option<String> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let tag = parts.next()?;
    parts.next()?;
    let valid = !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && !tag.is_empty()
        && tag.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| format!("{pid}-{tag}"))
}

fn owner_pid(run_id: &str) -> Option<u32> {
    run_id.split('-').next()?.parse().ok()
}

/// A run is stale when its owner is gone: dead pid, or (if the owner file says when it
/// started) a different process now holding that pid.
fn is_stale(run_id: &str) -> bool {
    let Some(pid) = owner_pid(run_id) else {
        return false;
    };
    let owner = Path::new(SCRATCH_ROOT).join(run_id).join(OWNER_FILE);
    let recorded = std::fs::read_to_string(owner).ok().and_then(|s| {
        s.split_whitespace()
            .nth(1)
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|&t| t != 0)
    });
    match recorded {
        Some(start) => !same_process_alive(pid, start),
        None => proc_stat(pid).is_none(),
    }
}

/// Run directories under the scratch root whose names look like run ids.
fn run_dirs() -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(SCRATCH_ROOT) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            owner_pid(&name)?;
            Some((name, e.path()))
        })
        .collect()
}

/// Processes recorded in a run dir's pidfile that are still the same live process.
fn live_procs(dir: &Path) -> Vec<(u32, String)> {
    let Ok(text) = std::fs::read_to_string(dir.join(PIDFILE)) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let pid: u32 = f.next()?.parse().ok()?;
            let start: u64 = f.next()?.parse().ok()?;
            let label = f.next().unwrap_or("").to_string();
            same_process_alive(pid, start).then_some((pid, label))
        })
        .collect()
}

/// Removes leftovers (netns, scratch dirs, processes) of earlier runs whose owning process is
/// dead. Call at the start of tests/demo. Returns what was removed. Scratch dirs kept on
/// purpose (panic, TESTBED_KEEP=1) keep their logs; their processes are still killed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for (run_id, dir) in run_dirs() {
        if !is_stale(&run_id) {
            continue;
        }
        for (pid, label) in live_procs(&dir) {
            let group_leader = proc_stat(pid).is_some_and(|s| s.pgrp == pid as i32);
            if group_leader {
                let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            removed.push(format!("process {pid} ({label}) (run {run_id})"));
        }
        if !dir.join(KEPT_MARKER).exists() && std::fs::remove_dir_all(&dir).is_ok() {
            removed.push(format!("dir {} (run {run_id})", dir.display()));
        }
    }
    for name in netns::list() {
        let Some(run_id) = run_of_netns(&name) else {
            continue;
        };
        if is_stale(&run_id) && netns::delete(&name).is_ok() {
            removed.push(format!("netns {name} (run {run_id})"));
        }
    }
    for run_id in crate::cgroups::runs() {
        if is_stale(&run_id) && crate::cgroups::remove_run(&run_id).is_ok() {
            removed.push(format!("cgroups of run {run_id} (run {run_id})"));
        }
    }
    removed
}

/// Everything of ours that still exists: netns with our prefix, scratch dirs (except ones kept
/// on purpose for their logs) and live processes recorded in any run's pidfile. Each entry
/// ends with `(run <run id>)`, so a test can pick out its own run.
pub fn leftovers() -> Vec<String> {
    let mut left: Vec<String> = netns::list()
        .into_iter()
        .filter_map(|n| run_of_netns(&n).map(|run_id| format!("netns {n} (run {run_id})")))
        .collect();
    for (run_id, dir) in run_dirs() {
        for (pid, label) in live_procs(&dir) {
            left.push(format!("process {pid} ({label}) (run {run_id})"));
        }
        if !dir.join(KEPT_MARKER).exists() {
            left.push(format!("dir {} (run {run_id})", dir.display()));
        }
    }
    for run_id in crate::cgroups::runs() {
        let dir = crate::cgroups::run_dir(&run_id).unwrap_or_default();
        left.push(format!("cgroup {} (run {run_id})", dir.display()));
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_netns_names() {
        assert_eq!(
            run_of_netns("mtb123-1abcd-n0").as_deref(),
            Some("123-1abcd")
        );
        assert_eq!(
            run_of_netns("mtb123-1abcd-a-client").as_deref(),
            Some("123-1abcd")
        );
        assert_eq!(run_of_netns("mtb123-1abcd"), None);
        assert_eq!(run_of_netns("mtbx-1-n0"), None);
        assert_eq!(run_of_netns("other"), None);
    }
}
