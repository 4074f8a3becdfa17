//! Owns `TestbedError`: every failure the testbed reports, each saying what was attempted and,
//! for external commands, the command line, its exit status and its stderr.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// An external command (mostly `ip`) ran but exited unsuccessfully.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// An external command could not be started at all.
    #[error("could not start `{cmd}`: {source}")]
    Spawn { cmd: String, source: io::Error },
    /// Opening or entering a network namespace failed.
    #[error("network namespace {path}: {what}: {source}")]
    Netns {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    /// Any other I/O failure (scratch directory, log files, threads, signals).
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// The caller asked for something impossible (bad name, unknown node, duplicate pod, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl TestbedError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        TestbedError::Io {
            what: what.into(),
            source,
        }
    }
}
