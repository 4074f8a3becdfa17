//! meshd's state directory: the node-token secret (`node-secret`) and the CA (`ca/`).
//!
//! Owns creating and loading them with safe permissions. Does not decide what tokens
//! authorize, nor how certificates are made.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use meshcore::nodeauth::NodeAuthority;
use tracing::{info, warn};

const SECRET_FILE: &str = "node-secret";
const SECRET_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(
        "node secret {0} is shorter than {SECRET_LEN} bytes; remove it to have a new one made (all node tokens change)"
    )]
    ShortSecret(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Where the CA keeps its root.
pub fn ca_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ca")
}

/// Creates the state directory if missing and makes it and the CA's directories (`ca/`,
/// `ca/next`, `ca/trusted`) 0700 if they exist: they hold keys, and a directory made by hand or
/// by an older version may be wider. Enforced on every start, not only on creation.
pub fn ensure_dir(state_dir: &Path) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io_err(state_dir))?;
    let ca = ca_dir(state_dir);
    for dir in [
        state_dir.to_path_buf(),
        ca.join("next"),
        ca.join("trusted"),
        ca,
    ] {
        match std::fs::symlink_metadata(&dir) {
            Ok(md) if md.is_dir() && md.permissions().mode() & 0o777 != 0o700 => {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(&dir))?;
                info!(path = %dir.display(), was = format!("{:o}", md.permissions().mode() & 0o777), "state directory made private (0700)");
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
    }
    Ok(())
}

/// The node authority of this state directory, creating its secret on first use.
pub fn node_authority(state_dir: &Path) -> Result<NodeAuthority, StateError> {
    Ok(NodeAuthority::new(&load_or_create_secret(state_dir)?))
}

fn load_or_create_secret(state_dir: &Path) -> Result<Vec<u8>, StateError> {
    ensure_dir(state_dir)?;
    let path = state_dir.join(SECRET_FILE);
    match std::fs::read(&path) {
        Ok(secret) => return check(&path, secret),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path)(e)),
    }
    // Written whole under a temporary name, then linked into place: a concurrent
    // `meshd node-token` and `meshd run` can neither both win nor read a partial secret.
    let secret: [u8; SECRET_LEN] = rand::random();
    let tmp = state_dir.join(format!(".{SECRET_FILE}.{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&secret)?;
        f.sync_all()
    };
    write().map_err(io_err(&tmp))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            info!(path = %path.display(), "created a new node secret");
            Ok(secret.to_vec())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let secret = std::fs::read(&path).map_err(io_err(&path))?;
            check(&path, secret)
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn check(path: &Path, secret: Vec<u8>) -> Result<Vec<u8>, StateError> {
    if secret.len() < SECRET_LEN {
        return Err(StateError::ShortSecret(path.display().to_string()));
    }
    if let Ok(md) = std::fs::metadata(path)
        && md.permissions().mode() & 0o077 != 0
    {
        warn!(path = %path.display(), "node secret was readable by others (mode {:o}); set to 0600. Anyone who read it can mint tokens for any node: remove it to make a new one (all node tokens change)", md.permissions().mode() & 0o777);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_created_once_with_0600() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = node_authority(&state).unwrap().token_expiring_at("n", 1);
        let b = node_authority(&state).unwrap().token_expiring_at("n", 1);
        assert_eq!(a, b, "the secret persists");
        let md = std::fs::metadata(state.join(SECRET_FILE)).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(md.len(), SECRET_LEN as u64);
        // Modes loosened by hand (or left by an older version) are tightened on the next start.
        let ca = ca_dir(&state);
        std::fs::create_dir_all(ca.join("trusted")).unwrap();
        for (p, m) in [(&state, 0o755), (&ca, 0o755), (&ca.join("trusted"), 0o755)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        std::fs::set_permissions(
            state.join(SECRET_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        node_authority(&state).unwrap();
        for p in [&state, &ca, &ca.join("trusted")] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", p.display());
        }
        let md = std::fs::metadata(state.join(SECRET_FILE)).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        std::fs::write(state.join(SECRET_FILE), b"short").unwrap();
        assert!(matches!(
            node_authority(&state),
            Err(StateError::ShortSecret(_))
        ));
    }
}
