//! The pod-wide state behind `/control`: the current [`Behaviour`], the count of requests it
//! has been applied to, and the files served as-is (`serve --file PATH=FILE`, e.g. a JWKS).
//! Shared by every HTTP port of the process. Owns no I/O beyond reading those files when asked;
//! `http_serve` decides what a request gets.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use echo::{Behaviour, Failure, Overrides};

/// What one request is to get.
pub struct Plan {
    pub fail: Failure,
    pub delay: std::time::Duration,
}

pub struct Control {
    behaviour: Mutex<Behaviour>,
    /// Requests counted against the behaviour (not `/control`, `/health` or served files).
    requests: AtomicU64,
    files: Vec<(String, PathBuf)>,
}

impl Control {
    pub fn new(initial: Behaviour, files: Vec<(String, PathBuf)>) -> Self {
        Control {
            behaviour: Mutex::new(initial),
            requests: AtomicU64::new(0),
            files,
        }
    }

    /// Counts one request and says what it gets: its own overrides win over the pod's.
    pub fn plan(&self, own: Overrides) -> Plan {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let b = *self.behaviour.lock().unwrap_or_else(|p| p.into_inner());
        Plan {
            fail: own.fail.unwrap_or_else(|| b.failure_for(n)),
            delay: own.delay.unwrap_or(b.delay),
        }
    }

    pub fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap_or_else(|p| p.into_inner()) = b;
    }

    /// `GET /control`: the behaviour plus `requests` served so far.
    pub fn report(&self) -> serde_json::Value {
        let b = *self.behaviour.lock().unwrap_or_else(|p| p.into_inner());
        let mut v = b.to_json();
        v["requests"] = self.requests.load(Ordering::Relaxed).into();
        v
    }

    /// The file configured for `path`, if any.
    pub fn file(&self, path: &str) -> Option<&PathBuf> {
        self.files.iter().find(|(p, _)| p == path).map(|(_, f)| f)
    }
}
