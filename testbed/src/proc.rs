//! Owns processes the testbed starts: spawning a command inside a netns (the netns file is
//! opened before the fork, `setns` runs in `pre_exec`), its combined log file, the per-run
//! pidfile that lets `leftovers`/`sweep_stale` find our processes later, and `Proc`, the
//! handle that kills its process (group) on drop unless detached.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::TestbedError;
use crate::netns::{Netns, command_line};

/// File in a run directory listing `<pid> <starttime> <label>` per spawned process.
pub(crate) const PIDFILE: &str = "pids";

/// The kernel's view of a live process: its start time (clock ticks since boot, field 22 of
/// /proc/<pid>/stat) and process group, or None if it is gone or a zombie.
pub(crate) struct ProcStat {
    pub start_time: u64,
    pub pgrp: i32,
}

pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | None) {
        return None;
    }
    Some(ProcStat {
        start_time: fields.get(19)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
    })
}

/// True if `pid` is alive and is the same process that started at `start_time`.
pub(crate) fn same_process_alive(pid: u32, start_time: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start_time == start_time)
}

/// The child and what we know about it; shared by the `Proc` handle and the `Cluster`, which
/// kills whatever is still running when it drops.
#[derive(Debug)]
pub(crate) struct ProcShared {
    child: Mutex<Child>,
    pid: u32,
    pub(crate) netns: String,
    log_path: PathBuf,
}

impl ProcShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn try_wait(&self) -> std::io::Result<Option<ExitStatus>> {
        self.poll_locked(&mut self.lock())
    }

    /// Reaps the child if it has exited. Just before reaping, whatever is left of its process
    /// group is killed: the unreaped zombie still holds the pid, so the group id cannot have
    /// been reused by then. (Once reaped, the group is never signalled again.)
    fn poll_locked(&self, child: &mut Child) -> std::io::Result<Option<ExitStatus>> {
        // SAFETY: siginfo_t is plain data; waitid with WNOWAIT only inspects our own child.
        let exited = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
            libc::waitid(libc::P_PID, self.pid, &mut info, flags) == 0 && info.si_pid() != 0
        };
        if exited {
            let _ = kill(Pid::from_raw(-(self.pid as i32)), Signal::SIGKILL);
        }
        child.try_wait()
    }

    /// Sends `sig` to the process and its process group, but only while it is not yet reaped
    /// (the lock keeps anyone from reaping it meanwhile), so the pid cannot have been reused.
    fn signal(&self, sig: Signal) {
        let mut child = self.lock();
        if matches!(self.poll_locked(&mut child), Ok(None)) {
            let pid = self.pid as i32;
            let _ = kill(Pid::from_raw(-pid), sig);
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    /// SIGKILL to the process group, then reap.
    pub(crate) fn kill_and_reap(&self) {
        self.signal(Signal::SIGKILL);
        let _ = self.lock().wait();
    }

    fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Ok(Some(status)) = self.try_wait() {
                return Some(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// A spawned child. Dropping it kills it (SIGKILL to its process group) unless `detach`ed;
/// the owning `Cluster` kills it in any case when the cluster drops.
#[derive(Debug)]
pub struct Proc {
    shared: Arc<ProcShared>,
    detached: bool,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// The file receiving the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.shared.log_path
    }

    /// SIGKILL (to the process group) and reap.
    pub fn kill(&mut self) {
        self.shared.kill_and_reap();
    }

    /// SIGTERM (to the process group) without waiting: a graceful stop the caller watches
    /// with [`Proc::try_wait`] / [`Proc::wait_timeout`].
    pub fn request_stop(&self) {
        self.shared.signal(Signal::SIGTERM);
    }

    /// SIGTERM (to the process group), wait up to `grace` for it to exit, then SIGKILL; always
    /// reaps. Whatever the process leaves in its group is killed when it is reaped.
    pub fn terminate(&mut self, grace: Duration) {
        self.shared.signal(Signal::SIGTERM);
        if self.shared.wait_timeout(grace).is_none() {
            self.shared.kill_and_reap();
        }
    }

    /// The exit status if it has exited (reaping it), None if still running.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, TestbedError> {
        self.shared
            .try_wait()
            .map_err(|e| TestbedError::io(format!("waiting for pid {}", self.shared.pid), e))
    }

    /// Waits up to `timeout` for the process to exit; None if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.shared.wait_timeout(timeout)
    }

    /// Lets the process outlive this handle; it is still killed when the `Cluster` drops.
    pub fn detach(&mut self) {
        self.detached = true;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.detached {
            self.shared.kill_and_reap();
        }
    }
}

/// Keeps file names tame: labels become `[A-Za-z0-9._-]`.
fn sanitize(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("proc{s}")
    } else {
        s
    }
}

