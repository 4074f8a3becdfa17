//! Handing freed heap memory back to the kernel, so a proxy's RSS follows its load down.
//!
//! glibc's malloc keeps what a burst freed: each runtime thread allocates from its own arena,
//! and an arena only shrinks from its top, so RSS ratchets up to the busiest moment (a start-up
//! that parsed the kernel's BTF, 10,000 connections now closed) and stays there.
//! `malloc_trim(0)` gives back every whole free page of every arena (`madvise`; nothing moves,
//! live allocations are untouched). Owns only that call and its schedule; what is allocated is
//! everyone else's business. A no-op on other C libraries.

use std::time::Duration;

/// How often [`trim_every`]'s default schedule trims: rare enough to cost nothing (a trim walks
/// the arenas' free lists, well under a millisecond for a proxy's heap), soon enough that a
/// load's memory is back within a minute.
pub const TRIM_PERIOD: Duration = Duration::from_secs(30);

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
