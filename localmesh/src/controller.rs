//! The local controller for what meshd renders: it polls meshd's `--write-dir` objects
//! directory (`<ns>.<gw>.yaml`, a waypoint's ServiceAccount, Deployment and Service) and
//! applies each file as if a user had (config file `generated.<ns>.<gw>.yaml`), so its Service
//! gets VIPs and its Deployment pods; a file that disappears is removed with its pods.
//! In API mode meshd writes to the API instead: the controller polls the Deployments labelled
//! `gateway.istio.io/managed` there and runs their pods the same way (the Service already has
//! its VIP from the API; only the pods are written back).
//!
//! Owns only that loop and its log (`controller.log` in the run directory); applying is
//! [`Mesh::apply`]'s.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Mesh;

const POLL: Duration = Duration::from_millis(200);

/// The running loop; dropping it stops it (after the apply in progress, if any).
pub struct Controller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Controller {
    pub fn start(mesh: Arc<Mesh>, objects: PathBuf) -> anyhow::Result<Controller> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("localmesh-controller".into())
            .spawn(move || run(&mesh, &objects, &flag))?;
        Ok(Controller {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mesh: &Mesh, objects: &Path, stop: &AtomicBool) {
    // Objects file name → the text last applied from it.
    let mut applied: HashMap<String, String> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let now = match &mesh.api {
            Some(api) => api.managed_deployments(),
            None => read_objects(objects),
        };
        for (name, text) in &now {
            if applied.get(name) == Some(text) {
                continue;
            }
            let file = format!("{}{name}", crate::api_mode::CONTROLLER_FILE_PREFIX);
            match mesh.apply(&file, text) {
                Ok(()) => log(mesh, &format!("applied {file}")),
                Err(e) => log(
                    mesh,
                    &format!("applying {file} (from meshd's {name}): {e:#}"),
                ),
            }
            // Not retried until it changes: meshd rewrites it when its input changes.
            applied.insert(name.clone(), text.clone());
        }
        let gone: Vec<String> = applied
            .keys()
            .filter(|n| !now.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            applied.remove(&name);
            let file = format!("{}{name}", crate::api_mode::CONTROLLER_FILE_PREFIX);
            match mesh.remove(&file) {
                Ok(()) => log(mesh, &format!("removed {file}")),
                Err(e) => log(mesh, &format!("removing {file}: {e:#}")),
            }
        }
        std::thread::sleep(POLL);
    }
}

/// `*.yaml` files of the objects directory (none while meshd has not made it).
fn read_objects(dir: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.ends_with(".yaml") || name.starts_with('.') {
            continue;
        }
        match std::fs::read_to_string(e.path()) {
            Ok(text) => {
                out.insert(name, text);
            }
            // Removed between listing and reading: the next poll sees it gone.
            Err(err) => tracing::debug!("reading {}: {err}", e.path().display()),
        }
    }
    out
}

/// A line in the run's `controller.log` (kept with the other logs) and in tracing.
pub(crate) fn log(mesh: &Mesh, line: &str) {
    tracing::info!("{line}");
    let path = mesh.dir().join("controller.log");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}
