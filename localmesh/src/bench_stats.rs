//! What the bench reads of the ztunnel processes around a measurement: CPU time and context
//! switches from `/proc`, syscalls from `perf stat` (when the kernel and perf allow it), and
//! memory (VmRSS, open fds). Owns the reading and parsing only: which processes and when is the
//! bench's; it must not start, stop or signal them.
//!
//! CPU time is `utime + stime` of `/proc/PID/stat` (the whole process, exited threads
//! included). Context switches are summed over `/proc/PID/task/*/status`, so those of a
//! thread that exits between two samples are lost (ztunnel's runtime workers live as long as
//! the process). Syscalls are counted by `perf stat -e raw_syscalls:sys_enter -p PIDS --
//! <load>`: perf enables its counters before it starts the load, so the count covers the whole
//! measurement and nothing after it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

/// The tracepoint counted for syscalls: every syscall entry, any number.
pub const SYSCALL_EVENT: &str = "raw_syscalls:sys_enter";

/// Counters of a set of processes at one instant, summed over them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Voluntary + involuntary context switches of the live threads.
    pub ctx_switches: u64,
}

/// What a set of processes spent over one measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spent {
    pub cpu_secs: f64,
    pub ctx_switches: u64,
    /// `None` when perf could not count.
    pub syscalls: Option<u64>,
}

impl Spent {
    /// The difference of two samples (a thread gone between them can make a count drop: 0).
    pub fn between(before: Sample, after: Sample, syscalls: Option<u64>) -> Spent {
        Spent {
            cpu_secs: after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / clock_ticks(),
            ctx_switches: after.ctx_switches.saturating_sub(before.ctx_switches),
            syscalls,
        }
    }
}

/// A process's memory at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss_kib: u64,
    /// The anonymous part of `rss_kib` (heap, stacks): what the process allocated. The rest is
    /// mostly file pages, the binary's code and read-only data that it has touched, which
    /// follow the binary's size and not the load.
    pub anon_kib: u64,
    pub fds: usize,
}

/// Samples every pid's counters, summed.
pub fn sample(pids: &[u32]) -> anyhow::Result<Sample> {
    let mut total = Sample::default();
    for &pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat (did ztunnel exit?)"))?;
        total.cpu_ticks +=
            stat_cpu_ticks(&stat).with_context(|| format!("no utime/stime in /proc/{pid}/stat"))?;
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("listing /proc/{pid}/task"))?;
        for task in tasks.flatten() {
            // A thread may exit between the listing and the read: it no longer counts.
            if let Ok(status) = std::fs::read_to_string(task.path().join("status")) {
                total.ctx_switches += status_number(&status, "voluntary_ctxt_switches")
                    .unwrap_or(0)
                    + status_number(&status, "nonvoluntary_ctxt_switches").unwrap_or(0);
            }
        }
    }
    Ok(total)
}

/// A process's resident memory and its number of open fds.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (did ztunnel exit?)"))?;
    let rss_kib =
        status_number(&status, "VmRSS").with_context(|| format!("no VmRSS for pid {pid}"))?;
    let anon_kib =
        status_number(&status, "RssAnon").with_context(|| format!("no RssAnon for pid {pid}"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count();
    Ok(Memory {
        rss_kib,
        anon_kib,
        fds,
    })
}

/// How long ago a process started: its `starttime` (field 22 of `/proc/PID/stat`, clock ticks
/// since boot) against the system's uptime.
pub fn age(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (did it exit?)"))?;
    let started = stat_field(&stat, 22)
        .with_context(|| format!("no starttime in /proc/{pid}/stat"))? as f64
        / clock_ticks();
    let uptime = std::fs::read_to_string("/proc/uptime").context("reading /proc/uptime")?;
    let up: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok())
        .with_context(|| format!("no uptime in /proc/uptime: {uptime:?}"))?;
    Ok(Duration::from_secs_f64((up - started).max(0.0)))
}

/// Clock ticks per second (`utime`/`stime` unit).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted from after its last `)`.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    stat_field(stat, 14)?.checked_add(stat_field(stat, 15)?)
}

/// Numeric field `n` (1-based, `n` ≥ 3) of a `/proc/PID/stat` line, counted from after the
/// command name's last `)`.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state).
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// The number of a `/proc/PID/status` line `Name:   123 [kB]`.
pub fn status_number(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        if key != name {
            return None;
        }
        value.split_whitespace().next()?.parse().ok()
    })
}

/// The count of `event` in `perf stat -x,` output: `None` if the line is missing or perf says
/// `<not supported>`; `<not counted>` (the processes never ran while counting) is 0.
pub fn perf_count(csv: &str, event: &str) -> Option<u64> {
    csv.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut f = l.split(',');
            let value = f.next()?.trim();
            let _unit = f.next()?;
            let name = f.next()?.trim();
            // perf may suffix the event with a modifier (`:u`) or a cgroup; match the stem.
            (name == event || name.strip_prefix(event)?.starts_with(':')).then_some(value)
        })
        .and_then(|value| match value {
            "<not counted>" => Some(0),
            v => v.parse().ok(),
        })
}

/// `perf stat` counting syscalls of given processes while a load runs.
#[derive(Clone, Debug)]
pub struct Perf {
    bin: String,
}

