//! The CA directory (`<state>/ca/`, laid out as `roots` describes) as a flat map of named
//! files, the shape of a Secret's `data`, and back.
//!
//! Keys: `root-cert.pem`, `root-key.pem` (the signer), `next-root-cert.pem`,
//! `next-root-key.pem` (a root being introduced), `trusted-<file>.pem` (retired roots still
//! trusted, `trusted/<file>.pem`). Owns the mapping and writing the directory from a map (files
//! 0600, directories 0700, unchanged files untouched so `roots::watch` sees only real changes,
//! new roots written before the signer changes and old ones removed after, so a reader never
//! sees a bundle missing a root it needs). The map may come from the API: every key is checked
//! against this list before it becomes a path. Does not talk to the API (`ca_secret`).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub type CaData = BTreeMap<String, Vec<u8>>;

const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";
const NEXT_PREFIX: &str = "next-";
const TRUSTED_PREFIX: &str = "trusted-";
/// A root certificate or key is a few hundred bytes; a Secret holds at most 1 MiB.
const MAX_FILE: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum CaFilesError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "CA data has an entry {0:?} meshd does not know (expected root-cert.pem, root-key.pem, next-root-cert.pem, next-root-key.pem, trusted-<name>.pem)"
    )]
    UnknownKey(String),
    #[error("CA data lacks {0}: it holds no usable root")]
    Missing(&'static str),
    #[error("CA data entry {0} is larger than {MAX_FILE} bytes")]
    TooLarge(String),
    #[error("CA file {0} cannot be stored (its name must be [A-Za-z0-9._-]+ ending in .pem)")]
    BadName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaFilesError + '_ {
    move |source| CaFilesError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Where a key's file lives under `ca_dir`, if the key is one of ours.
fn path_of(ca_dir: &Path, key: &str) -> Option<PathBuf> {
    match key {
        ROOT_CERT | ROOT_KEY => Some(ca_dir.join(key)),
        _ => {
            if let Some(f) = key.strip_prefix(NEXT_PREFIX) {
                return [ROOT_CERT, ROOT_KEY]
                    .contains(&f)
                    .then(|| ca_dir.join("next").join(f));
            }
            let f = key.strip_prefix(TRUSTED_PREFIX)?;
            safe_name(f).then(|| ca_dir.join("trusted").join(f))
        }
    }
}

/// A plain file name: no separators, not hidden, a `.pem`.
fn safe_name(f: &str) -> bool {
    !f.starts_with('.')
        && f.len() > 4
        && f.len() <= 200
        && f.ends_with(".pem")
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks data (say, from the API) before it is written anywhere.
pub fn validate(data: &CaData) -> Result<(), CaFilesError> {
    for (k, v) in data {
        if path_of(Path::new(""), k).is_none() {
            return Err(CaFilesError::UnknownKey(k.clone()));
        }
        if v.len() > MAX_FILE {
            return Err(CaFilesError::TooLarge(k.clone()));
        }
    }
    for need in [ROOT_CERT, ROOT_KEY] {
        if !data.contains_key(need) {
            return Err(CaFilesError::Missing(need));
        }
    }
    Ok(())
}

/// The CA directory's files as a map (empty if it holds no CA).
pub fn read(ca_dir: &Path) -> Result<CaData, CaFilesError> {
    let mut data = CaData::new();
    let mut add = |key: String, path: PathBuf| -> Result<(), CaFilesError> {
        match std::fs::read(&path) {
            Ok(v) => {
                data.insert(key, v);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    };
    for f in [ROOT_CERT, ROOT_KEY] {
        add(f.to_string(), ca_dir.join(f))?;
        add(format!("{NEXT_PREFIX}{f}"), ca_dir.join("next").join(f))?;
    }
    let trusted = ca_dir.join("trusted");
    let entries = match std::fs::read_dir(&trusted) {
        Ok(rd) => rd.collect::<Result<Vec<_>, _>>().map_err(io(&trusted))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(&trusted)(e)),
    };
    for e in entries {
        let name = e.file_name().to_string_lossy().to_string();
        // What `roots` reads: `*.pem`; its own temporary files are hidden and skipped.
        if name.starts_with('.') || !name.ends_with(".pem") {
            continue;
        }
        if !safe_name(&name) {
            return Err(CaFilesError::BadName(e.path().display().to_string()));
        }
        add(format!("{TRUSTED_PREFIX}{name}"), e.path())?;
    }
    Ok(data)
}

/// Makes `ca_dir` hold exactly `data` (validated first). Returns whether anything changed.
pub fn write(ca_dir: &Path, data: &CaData) -> Result<bool, CaFilesError> {
    validate(data)?;
    let has_next = data.keys().any(|k| k.starts_with(NEXT_PREFIX));
    let mut dirs = vec![ca_dir.to_path_buf(), ca_dir.join("trusted")];
    if has_next {
        dirs.push(ca_dir.join("next"));
    }
    for dir in dirs {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
    }
    let current = read(ca_dir)?;
    let mut changed = false;
    // Roots to trust first, the signer (key, then certificate) next.
    let order = |k: &str| match k {
        ROOT_KEY => 1,
        ROOT_CERT => 2,
        _ => 0,
    };
    let mut wanted: Vec<(&String, &Vec<u8>)> = data.iter().collect();
    wanted.sort_by_key(|(k, _)| order(k));
    for (k, v) in wanted {
        if current.get(k) == Some(v) {
            continue;
        }
        let Some(path) = path_of(ca_dir, k) else {
            return Err(CaFilesError::UnknownKey(k.clone()));
        };
        write_file(&path, v)?;
        changed = true;
    }
    for k in current.keys().filter(|k| !data.contains_key(*k)) {
        if let Some(path) = path_of(ca_dir, k) {
            match std::fs::remove_file(&path) {
                Ok(()) => changed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
    }
    // `roots::activate` treats `next/` with both files as a root being introduced; an empty
    // directory is nothing. Remove it when empty, as `activate` does.
    if !has_next {
        let _ = std::fs::remove_dir(ca_dir.join("next"));
    }
    Ok(changed)
}

/// Writes whole under a temporary name, then renames into place (0600: keys and certificates
/// alike, the directory is private anyway).
fn write_file(path: &Path, contents: &[u8]) -> Result<(), CaFilesError> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string());
    let tmp = path.with_file_name(format!(".{}.sync.tmp", name.unwrap_or_default()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()
    };
    write().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_rotated_directory_round_trips_through_the_map() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        crate::roots::load(&ca, "td").unwrap();
        crate::roots::prepare(&ca, "td").unwrap();
        let mid = read(&ca).unwrap();
        assert_eq!(mid.len(), 4, "{:?}", mid.keys());
        crate::roots::activate(&ca).unwrap();
        let after = read(&ca).unwrap();
        assert!(after.keys().any(|k| k.starts_with("trusted-root-")));

        let other = dir.path().join("other");
        assert!(write(&other, &mid).unwrap());
        assert_eq!(read(&other).unwrap(), mid);
        assert!(!write(&other, &mid).unwrap(), "nothing to change");
        assert!(write(&other, &after).unwrap());
        assert_eq!(read(&other).unwrap(), after);
        assert!(!other.join("next").exists(), "next/ went with activation");
        let roots = crate::roots::load(&other, "td").unwrap();
        assert_eq!(roots.bundle.len(), 2);
        assert_eq!(mode(&other), 0o700);
        assert_eq!(mode(&other.join("trusted")), 0o700);
        assert_eq!(mode(&other.join("root-key.pem")), 0o600);
        crate::roots::retire(&ca).unwrap();
        assert!(write(&other, &read(&ca).unwrap()).unwrap());
        assert_eq!(crate::roots::load(&other, "td").unwrap().bundle.len(), 1);
    }

    #[test]
    fn hostile_keys_never_become_paths() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = CaData::new();
        data.insert(ROOT_CERT.into(), b"c".to_vec());
        data.insert(ROOT_KEY.into(), b"k".to_vec());
        for bad in [
            "trusted-../../x.pem",
            "trusted-.hidden.pem",
            "trusted-a/b.pem",
            "next-other.pem",
            "node-secret",
        ] {
            let mut d = data.clone();
            d.insert(bad.into(), b"x".to_vec());
            assert!(
                matches!(write(dir.path(), &d), Err(CaFilesError::UnknownKey(_))),
                "{bad}"
            );
        }
        let mut d = data.clone();
        d.remove(ROOT_KEY);
        assert!(matches!(validate(&d), Err(CaFilesError::Missing(_))));
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing written"
        );
    }
}
