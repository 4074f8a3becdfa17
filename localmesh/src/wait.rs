//! Polling with a deadline: what every wait in local mode is built on. Owns no state.

use std::time::{Duration, Instant};

use anyhow::bail;

pub(crate) const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds or `deadline` passes (then the error names what was awaited).
pub fn wait_for(
    deadline: Duration,
    what: &str,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last_err = None;
    let mut pause = Duration::from_millis(5);
    while start.elapsed() < deadline {
        match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    match last_err {
        Some(e) => bail!("timed out after {deadline:?} waiting for {what} (last error: {e:#})"),
        None => bail!("timed out after {deadline:?} waiting for {what}"),
    }
}
