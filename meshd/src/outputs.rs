//! `meshd run --write-dir DIR`: what meshd renders and reports, as files (local mode's
//! controller applies them; a Kubernetes backend would write the same objects to the API server).
//!
//! - `DIR/objects/<ns>.<gw>.yaml`: an accepted waypoint Gateway's ServiceAccount, Deployment
//!   and Service (`waypoints::render`); removed when the Gateway goes. A refused edit keeps
//!   the last accepted version's objects (the source keeps that version in force).
//! - `DIR/status/Gateway.<ns>.<gw>.json`: its `Accepted` and `Programmed` conditions.
//! - `DIR/status/<Kind>.<ns>.<name>.json`: a route resource's findings, when it has any.
//!
//! Owns those files: written atomically (temporary file, then rename) and only when their
//! content changes, stale ones removed, and conditions' `lastTransitionTime` kept until their
//! status changes (across restarts too, read back from the files). Touches nothing else in DIR.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tracing::{info, warn};

use crate::status;
use crate::translate::MeshView;
use crate::waypoints;

const OBJECTS: &str = "objects";
const STATUS: &str = "status";

#[derive(Debug, thiserror::Error)]
#[error("write directory {path}: {source}")]
pub struct OutputError {
    path: String,
    source: io::Error,
}

pub struct Outputs {
    dir: PathBuf,
    /// "<status file>#<condition type>" → (status, lastTransitionTime).
    since: HashMap<String, (String, String)>,
}

impl Outputs {
    /// Creates `DIR/objects` and `DIR/status` if missing and reads back transition times.
    pub fn new(dir: &Path) -> Result<Outputs, OutputError> {
        for sub in [OBJECTS, STATUS] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|source| OutputError {
                path: p.display().to_string(),
                source,
            })?;
        }
        let mut since = HashMap::new();
        for (name, text) in read_dir_files(&dir.join(STATUS), ".json") {
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let conds = v.pointer("/status/conditions").and_then(Value::as_array);
            for c in conds.into_iter().flatten() {
                let get = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_string);
                if let (Some(t), Some(s), Some(at)) =
                    (get("type"), get("status"), get("lastTransitionTime"))
                {
                    since.insert(format!("{name}#{t}"), (s, at));
                }
            }
        }
        Ok(Outputs {
            dir: dir.to_path_buf(),
            since,
        })
    }

    /// Brings the files in line with `view`. Failures are logged; the next view retries.
    pub fn write(&mut self, view: &MeshView) {
        let now = status::rfc3339(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        );
        let mut objects = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        for w in view.waypoints.values() {
            if w.accepted() {
                let text = waypoints::to_yaml(&waypoints::render(w));
                objects.insert(format!("{}.{}.yaml", w.namespace, w.name), text);
            }
            let file = format!("Gateway.{}.{}.json", w.namespace, w.name);
            let conds = status::gateway_conditions(w, view)
                .iter()
                .map(|c| {
                    let at = self.transition(&file, c.kind, c.status, &now);
                    status::condition_json(c, &at, w.generation)
                })
                .collect();
            statuses.insert(file, status::gateway_status(w, view, conds));
        }
        for r in view.route_findings.values() {
            let file = format!("{}.{}.{}.json", r.kind, r.namespace, r.name);
            let at = self.transition(&file, "Accepted", r.rejected.is_none(), &now);
            statuses.insert(file, status::route_status(r, &at));
        }
        let statuses = statuses
            .into_iter()
            .map(|(k, v)| {
                let text = serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
                (k, text)
            })
            .collect();
        self.sync(OBJECTS, ".yaml", &objects);
        self.sync(STATUS, ".json", &statuses);
        self.since.retain(|k, _| {
            k.split_once('#')
                .is_some_and(|(f, _)| statuses.contains_key(f))
        });
    }

    /// When the condition last changed status: kept while it holds, `now` when it flips.
    fn transition(&mut self, file: &str, kind: &str, status: bool, now: &str) -> String {
        let status = if status { "True" } else { "False" };
        let entry = self
            .since
            .entry(format!("{file}#{kind}"))
            .or_insert_with(|| (status.to_string(), now.to_string()));
        if entry.0 != status {
            *entry = (status.to_string(), now.to_string());
        }
        entry.1.clone()
    }

    /// Makes `DIR/sub` hold exactly `want` among its `*<ext>` files.
    fn sync(&self, sub: &str, ext: &str, want: &BTreeMap<String, String>) {
        let dir = self.dir.join(sub);
        let have = read_dir_files(&dir, ext);
        for (name, text) in want {
            if have.get(name) == Some(text) {
                continue;
            }
            match write_atomic(&dir, name, text) {
                Ok(()) => info!(file = %format!("{sub}/{name}"), "wrote"),
                Err(e) => warn!(file = %format!("{sub}/{name}"), "cannot write: {e}"),
            }
        }
        for name in have.keys().filter(|n| !want.contains_key(*n)) {
            match std::fs::remove_file(dir.join(name)) {
                Ok(()) => info!(file = %format!("{sub}/{name}"), "removed"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!(file = %format!("{sub}/{name}"), "cannot remove: {e}"),
            }
        }
    }
}

/// Name → content of the visible `*<ext>` files of `dir` (none if it cannot be read).
fn read_dir_files(dir: &Path, ext: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !name.ends_with(ext) {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(e.path()) {
            out.insert(name, text);
        }
    }
    out
}

/// Readers never see a half-written file: a hidden temporary file, then a rename.
fn write_atomic(dir: &Path, name: &str, text: &str) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
