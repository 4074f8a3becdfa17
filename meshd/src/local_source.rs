//! The local-mode resource source: a directory of YAML/JSON manifests, polled for changes.
//!
//! Owns reading files, keeping each file's last good content when an edit does not parse, and
//! publishing the merged [`ResourceSet`]. Knows nothing of translation: any other source (a
//! Kubernetes watch) only has to publish a `watch::Receiver<Arc<ResourceSet>>` too.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::parse;
use crate::resources::{Resource, ResourceSet};

/// Every this many polls files are re-read even if mtime and size look unchanged, so an edit
/// that kept both (coarse timestamps) is still picked up.
const REHASH_EVERY: u64 = 20;
/// Symlinked directories could loop; nobody nests manifests deeper than this.
const MAX_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("config directory {path}: {source}")]
    Dir { path: String, source: io::Error },
    #[error("config directory {0} is not a directory")]
    NotADir(String),
    #[error("starting the directory poller: {0}")]
    Thread(io::Error),
}

/// A running poller; it stops when dropped.
pub struct LocalSource {
    stop: Arc<AtomicBool>,
    _thread: JoinHandle<()>,
}

impl Drop for LocalSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl LocalSource {
    /// Loads the directory once (so the first published set is complete), then polls it every
    /// `interval` on its own thread.
    pub fn start(
        dir: &Path,
        interval: Duration,
    ) -> Result<(LocalSource, watch::Receiver<Arc<ResourceSet>>), SourceError> {
        let md = std::fs::metadata(dir).map_err(|source| SourceError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        if !md.is_dir() {
            return Err(SourceError::NotADir(dir.display().to_string()));
        }
        let mut scanner = Scanner::new(dir.to_path_buf());
        scanner.scan(true);
        let (tx, rx) = watch::channel(Arc::new(scanner.merged()));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("meshd-source".into())
            .spawn(move || {
                let mut tick = 0u64;
                while !stop2.load(Ordering::Relaxed) && !tx.is_closed() {
                    std::thread::sleep(interval);
                    tick += 1;
                    scanner.force_rehash = tick.is_multiple_of(REHASH_EVERY);
                    if scanner.scan(false) {
                        let set = scanner.merged();
                        tx.send_if_modified(|cur| {
                            let changed = **cur != set;
                            if changed {
                                *cur = Arc::new(set);
                            }
                            changed
                        });
                    }
                }
            })
            .map_err(SourceError::Thread)?;
        info!(dir = %dir.display(), "watching config directory");
        Ok((
            LocalSource {
                stop,
                _thread: thread,
            },
            rx,
        ))
    }
}

#[derive(Default)]
struct FileState {
    /// (mtime, size) when last read.
    seen: Option<(SystemTime, u64)>,
    /// A new (mtime, size) seen once; read when it holds still for one more poll, so a file
    /// being written is not read half-way (which could drop the resources after the cut).
    pending: Option<(SystemTime, u64)>,
    hash: Option<u64>,
    /// The file's last content that parsed.
    resources: Vec<Resource>,
}

/// The poll loop's state: what each file last held.
pub(crate) struct Scanner {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    force_rehash: bool,
    dir_missing_logged: bool,
}

impl Scanner {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Scanner {
            dir,
            files: BTreeMap::new(),
            force_rehash: false,
            dir_missing_logged: false,
        }
    }

