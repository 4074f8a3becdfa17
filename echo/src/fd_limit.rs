//! This process's open-files limit (RLIMIT_NOFILE), raised for the commands that hold many
//! sockets at once (`serve`, `hold`). Owns nothing else: no socket, no logging policy.

/// What a privileged process asks for: 2^20 fds (capped by `fs.nr_open`).
const TARGET: u64 = 1 << 20;

/// Raises the soft open-files limit as far as this process may: with CAP_SYS_RESOURCE (root)
/// both limits go up to [`TARGET`] (never lowered, at most `fs.nr_open`); without it, the soft
/// limit goes up to the hard one. Returns the soft limit in force afterwards.
pub fn raise() -> std::io::Result<u64> {
    let (soft, hard) = get()?;
    let ceiling = nr_open().map_or(TARGET, |n| n.min(TARGET));
    let target = ceiling.max(hard);
    // EPERM without CAP_SYS_RESOURCE: fall through to the hard limit we have.
    if target > hard && set(target, target).is_ok() {
        return Ok(target);
    }
    if soft < hard {
        set(hard, hard)?;
        return Ok(hard);
    }
    Ok(soft)
}

fn get() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

fn set(soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit, only read by the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `fs.nr_open`: the largest RLIMIT_NOFILE the kernel accepts.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}
