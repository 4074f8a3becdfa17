//! Owns network namespaces as the testbed sees them: the `Netns` handle, entering one on a
//! helper thread, creating/deleting named namespaces, per-namespace sysctls, and the helper that
//! runs `ip` and turns a failure into a `TestbedError` carrying the command and its stderr.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use nix::sched::CloneFlags;

use crate::error::TestbedError;

/// Where `ip netns` keeps its bind mounts.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// A network namespace: its name (as `ip netns` knows it) and a path that can be opened to enter it.
#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
    /// Usually `/run/netns/<name>`; any nsfs path (e.g. `/proc/1/ns/net`) works for entering.
    pub path: PathBuf,
}

impl Netns {
    /// The handle of a namespace named `name` under `/run/netns`.
    pub fn named(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            path: Path::new(NETNS_DIR).join(name),
        }
    }

    /// Opens the namespace file (close-on-exec), e.g. to enter it after a fork.
    pub(crate) fn open(&self) -> Result<File, TestbedError> {
        File::open(&self.path).map_err(|source| TestbedError::Netns {
            path: self.path.clone(),
            what: "open",
            source,
        })
    }

    /// Runs `f` on a fresh thread that has entered this netns (sockets created there stay in
    /// this netns), returns its result. A panic in `f` is propagated to the caller.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TestbedError> {
        let file = self.open()?;
        let path = self.path.clone();
        let handle = std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || -> Result<T, TestbedError> {
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    TestbedError::Netns {
                        path,
                        what: "setns",
                        source: e.into(),
                    }
                })?;
                drop(file);
                Ok(f())
            })
            .map_err(|e| TestbedError::io("spawning a thread to enter a netns", e))?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Writes `value` to each `/proc/sys/<key>` (keys with '/' separators) inside this netns.
    pub(crate) fn sysctls(
        &self,
        settings: &[(&'static str, &'static str)],
    ) -> Result<(), TestbedError> {
        let settings = settings.to_vec();
        let name = self.name.clone();
        self.enter(move || -> Result<(), TestbedError> {
            for (key, value) in settings {
                let file = Path::new("/proc/sys").join(key);
                std::fs::write(&file, value).map_err(|e| {
                    TestbedError::io(
                        format!("setting {} = {value} in netns {name}", file.display()),
                        e,
                    )
                })?;
            }
            Ok(())
        })?
    }
}

/// `ip netns add/del` mount and unmount under /run/netns; serialising them inside one process
/// avoids iproute2's race when two threads set up the /run/netns mount point at once.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// Creates a named network namespace with `lo` up.
pub(crate) fn create(name: &str) -> Result<Netns, TestbedError> {
    {
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        ip(&["netns", "add", name])?;
    }
    if let Err(e) = ip(&["-n", name, "link", "set", "lo", "up"]) {
        let _ = delete(name);
        return Err(e);
    }
    Ok(Netns::named(name))
}

/// Deletes a named network namespace (its interfaces go with it once no process uses it).
pub(crate) fn delete(name: &str) -> Result<(), TestbedError> {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    ip(&["netns", "del", name]).map(|_| ())
}

/// Names of all namespaces under /run/netns (empty if the directory does not exist).
pub(crate) fn list() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Runs `ip <args>` in the caller's namespace; a non-zero exit is an error with stderr.
pub(crate) fn ip(args: &[&str]) -> Result<Output, TestbedError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    checked(cmd)
}

/// Runs `cmd` to completion; a non-zero exit becomes `TestbedError::Command`.
pub(crate) fn checked(mut cmd: Command) -> Result<Output, TestbedError> {
    let line = command_line(&cmd);
    let out = cmd.output().map_err(|source| TestbedError::Spawn {
        cmd: line.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(TestbedError::Command {
            cmd: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `program arg1 arg2 ...` for error messages.
pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
