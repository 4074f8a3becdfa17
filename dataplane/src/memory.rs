//! Handing freed heap memory back to the kernel, so a proxy's RSS follows its load down.
//!
//! glibc's malloc keeps what a burst freed: by default each thread allocates from its own
//! arena, and an arena only shrinks from its top, so RSS ratchets up to the busiest moment (a
//! start-up that parsed the kernel's BTF, 10,000 connections now closed) and stays there.
//! [`configure`] puts every thread on the main arena; `malloc_trim(0)` then gives back its free
//! top and every whole free page inside it (`madvise`; nothing moves, live allocations are
//! untouched). Owns those two calls and the trim's schedule; what is allocated is everyone
//! else's business. A no-op on other C libraries.
//!
//! The schedule: every [`TRIM_PERIOD`], and [`TRIM_QUIET`] after a burst someone reported with
//! [`trim_soon`] (a config snapshot applied, a certificate issued). Measured on an idle
//! ztunnel: start-up's config and certificates left 1.8 MiB free in the heap that only the
//! first periodic trim, 30 s in, gave back (RSS 13.9 -> 12.1 MiB).

use std::time::Duration;

use tokio::sync::Notify;

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

/// How long after the last [`trim_soon`] of a burst its trim waits: a burst of config updates
/// or certificate issues is trimmed once, after it.
pub const TRIM_QUIET: Duration = Duration::from_secs(1);

static BURST: Notify = Notify::const_new();

/// Asks for a trim shortly: call after work that allocated and freed much at once. Cheap; asks
/// coalesce into one trim [`TRIM_QUIET`] after the last (at the latest at the next period).
pub fn trim_soon() {
    BURST.notify_one();
}

/// Trims now, then every `period` and after each burst of [`trim_soon`], forever (a supervised
/// task that never ends).
pub async fn trim_every(period: Duration) {
    schedule(period, &BURST, trim).await
}

/// [`trim_every`]'s schedule: calls `trim`, asked early through `burst`.
async fn schedule(period: Duration, burst: &Notify, mut trim: impl FnMut()) {
    loop {
        trim();
        let next = tokio::time::Instant::now() + period;
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = burst.notified() => {
                // Wait for the burst to end, but no later than the period's trim.
                loop {
                    let quiet = tokio::time::Instant::now() + TRIM_QUIET;
                    tokio::select! {
                        _ = tokio::time::sleep_until(quiet.min(next)) => break,
                        _ = burst.notified() => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Runs the schedule with a counting trim; the clock is tokio's paused one, so every
    /// instant below is exact.
    fn counted(period: Duration) -> (Arc<AtomicU32>, Arc<Notify>) {
        let n = Arc::new(AtomicU32::new(0));
        let burst = Arc::new(Notify::new());
        let (c, b) = (n.clone(), burst.clone());
        tokio::spawn(async move {
            schedule(period, &b, move || {
                c.fetch_add(1, Ordering::SeqCst);
            })
            .await
        });
        (n, burst)
    }

    async fn at(t: Duration, start: tokio::time::Instant) {
        tokio::time::sleep_until(start + t).await;
        // Let the schedule's task run what is due.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_trimmed_once_a_quiet_second_after_it_and_the_period_still_holds() {
        let start = tokio::time::Instant::now();
        let period = Duration::from_secs(30);
        let (n, burst) = counted(period);
        at(Duration::ZERO, start).await;
        assert_eq!(n.load(Ordering::SeqCst), 1, "trims at start");
        // Asks at 5.0, 5.5 and 6.0 s: one trim, at 7.0 s.
        for ms in [5000, 5500, 6000] {
            at(Duration::from_millis(ms), start).await;
            burst.notify_one();
        }
        at(Duration::from_millis(6900), start).await;
        assert_eq!(n.load(Ordering::SeqCst), 1, "not during the burst");
        at(Duration::from_millis(7100), start).await;
        assert_eq!(
            n.load(Ordering::SeqCst),
            2,
            "once, a quiet second after the burst"
        );
        // Then the period, counted from that trim.
        at(Duration::from_millis(36_900), start).await;
        assert_eq!(n.load(Ordering::SeqCst), 2);
        at(Duration::from_millis(37_100), start).await;
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn endless_asks_still_trim_every_period() {
        let start = tokio::time::Instant::now();
        let (n, burst) = counted(Duration::from_secs(10));
        at(Duration::ZERO, start).await;
        for ms in (500..25_000).step_by(500) {
            at(Duration::from_millis(ms), start).await;
            burst.notify_one();
        }
        // Trims at 0, 10 and 20 s, though the asks never paused for a second.
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }
}
