//! Test hooks on the request path: injected failures, held requests, and the request log.
//! Owns only that state; the server consults it for every request.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;

use super::{RequestMatch, RequestRecord};

/// Requests remembered (oldest forgotten first), so a long test cannot grow it without bound.
const LOG_CAP: usize = 200_000;

#[derive(Default)]
struct Inner {
    fails: Vec<(RequestMatch, u16)>,
    holds: Vec<RequestMatch>,
    log: VecDeque<RequestRecord>,
}

pub(crate) struct Hooks {
    inner: Mutex<Inner>,
    /// Bumped whenever holds change, so held requests re-check.
    changed: watch::Sender<u64>,
}

fn matches(m: &RequestMatch, method: &str, path: &str) -> bool {
    m.method
        .as_deref()
        .is_none_or(|x| x.eq_ignore_ascii_case(method))
        && path.starts_with(&m.path_prefix)
}

impl Hooks {
    pub fn new() -> Self {
        Hooks {
            inner: Mutex::new(Inner::default()),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn fail(&self, m: RequestMatch, code: u16) {
        self.lock().fails.push((m, code));
    }

    pub fn hold(&self, m: RequestMatch) {
        self.lock().holds.push(m);
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn clear(&self) {
        let mut g = self.lock();
        g.fails.clear();
        g.holds.clear();
        drop(g);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The injected failure code for this request, if any.
    pub fn failure(&self, method: &str, path: &str) -> Option<u16> {
        self.lock()
            .fails
            .iter()
            .find(|(m, _)| matches(m, method, path))
            .map(|(_, c)| *c)
    }

    /// Returns once no hold matches this request.
    pub async fn wait_unheld(&self, method: &str, path: &str) {
        let mut rx = self.changed.subscribe();
        loop {
            let held = self.lock().holds.iter().any(|m| matches(m, method, path));
            if !held {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn log(&self, rec: RequestRecord) {
        let mut g = self.lock();
        if g.log.len() >= LOG_CAP {
            g.log.pop_front();
        }
        g.log.push_back(rec);
    }

    pub fn records(&self) -> Vec<RequestRecord> {
        self.lock().log.iter().cloned().collect()
    }
}
