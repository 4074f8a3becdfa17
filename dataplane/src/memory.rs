//! Handing freed heap memory back to the kernel, so a proxy's RSS follows its load down.
//!
//! glibc's malloc keeps what a burst freed: by default each thread allocates from its own
//! arena, and an arena only shrinks from its top, so RSS ratchets up to the busiest moment (a
//! start-up that parsed the kernel's BTF, 10,000 connections now closed) and stays there.
//! [`configure`] puts every thread on the main arena; `malloc_trim(0)` then gives back its free
//! top and every whole free page inside it (`madvise`; nothing moves, live allocations are
//! untouched). Owns those two calls and the trim's schedule; what is allocated is everyone
//! else's business. A no-op on other C libraries.

use std::time::Duration;

/// How often [`trim_every`]'s default schedule trims: rare enough to cost nothing (a trim walks
/// the arenas' free lists, well under a millisecond for a proxy's heap), soon enough that a
/// load's memory is back within a minute.
pub const TRIM_PERIOD: Duration = Duration::from_secs(30);

/// Makes every thread allocate from glibc's main heap, the one [`trim`] can empty from the top.
/// Call once, first thing in `main`, before any other thread exists.
///
/// By default each thread gets a heap of its own, and a freed block at the top of one of those
/// goes back to the kernel only when a `free` leaves more than the trim threshold there, which
/// glibc raises to twice the largest mapped block ever freed: after the 5.5 MB read of the
/// kernel's BTF for an eBPF load, 11 MB. `malloc_trim` returns free pages inside each heap, but
/// the top only of the main one. So each thread that had loaded eBPF kept ~10 MiB free for
/// good (measured with `malloc_info` on an idle ztunnel: two 25 MB heaps, 150 KB of them
/// live; idle RSS 32 MiB, 15 MiB with this). Fixing both thresholds at 1 MiB instead cost 40%
/// of bulk throughput (heaps shrinking and faulting back in under load). A proxy's few threads
/// allocate small blocks from their own caches without the heap's lock either way.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc's own parameters, under its own lock.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        tracing::warn!("mallopt(M_ARENA_MAX, 1) refused; idle memory may stay high");
    }
}

/// Gives every whole free page of the heap back to the kernel now.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only touches malloc's own state, under its own locks; any thread may
    // call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims now and then every `period`, forever (a supervised task that never ends).
pub async fn trim_every(period: Duration) {
    loop {
        trim();
        tokio::time::sleep(period).await;
    }
}
