//! bpffs pins of an instance: replacing and removing link pins, removing a whole instance
//! directory, and which cgroup link pins a process made. Must not load or attach programs.

use std::io;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use tracing::info;

use super::EbpfError;

/// The cgroup link pins in `dir` with their inodes, sorted.
pub(super) fn link_pin_inodes(dir: &Path) -> Vec<(PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut pins: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.ino())))
        .collect();
    pins.sort();
    pins
}
/// Pins `link` at `path`; an earlier link pinned there (a previous run's) is unpinned after the
/// new one is attached, so the hook is never missing in between.
pub(super) fn replace_pin(link: FdLink, path: &Path) -> Result<(), EbpfError> {
    remove_pin(path)?;
    link.pin(path).map_err(|source| EbpfError::Pin {
        path: path.display().to_string(),
        source,
    })?;
    Ok(())
}

pub(super) fn remove_pin(path: &Path) -> Result<(), EbpfError> {
    match PinnedLink::from_pin(path) {
        // Dropping the unpinned link detaches it (if nothing else holds it).
        Ok(old) => {
            let _ = old.unpin();
        }
        Err(_) if !path.exists() => {}
        Err(_) => remove_if_present(std::fs::remove_file(path), path)?,
    }
    Ok(())
}

/// A removal that lost a race with another remover (a concurrent `cleanup`) still succeeded.
pub(super) fn remove_if_present(result: io::Result<()>, path: &Path) -> Result<(), EbpfError> {
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(EbpfError::Io {
            what: format!("removing {}", path.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Removes an instance directory and everything pinned in it.
pub fn remove_dir(dir: &Path) -> Result<(), EbpfError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(EbpfError::Io {
                what: format!("reading {}", dir.display()),
                source: e,
            });
        }
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("link_") || name.starts_with("sklookup_") {
            remove_pin(&path)?;
        } else {
            remove_if_present(std::fs::remove_file(&path), &path)?;
        }
    }
    remove_if_present(std::fs::remove_dir(dir), dir)?;
    info!(dir = %dir.display(), "eBPF pins removed");
    Ok(())
}
