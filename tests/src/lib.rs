//! Helpers shared by the end-to-end tests in `tests/tests/`.
//!
//! Privileged tests need root; they fail (not skip) without it unless `MESH_SKIP_PRIVILEGED=1`
//! is set, in which case they say so loudly.

pub mod conformance;
pub mod leftovers;
pub mod manifests;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;

/// Returns false (and prints why) when privileged tests were explicitly told to skip; panics
/// when they cannot run and were not told to skip.
pub fn privileged() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if std::env::var("MESH_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("!!! SKIPPING privileged test: MESH_SKIP_PRIVILEGED=1 !!!");
        return false;
    }
    assert!(
        root,
        "this test needs root (network namespaces, nftables); set MESH_SKIP_PRIVILEGED=1 to skip it explicitly"
    );
    true
}

/// A client connection made from inside a pod's network namespace, speaking mesh-echo's WHO.
pub struct WhoConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl WhoConn {
    /// Connects from inside `pod` to `addr` (so capture applies exactly as to the pod's apps).
    pub fn connect(pod: &testbed::Pod, addr: SocketAddr) -> anyhow::Result<WhoConn> {
        let s = pod
            .netns
            .enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
            .with_context(|| format!("connect to {addr} from {}", pod.name))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let writer = s.try_clone()?;
        Ok(WhoConn {
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Sends one WHO request and returns the parsed reply.
    pub fn who(&mut self, message: &str) -> anyhow::Result<serde_json::Value> {
        self.writer
            .write_all(format!("WHO {message}\n").as_bytes())?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        anyhow::ensure!(n > 0, "connection closed before a reply");
        serde_json::from_str(&line).with_context(|| format!("reply {line:?}"))
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.writer.local_addr()?)
    }
}

/// `served_by` of a WHO reply.
pub fn served_by(v: &serde_json::Value) -> &str {
    v.get("served_by").and_then(|s| s.as_str()).unwrap_or("")
}
