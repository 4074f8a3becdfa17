//! [`Backend`] over local mode's directories: the config directory meshd watches (manifest
//! files, read as meshd reads them: `.yaml`/`.yml`/`.json`, hidden entries skipped, through
//! [`meshcore::manifest::parse_docs`]) and the status directory meshd's `--write-dir` fills
//! (`Gateway.<ns>.<name>.json`).
//!
//! A new object gets its own file (`waypoint.<ns>.<name>.yaml` for a Gateway); an object some
//! file already declares is changed or removed in that file, every other document of the file
//! kept. Files are replaced atomically (temp file + rename), so meshd never reads half of one.
//! Owns only these files' reading and writing; what the objects mean is the commands'.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::backend::{Applied, Backend, BackendError, Kind, kind_and_name, name_of, namespace_of};

/// Directory levels followed under the config directory (meshd follows as deep; nobody nests
/// manifests this far).
const MAX_DEPTH: usize = 16;

pub struct LocalBackend {
    config_dir: PathBuf,
    status_dir: Option<PathBuf>,
}

/// One manifest file and its documents.
struct File {
    path: PathBuf,
    docs: Vec<Value>,
}

impl LocalBackend {
    pub fn new(config_dir: PathBuf, status_dir: Option<PathBuf>) -> LocalBackend {
        LocalBackend {
            config_dir,
            status_dir,
        }
    }

    /// Every manifest file, parsed, in path order. A file that cannot be read or parsed is an
    /// error naming it: editing around a file we cannot read could contradict it.
    fn files(&self) -> Result<Vec<File>, BackendError> {
        let mut paths = Vec::new();
        let md = std::fs::metadata(&self.config_dir).map_err(|e| {
            let hint = "--config-dir must be the directory of manifests meshd watches";
            source_msg(&self.config_dir, format!("{e} ({hint})"))
        })?;
        let mut visited = HashSet::from([(md.dev(), md.ino())]);
        walk(&self.config_dir, 0, &mut visited, &mut paths)?;
        paths
            .into_iter()
            .map(|path| {
                let text = read_limited(&path)?;
                let docs = meshcore::manifest::parse_docs(&text)
                    .map_err(|e| source_msg(&path, format!("{e} (fix or remove this file)")))?;
                Ok(File { path, docs })
            })
            .collect()
    }

    /// The file and document index declaring `kind` `namespace/name` (first in path order).
    fn find(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Option<(File, usize)>, BackendError> {
        for file in self.files()? {
            if let Some(i) = file.docs.iter().position(|d| is(kind, namespace, name, d)) {
                return Ok(Some((file, i)));
            }
        }
        Ok(None)
    }

    fn status_path(&self, kind: Kind, namespace: &str, name: &str) -> Option<PathBuf> {
        let file = match kind.namespaced() {
            true => format!("{}.{namespace}.{name}.json", kind.name()),
            false => format!("{}.{name}.json", kind.name()),
        };
        self.status_dir.as_ref().map(|d| d.join(file))
    }
}

impl Backend for LocalBackend {
    fn describe(&self) -> String {
        format!("config directory {}", self.config_dir.display())
    }

    fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Option<Value>, BackendError> {
        Ok(self
            .find(kind, namespace, name)?
            .map(|(mut f, i)| f.docs.swap_remove(i)))
    }

    fn list(&self, kind: Kind, namespace: Option<&str>) -> Result<Vec<Value>, BackendError> {
        let mut out: Vec<Value> = Vec::new();
        for file in self.files()? {
            for doc in file.docs {
                let wanted = kind.matches(&doc)
                    && name_of(&doc).is_some()
                    && namespace.is_none_or(|ns| !kind.namespaced() || namespace_of(&doc) == ns);
                // A second declaration of the same object is meshd's to report; list it once.
                if wanted && !out.iter().any(|o| same(kind, o, &doc)) {
                    out.push(doc);
                }
            }
        }
        Ok(out)
    }

    fn apply(&self, object: &Value) -> Result<Applied, BackendError> {
        let (kind, name) = kind_and_name(object)?;
        let namespace = namespace_of(object);
        match self.find(kind, namespace, name)? {
            Some((mut file, i)) => {
                if file.docs[i] == *object {
                    return Ok(Applied::Unchanged);
                }
                file.docs[i] = object.clone();
                write_docs(&file)?;
                Ok(Applied::Updated)
            }
            None => {
                let stem = match kind {
                    Kind::Gateway => format!("waypoint.{namespace}.{name}"),
                    Kind::Namespace => format!("namespace.{name}"),
                };
                let path = self.config_dir.join(format!("{stem}.yaml"));
                write_docs(&File {
                    path,
                    docs: vec![object.clone()],
                })?;
                Ok(Applied::Created)
            }
        }
    }

    fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<bool, BackendError> {
        let Some((mut file, i)) = self.find(kind, namespace, name)? else {
            return Ok(false);
        };
        file.docs.remove(i);
        if file.docs.is_empty() {
            std::fs::remove_file(&file.path).map_err(|e| source(&file.path, e))?;
        } else {
            write_docs(&file)?;
        }
        Ok(true)
    }

    fn set_namespace_label(
        &self,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<(), BackendError> {
        let Some((mut file, i)) = self.find(Kind::Namespace, "", namespace)? else {
            return Err(BackendError::NoNamespace {
                namespace: namespace.to_string(),
                place: self.describe(),
            });
        };
        let doc = &mut file.docs[i];
        let metadata = doc
            .as_object_mut()
            .and_then(|d| ensure_object(d, "metadata"));
        let metadata = metadata.ok_or_else(|| {
            source_msg(
                &file.path,
                format!("Namespace {namespace}: metadata is not a mapping"),
            )
        })?;
        let labels = ensure_object(metadata, "labels").ok_or_else(|| {
            source_msg(
                &file.path,
                format!("Namespace {namespace}: metadata.labels is not a mapping"),
            )
        })?;
        labels.insert(key.to_string(), Value::String(value.to_string()));
        write_docs(&file)
    }

    fn status(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, BackendError> {
        let path = self
            .status_path(kind, namespace, name)
            .ok_or(BackendError::NoStatusSource)?;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(source(&path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| source_msg(&path, format!("not status JSON: {e}")))
    }

    fn origin(&self, kind: Kind, namespace: &str, name: &str) -> Option<String> {
        let found = self.find(kind, namespace, name).ok()??;
        Some(found.0.path.display().to_string())
    }
}

fn is(kind: Kind, namespace: &str, name: &str, doc: &Value) -> bool {
    kind.matches(doc)
        && name_of(doc) == Some(name)
        && (!kind.namespaced() || namespace_of(doc) == namespace)
}

fn same(kind: Kind, a: &Value, b: &Value) -> bool {
    name_of(a).is_some_and(|n| is(kind, namespace_of(a), n, b))
}

/// `parent[key]` as a mapping, created when absent (or null); None when it is something else.
fn ensure_object<'a>(
    parent: &'a mut serde_json::Map<String, Value>,
    key: &str,
) -> Option<&'a mut serde_json::Map<String, Value>> {
    let slot = parent.entry(key).or_insert(Value::Null);
    if slot.is_null() {
        *slot = Value::Object(Default::default());
    }
    slot.as_object_mut()
}

/// Manifest files under `dir` as meshd lists them: hidden entries skipped, symlinks followed,
/// each directory (by device and inode) once.
fn walk(
    dir: &Path,
    depth: usize,
    visited: &mut HashSet<(u64, u64)>,
    out: &mut Vec<PathBuf>,
) -> Result<(), BackendError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| source(dir, e))? {
        entries.push(entry.map_err(|e| source(dir, e))?.path());
    }
    entries.sort();
    for path in entries {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let md = match std::fs::metadata(&path) {
            Ok(md) => md,
            // A dangling link: nothing there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(source(&path, e)),
        };
        if md.is_dir() {
            if depth < MAX_DEPTH && visited.insert((md.dev(), md.ino())) {
                walk(&path, depth + 1, visited, out)?;
            }
        } else if md.is_file()
            && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads a manifest, refusing one over meshcore's size limit without reading it all.
fn read_limited(path: &Path) -> Result<String, BackendError> {
    let f = std::fs::File::open(path).map_err(|e| source(path, e))?;
    let mut text = String::new();
    f.take(meshcore::manifest::MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| source(path, e))?;
    Ok(text)
}

/// Writes a file's documents back: a single-document `.json` file stays JSON, anything else
/// is a YAML stream.
fn write_docs(file: &File) -> Result<(), BackendError> {
    let json = file.path.extension().is_some_and(|e| e == "json");
    let text = if json && file.docs.len() == 1 {
        serde_json::to_string_pretty(&file.docs[0])
            .map(|s| s + "\n")
            .map_err(|e| source_msg(&file.path, e.to_string()))?
    } else {
        serde_saphyr::to_string_multiple(&file.docs)
            .map_err(|e| source_msg(&file.path, format!("writing YAML: {e}")))?
    };
    write_atomically(&file.path, &text)
}

/// Replaces `path` with `text` in one rename (temp file beside it, hidden so meshd skips it).
/// A new file is 0644 (meshd may run as another user; the directory guards access); a
/// rewritten one keeps its mode.
fn write_atomically(path: &Path, text: &str) -> Result<(), BackendError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("manifest");
    let tmp = path.with_file_name(format!(".{name}.meshctl-{}", std::process::id()));
    let mode = std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        source(path, e)
    })
}

fn source(path: &Path, e: std::io::Error) -> BackendError {
    source_msg(path, e.to_string())
}

fn source_msg(path: &Path, message: String) -> BackendError {
    BackendError::Source {
        path: path.display().to_string(),
        message,
    }
}
