//! Talking to the sample workloads and reading ztunnel's access log, for the demo and tests.
//!
//! Owns running `mesh-echo who` inside a pod and parsing what it and ztunnel print.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{LocalMesh, wait_for};

/// What one `mesh-echo who` exchange showed.
#[derive(Debug, Clone)]
pub struct Who {
    /// The client socket's local address (as the client saw it).
    pub client_local: String,
    /// getpeername() of the client socket: the address the app believes it reached.
    pub client_peer: String,
    /// The server's name (pod name).
    pub served_by: String,
    /// The client address as the server saw it.
    pub server_saw_peer: String,
    pub message: String,
}

impl LocalMesh {
    /// Runs `mesh-echo who --addr <addr>` inside `namespace/pod`.
    pub fn who(
        &self,
        namespace: &str,
        pod: &str,
        addr: &str,
        message: &str,
    ) -> anyhow::Result<Who> {
        let echo = self.bins.echo.display().to_string();
        let out = self.exec(
            namespace,
            pod,
            &[
                &echo,
                "who",
                "--addr",
                addr,
                "--message",
                message,
                "--timeout",
                "5s",
            ],
        )?;
        if !out.status.success() {
            bail!(
                "{namespace}/{pod} → {addr} failed: {}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let client: Value = serde_json::from_str(lines.next().context("no client line")?)?;
        let reply: Value = serde_json::from_str(lines.next().context("no reply line")?)?;
        let s = |v: &Value, k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Ok(Who {
            client_local: s(&client, "client_local"),
            client_peer: s(&client, "client_peer"),
            served_by: s(&reply, "served_by"),
            server_saw_peer: s(&reply, "peer"),
            message: s(&reply, "message"),
        })
    }

    /// The `connection complete`/`connection failed` access-log entries of node `i`'s ztunnel.
    pub fn access_log(&self, node: usize) -> Vec<Value> {
        self.ztunnel_log(node)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v.get("fields").cloned())
            .filter(|f| {
                matches!(
                    f.get("message").and_then(Value::as_str),
                    Some("connection complete" | "connection failed")
                )
            })
            .collect()
    }

    /// Waits for node `i`'s access-log entry whose `field` equals `value`.
    pub fn wait_access_log(&self, node: usize, field: &str, value: &str) -> anyhow::Result<Value> {
        let mut found = None;
        wait_for(
            Duration::from_secs(10),
            &format!("ztunnel access log entry {field}={value} on node {node}"),
            || {
                found = self
                    .access_log(node)
                    .into_iter()
                    .find(|f| f.get(field).and_then(Value::as_str) == Some(value));
                Ok(found.is_some())
            },
        )?;
        found.context("entry vanished")
    }
}

/// A string field of an access-log entry ("" if absent).
pub fn field(entry: &Value, name: &str) -> String {
    entry
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}