    fn name(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Looks at every file once; returns true when some file's resources changed.
    pub(crate) fn scan(&mut self, initial: bool) -> bool {
        let listed = match list(&self.dir) {
            Ok(l) => {
                self.dir_missing_logged = false;
                l
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !self.dir_missing_logged {
                    warn!(dir = %self.dir.display(), "config directory is gone; treating it as empty");
                    self.dir_missing_logged = true;
                }
                Vec::new()
            }
            Err(e) => {
                error!(dir = %self.dir.display(), "cannot list config directory: {e}; keeping the current config");
                return false;
            }
        };
        let mut changed = false;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !listed.contains(p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(state) = self.files.remove(&path) {
                info!(file = %self.name(&path), "file removed; dropping its {} resources", state.resources.len());
                changed |= !state.resources.is_empty();
            }
        }
        for path in listed {
            changed |= self.look_at(&path, initial);
        }
        changed
    }

    fn look_at(&mut self, path: &Path, initial: bool) -> bool {
        let name = self.name(path);
        let force = self.force_rehash;
        // A file may vanish between listing and stat; the next poll sees it gone.
        let Ok(md) = std::fs::metadata(path) else {
            return false;
        };
        let stat = (md.modified().unwrap_or(SystemTime::UNIX_EPOCH), md.len());
        let state = self.files.entry(path.to_path_buf()).or_default();
        if state.seen == Some(stat) && !force {
            return false;
        }
        if state.seen != Some(stat) && state.pending != Some(stat) && !initial {
            state.pending = Some(stat);
            return false;
        }
        state.pending = None;
        state.seen = Some(stat);
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => {
                error!(file = %name, "cannot read {name}: {e}; keeping its last good content");
                return false;
            }
        };
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        let hash = h.finish();
        if state.hash == Some(hash) {
            return false;
        }
        state.hash = Some(hash);
        let parsed = match std::str::from_utf8(&text) {
            Ok(t) => parse::parse_file(&name, t).map_err(|e| e.to_string()),
            Err(e) => Err(format!("{name}: not UTF-8 text: {e}")),
        };
        match parsed {
            Ok(p) => {
                for w in &p.warnings {
                    warn!(file = %name, "{w}");
                }
                info!(file = %name, "loaded {name}: {} resources", p.resources.len());
                let changed = state.resources != p.resources;
                state.resources = p.resources;
                changed
            }
            Err(e) => {
                let kept = state.resources.len();
                error!(file = %name, "error in {e}; keeping the file's last good content ({kept} resources)");
                false
            }
        }
    }

    /// All files' resources, files in path order; a later file's copy of an object wins.
    pub(crate) fn merged(&self) -> ResourceSet {
        let mut set = ResourceSet::default();
        let mut owner: BTreeMap<String, &Path> = BTreeMap::new();
        for (path, state) in &self.files {
            for r in &state.resources {
                let what = r.describe();
                if set.insert(r.clone())
                    && let Some(first) = owner.get(&what)
                {
                    warn!(
                        "{what} is defined in both {} and {}; using the latter",
                        self.name(first),
                        self.name(path)
                    );
                }
                owner.insert(what, path);
            }
        }
        set
    }
}

/// Manifest files under `dir`, sorted; hidden entries (editor swap files, `..data` of
/// Kubernetes volume mounts) are skipped.
fn list(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, 0, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let Ok(md) = std::fs::metadata(&path) else {
            continue;
        };
        if md.is_dir() {
            if depth < MAX_DEPTH {
                // A subdirectory that cannot be read is skipped, not fatal for the rest.
                if let Err(e) = walk(&path, depth + 1, out) {
                    warn!(dir = %path.display(), "cannot list: {e}");
                }
            }
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";

    #[test]
    fn bad_edits_keep_last_good_and_deletes_remove() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let f = dir.path().join("sub/ns.yaml");
        std::fs::write(&f, NS).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut s = Scanner::new(dir.path().to_path_buf());
        assert!(s.scan(true));
        assert!(s.merged().namespaces.contains_key("a"));
        std::fs::write(&f, "apiVersion: v1\nkind: Namespace\nmetadata: [oops\n").unwrap();
        // First poll sees the change, the second reads it (it held still).
        assert!(!s.scan(false));
        assert!(!s.scan(false));
        assert!(
            s.merged().namespaces.contains_key("a"),
            "last good content stays"
        );
        std::fs::remove_file(&f).unwrap();
        assert!(s.scan(false));
        assert!(s.merged().namespaces.is_empty());
    }
}