impl Perf {
    /// Checks that perf runs and counts [`SYSCALL_EVENT`] here (perf installed, tracefs
    /// mounted, root or a low `perf_event_paranoid`); otherwise why not.
    pub fn probe() -> Result<Perf, String> {
        let bin = "perf".to_string();
        let out = Command::new(&bin)
            .args(["stat", "-x,", "-e", SYSCALL_EVENT, "--", "true"])
            .output()
            .map_err(|e| format!("cannot run perf: {e} (install linux-perf)"))?;
        let text = String::from_utf8_lossy(&out.stderr);
        match perf_count(&text, SYSCALL_EVENT) {
            Some(n) if out.status.success() && n > 0 => Ok(Perf { bin }),
            _ => Err(format!(
                "perf cannot count {SYSCALL_EVENT} here: {}",
                text.trim()
            )),
        }
    }

    /// argv that runs `load` under `perf stat` counting `pids`' syscalls into `out`; the
    /// load's stdout and exit status are perf's.
    pub fn wrap(&self, pids: &[u32], out: &Path, load: &[&str]) -> Vec<String> {
        let pids = pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut argv: Vec<String> = [&self.bin, "stat", "-x,", "-e", SYSCALL_EVENT, "-p", &pids]
            .map(String::from)
            .into();
        argv.push("-o".into());
        argv.push(out.display().to_string());
        argv.push("--".into());
        argv.extend(load.iter().map(|s| s.to_string()));
        argv
    }

    /// The count perf wrote to `out` after a [`wrap`](Perf::wrap)ped run.
    pub fn read(out: &Path) -> anyhow::Result<u64> {
        let text = std::fs::read_to_string(out)
            .with_context(|| format!("reading perf's output {}", out.display()))?;
        perf_count(&text, SYSCALL_EVENT)
            .with_context(|| format!("no {SYSCALL_EVENT} count in perf's output: {text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_ticks_counts_from_after_the_command_name() {
        // The command name holds a space and a ')' — fields must not shift.
        let stat = "4242 (zt (x) y) S 1 4242 4242 0 -1 4194560 1500 0 0 0 731 268 0 0 20 0 \
                    3 0 12345 123456789 3000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 \
                    0 17 1 0 0 0 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(731 + 268));
        assert_eq!(stat_field(stat, 22), Some(12345), "starttime");
        assert_eq!(stat_cpu_ticks("4242 (ztunnel) S 1 2"), None);
        assert_eq!(stat_cpu_ticks("no parenthesis 1 2 3"), None);
        let huge = format!("1 (a) S{} {} {} 0", " 0".repeat(10), u64::MAX, u64::MAX);
        assert_eq!(stat_cpu_ticks(&huge), None, "an overflow is no figure");
    }

    #[test]
    fn status_number_reads_the_named_line_only() {
        let status = "Name:\tztunnel\nVmHWM:\t   20480 kB\nVmRSS:\t   12288 kB\n\
                      voluntary_ctxt_switches:\t1234\nnonvoluntary_ctxt_switches:\t56\n";
        assert_eq!(status_number(status, "VmRSS"), Some(12288));
        assert_eq!(status_number(status, "voluntary_ctxt_switches"), Some(1234));
        assert_eq!(
            status_number(status, "nonvoluntary_ctxt_switches"),
            Some(56)
        );
        assert_eq!(status_number(status, "VmSwap"), None);
        assert_eq!(status_number("VmRSS:\tlots kB\n", "VmRSS"), None);
    }

    #[test]
    fn perf_count_parses_csv_and_its_special_values() {
        let out = "# started on Mon Nov 30 17:20:00 2026\n\n\
                   1234567,,raw_syscalls:sys_enter,3001234567,100.00,,\n";
        assert_eq!(perf_count(out, SYSCALL_EVENT), Some(1_234_567));
        let idle = "<not counted>,,raw_syscalls:sys_enter,0,0.00,,\n";
        assert_eq!(perf_count(idle, SYSCALL_EVENT), Some(0));
        let unsupported = "<not supported>,,raw_syscalls:sys_enter,0,100.00,,\n";
        assert_eq!(perf_count(unsupported, SYSCALL_EVENT), None);
        let modifier = "77,,raw_syscalls:sys_enter:u,1,100.00,,\n";
        assert_eq!(perf_count(modifier, SYSCALL_EVENT), Some(77));
        let other = "99,,raw_syscalls:sys_enter_x,1,100.00,,\n5,,context-switches,1,100.00,,\n";
        assert_eq!(perf_count(other, SYSCALL_EVENT), None);
        assert_eq!(perf_count("", SYSCALL_EVENT), None);
        assert_eq!(perf_count("Error: no permission\n", SYSCALL_EVENT), None);
    }

    #[test]
    fn sample_and_memory_of_this_process() {
        let me = std::process::id();
        let a = sample(&[me]).unwrap();
        // Sleeping is a voluntary context switch: the count must move.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let b = sample(&[me]).unwrap();
        assert!(
            b.cpu_ticks >= a.cpu_ticks && b.ctx_switches > a.ctx_switches,
            "{a:?} {b:?}"
        );
        let m = memory(me).unwrap();
        assert!(m.rss_kib > 0 && m.fds >= 3, "{m:?}");
        assert!(m.anon_kib > 0 && m.anon_kib < m.rss_kib, "{m:?}");
        assert!(sample(&[u32::MAX]).is_err());
        // This test process started before the test and not before the machine did.
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mine = age(me).unwrap();
        assert!(mine.as_secs_f64() <= uptime + 1.0, "{mine:?} of {uptime} s");
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let young = age(child.id()).unwrap();
        // Read after the child's: the child started after this process and was measured
        // earlier, so it is not older, up to the two readings' rounding to 10 ms clock ticks.
        let mine_after = age(me).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            young <= mine_after + Duration::from_millis(20) && young < Duration::from_secs(5),
            "{young:?} {mine_after:?}"
        );
        assert!(age(u32::MAX).is_err());
    }
}
