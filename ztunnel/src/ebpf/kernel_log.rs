//! The programs' aya-log records (`--ebpf-log`): the level fixed at load, the per-process ring
//! buffer pin and the reader that forwards records to ztunnel's log. Must not touch capture.

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::warn;

use super::pins::remove_if_present;
use super::{EbpfError, LOGS_MAP, io_err};

/// `--ebpf-log`: the least severe kernel decision logged. `debug` shows every redirect and pass
/// in enrolled pods, `info` redirects of connections to addresses that are not the pod's,
/// `warn` drops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EbpfLog {
    /// Nothing: the logging code is pruned from the loaded programs.
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

impl EbpfLog {
    /// The value of aya-log's `AYA_LOG_LEVEL` global (its `Level` numbering; 0 logs nothing).
    pub(super) fn level(self) -> u8 {
        match self {
            EbpfLog::Off => 0,
            EbpfLog::Error => aya_log::Level::Error as u8,
            EbpfLog::Warn => aya_log::Level::Warn as u8,
            EbpfLog::Info => aya_log::Level::Info as u8,
            EbpfLog::Debug => aya_log::Level::Debug as u8,
        }
    }
}
/// Removes the log ring buffer pins (`AYA_LOGS_<pid>`) of processes that are gone.
pub(super) fn sweep_log_pins(dir: &Path) {
    let prefix = format!("{LOGS_MAP}_");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(&prefix)
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Pins this process's aya-log ring buffer in `dir` (per process: two ztunnels side by side
/// during a handover each read their own) and starts forwarding its records to the log.
/// Returns the pin, for the per-pod loads.
pub(super) fn start_log_reader(bpf: &mut aya::Ebpf, dir: &Path) -> Result<PathBuf, EbpfError> {
    let pin = dir.join(format!("{LOGS_MAP}_{}", std::process::id()));
    remove_if_present(std::fs::remove_file(&pin), &pin)?;
    let map = bpf.map(LOGS_MAP).ok_or(EbpfError::Missing(LOGS_MAP))?;
    map.pin(&pin).map_err(|source| EbpfError::Pin {
        path: pin.display().to_string(),
        source,
    })?;
    let logger =
        aya_log::EbpfLogger::init_with_logger(bpf, KernelLog).map_err(EbpfError::Logger)?;
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| io_err("reading the eBPF log")(io::Error::other(e)))?;
    // SAFETY: the logger owns its ring buffer's fd for its whole life and always returns it.
    let fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| io_err("watching the eBPF log ring buffer")(e.into()))?;
    runtime.spawn(async move {
        let mut fd = fd;
        loop {
            match fd.readable_mut().await {
                Ok(mut ready) => {
                    ready.get_inner_mut().flush();
                    ready.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "eBPF log reader stopped");
                    return;
                }
            }
        }
    });
    Ok(pin)
}

/// Forwards the programs' records to ztunnel's log (target `ztunnel::ebpf::kernel`). The kernel
/// already filtered them by `--ebpf-log`, so debug and info records are logged at info (with
/// the program's level as `kernel_level`), visible under the default log filter; errors and
/// warnings (drops) as such.
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "ztunnel::ebpf::kernel", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "ztunnel::ebpf::kernel", "{msg}"),
            level => {
                tracing::info!(target: "ztunnel::ebpf::kernel", kernel_level = %level, "{msg}")
            }
        }
    }

    fn flush(&self) {}
}
