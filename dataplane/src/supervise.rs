//! Supervision of ztunnel's long-lived background tasks (config subscription, policy,
//! certificate refresh, admin servers).
//!
//! None of them may end while ztunnel runs: a dead policy task would leave stale policy in force
//! forever, with DENY changes never applied. So the first one to end — by panic or by return —
//! is reported, and the caller takes the process down; capture stays in place, so pods fail
//! closed until ztunnel is restarted (as after any crash). Owns the task set only; what to do
//! about an exit is the caller's.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinSet};

/// A set of named tasks that must run for as long as the process does.
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
}

/// How a supervised task ended.
#[derive(Debug, PartialEq, Eq)]
pub struct TaskExit {
    pub name: &'static str,
    /// The panic message, or `None` when the task returned.
    pub panic: Option<String>,
}

impl std::fmt::Display for TaskExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.panic {
            Some(msg) => write!(f, "task {} panicked: {msg}", self.name),
            None => write!(f, "task {} returned", self.name),
        }
    }
}

impl Supervisor {
    /// Spawns `task` on the current runtime under `name`.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let id = self.tasks.spawn(task).id();
        self.names.insert(id, name);
    }

    /// Waits until one task ends and says which and how. Never resolves while all run (or when
    /// there are none), so it can sit in a `select!` beside the signal handlers.
    pub async fn first_exit(&mut self) -> TaskExit {
        let Some(ended) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, panic) = match ended {
            Ok((id, ())) => (id, None),
            Err(e) => {
                let id = e.id();
                let msg = if e.is_panic() {
                    let p = e.into_panic();
                    p.downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(non-string panic)".to_string())
                } else {
                    "cancelled".to_string()
                };
                (id, Some(msg))
            }
        };
        TaskExit {
            name: self.names.remove(&id).unwrap_or("unknown"),
            panic,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panicking_task_is_reported_by_name() {
        let mut s = Supervisor::default();
        s.spawn("forever", std::future::pending());
        s.spawn("policy", async { panic!("policy compile blew up") });
        let exit = tokio::time::timeout(Duration::from_secs(5), s.first_exit())
            .await
            .expect("the panic must be reported");
        assert_eq!(
            exit,
            TaskExit {
                name: "policy",
                panic: Some("policy compile blew up".into())
            }
        );
    }

    #[tokio::test]
    async fn a_task_that_returns_is_reported_too() {
        let mut s = Supervisor::default();
        s.spawn("forever", std::future::pending());
        s.spawn("config", async {});
        let exit = tokio::time::timeout(Duration::from_secs(5), s.first_exit())
            .await
            .expect("the return must be reported");
        assert_eq!(exit.name, "config");
        assert_eq!(exit.panic, None);
    }

    #[tokio::test]
    async fn running_tasks_are_not_an_exit() {
        let mut s = Supervisor::default();
        s.spawn("forever", std::future::pending());
        assert!(
            tokio::time::timeout(Duration::from_millis(100), s.first_exit())
                .await
                .is_err()
        );
    }
}
