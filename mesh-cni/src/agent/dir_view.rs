//! The Directory view: local mode's config directory (the YAML meshd reads), Namespace and Pod
//! documents only, parsed under [`meshcore::manifest`]'s budgets, polled for changes. A file
//! is re-parsed only when its size, mtime or inode changed; a file that stops parsing keeps
//! its last good documents (an editor's half-written save must not look like pods deleted).
//! Owns reading that directory; never writes it.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use super::view::{PodFacts, Snapshot, namespace_label, pod_facts};

/// How often the directory is looked at (design: ~200 ms; cheap, files are re-read only
/// when they changed).
pub const POLL: Duration = Duration::from_millis(200);
/// Subdirectory depth walked (meshd's config dirs are shallow).
const MAX_DEPTH: usize = 8;
/// Files looked at; beyond this the directory is not a config directory.
const MAX_FILES: usize = 10_000;

/// What one file contributed, and the stamp it was read at.
struct FileDocs {
    stamp: (u64, i64, i64, u64),
    pods: Vec<PodFacts>,
    namespaces: Vec<(String, Option<String>)>,
}

struct Inner {
    files: BTreeMap<PathBuf, FileDocs>,
    snapshot: Snapshot,
}

/// Local mode's config directory, polled.
pub struct DirView {
    dir: PathBuf,
    node: String,
    inner: Arc<Mutex<Inner>>,
    tx: Arc<watch::Sender<u64>>,
    /// Serialises refreshes (the poller and a lookup's miss).
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

impl DirView {
    /// Reads `dir` once and starts polling it (on the current tokio runtime).
    pub async fn start(dir: PathBuf, node: String) -> DirView {
        let (tx, _) = watch::channel(0u64);
        let view = DirView {
            dir,
            node,
            inner: Arc::new(Mutex::new(Inner {
                files: BTreeMap::new(),
                snapshot: Snapshot::default(),
            })),
            tx: Arc::new(tx),
            refreshing: Arc::new(tokio::sync::Mutex::new(())),
        };
        view.refresh().await;
        let poller = DirView {
            dir: view.dir.clone(),
            node: view.node.clone(),
            inner: view.inner.clone(),
            tx: view.tx.clone(),
            refreshing: view.refreshing.clone(),
        };
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                poller.refresh().await;
            }
        });
        view
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn snapshot(&self) -> Snapshot {
        lock(&self.inner).snapshot.clone()
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Re-reads what changed; bumps [`Self::changes`] if the snapshot differs.
    pub async fn refresh(&self) {
        let _one = self.refreshing.lock().await;
        let (dir, node, inner) = (self.dir.clone(), self.node.clone(), self.inner.clone());
        let changed = tokio::task::spawn_blocking(move || rescan(&dir, &node, &inner))
            .await
            .unwrap_or(false);
        if changed {
            self.tx.send_modify(|v| *v += 1);
        }
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// One pass over the directory; true if this node's snapshot changed.
fn rescan(dir: &Path, node: &str, inner: &Mutex<Inner>) -> bool {
    let mut listed = Vec::new();
    if let Err(e) = walk(dir, 0, &mut HashSet::new(), &mut listed) {
        // Unlistable: keep what we had (a missing dir at start is an empty cluster).
        tracing::debug!(dir = %dir.display(), error = %e, "config directory not listable");
        return false;
    }
    let mut guard = lock(inner);
    let mut files = std::mem::take(&mut guard.files);
    let mut next = BTreeMap::new();
    for (path, md) in listed {
        let stamp = (md.len(), md.mtime(), md.mtime_nsec(), md.ino());
        match files.remove(&path) {
            Some(old) if old.stamp == stamp => {
                next.insert(path, old);
            }
            old => match read_file(&path, md.len()) {
                Ok((pods, namespaces)) => {
                    next.insert(
                        path,
                        FileDocs {
                            stamp,
                            pods,
                            namespaces,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "config file not read; keeping its last good version");
                    if let Some(old) = old {
                        next.insert(path, old);
                    }
                }
            },
        }
    }
    let mut snapshot = Snapshot::default();
    for docs in next.values() {
        for (ns, label) in &docs.namespaces {
            snapshot.namespaces.insert(ns.clone(), label.clone());
        }
        for pod in &docs.pods {
            if pod.node.as_deref() == Some(node) {
                snapshot
                    .pods
                    .insert((pod.namespace.clone(), pod.name.clone()), pod.clone());
            }
        }
    }
    guard.files = next;
    let changed =
        snapshot.pods != guard.snapshot.pods || snapshot.namespaces != guard.snapshot.namespaces;
    guard.snapshot = snapshot;
    changed
}

type Docs = (Vec<PodFacts>, Vec<(String, Option<String>)>);

fn read_file(path: &Path, len: u64) -> Result<Docs, String> {
    if len > meshcore::manifest::MAX_FILE_BYTES {
        return Err(format!("{len} bytes is over the manifest size limit"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let docs = meshcore::manifest::parse_docs(&text).map_err(|e| e.to_string())?;
    let mut pods = Vec::new();
    let mut namespaces = Vec::new();
    for doc in docs {
        let kind = doc.get("kind").and_then(Value::as_str);
        let v1 = doc.get("apiVersion").and_then(Value::as_str) == Some("v1");
        match kind {
            Some("Pod") if v1 => pods.extend(pod_facts(&doc, "default")),
            Some("Namespace") if v1 => namespaces.extend(namespace_label(&doc)),
            _ => {}
        }
    }
    Ok((pods, namespaces))
}

/// Manifest files under `dir` (as meshd picks them: .yaml/.yml/.json, dotfiles skipped, each
/// directory once by device and inode).
fn walk(
    dir: &Path,
    depth: usize,
    seen: &mut HashSet<(u64, u64)>,
    out: &mut Vec<(PathBuf, std::fs::Metadata)>,
) -> std::io::Result<()> {
    let md = std::fs::metadata(dir)?;
    if !seen.insert((md.dev(), md.ino())) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') || out.len() >= MAX_FILES {
            continue;
        }
        let Ok(md) = std::fs::metadata(&path) else {
            continue;
        };
        if md.is_dir() {
            if depth < MAX_DEPTH {
                let _ = walk(&path, depth + 1, seen, out);
            }
        } else if md.is_file()
            && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
        {
            out.push((path, md));
        }
    }
    Ok(())
}