/// Makes `cmd` enter the namespace behind `ns` (an fd opened before the fork) in the child.
fn enter_in_child(cmd: &mut Command, ns: &File) {
    let fd = ns.as_raw_fd();
    // SAFETY: the closure only calls setns(2) and reads errno, both async-signal-safe; `ns`
    // outlives the spawn because callers keep the File alive until spawn()/output() returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the child move itself into the cgroup whose `cgroup.procs` is `procs` (opened before
/// the fork), before exec: no instruction of the program runs outside it.
fn join_cgroup_in_child(cmd: &mut Command, procs: &File) {
    let fd = procs.as_raw_fd();
    // SAFETY: write(2) of a static buffer and errno: async-signal-safe; `procs` outlives the
    // spawn (the caller drops it after spawn() returns).
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts `cmd` in `netns` with stdout+stderr appended to `<dir>/<label>.log`, in its own
/// process group, and records it in the run's pidfile.
pub(crate) fn spawn(
    dir: &Path,
    netns: &Netns,
    cmd: Command,
    label: &str,
) -> Result<Proc, TestbedError> {
    spawn_in(dir, netns, None, cmd, label)
}

/// [`spawn`], in cgroup directory `cgroup` as well (when given).
pub(crate) fn spawn_in(
    dir: &Path,
    netns: &Netns,
    cgroup: Option<&Path>,
    mut cmd: Command,
    label: &str,
) -> Result<Proc, TestbedError> {
    let log_path = dir.join(format!("{}.log", sanitize(label)));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| TestbedError::io(format!("opening log {}", log_path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| TestbedError::io(format!("duplicating log fd {}", log_path.display()), e))?;
    let ns = netns.open()?;
    cmd.stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    enter_in_child(&mut cmd, &ns);
    let procs = match cgroup {
        Some(cg) => {
            let path = cg.join("cgroup.procs");
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| TestbedError::io(format!("opening {}", path.display()), e))?;
            join_cgroup_in_child(&mut cmd, &f);
            Some(f)
        }
        None => None,
    };
    let line = command_line(&cmd);
    let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
        cmd: format!("{line} (in netns {})", netns.name),
        source,
    })?;
    drop(ns);
    drop(procs);
    let pid = child.id();
    let proc = Proc {
        shared: Arc::new(ProcShared {
            child: Mutex::new(child),
            pid,
            netns: netns.name.clone(),
            log_path,
        }),
        detached: false,
    };
    // Record it so a later process can find it even if we die without cleaning up. If the
    // record cannot be written, the Proc drops (and kills the child) with the error.
    let start_time = proc_stat(pid).map(|s| s.start_time).unwrap_or(0);
    let pidfile = dir.join(PIDFILE);
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&pidfile)
        .and_then(|mut f| writeln!(f, "{pid} {start_time} {}", sanitize(label)))
        .map_err(|e| TestbedError::io(format!("recording pid in {}", pidfile.display()), e))?;
    Ok(proc)
}

impl Proc {
    pub(crate) fn shared(&self) -> Arc<ProcShared> {
        self.shared.clone()
    }
}

/// Runs `argv` inside `netns` to completion and returns its output (a non-zero exit is not an
/// error here).
pub(crate) fn run(netns: &Netns, argv: &[&str]) -> Result<Output, TestbedError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| TestbedError::Invalid("run: empty argv".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let ns = netns.open()?;
    enter_in_child(&mut cmd, &ns);
    let out = cmd.output().map_err(|source| TestbedError::Spawn {
        cmd: format!("{} (in netns {})", argv.join(" "), netns.name),
        source,
    });
    drop(ns);
    out
}
