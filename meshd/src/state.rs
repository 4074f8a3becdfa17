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

/// Creates the state directory (0700: it holds keys) if missing.
pub fn ensure_dir(state_dir: &Path) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io_err(state_dir))
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
        warn!(path = %path.display(), "node secret is readable by others (mode {:o}); anyone who can read it can act as any node", md.permissions().mode() & 0o777);
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
        let a = node_authority(&state).unwrap().token("n");
        let b = node_authority(&state).unwrap().token("n");
        assert_eq!(a, b, "the secret persists");
        let md = std::fs::metadata(state.join(SECRET_FILE)).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(md.len(), SECRET_LEN as u64);
        std::fs::write(state.join(SECRET_FILE), b"short").unwrap();
        assert!(matches!(
            node_authority(&state),
            Err(StateError::ShortSecret(_))
        ));
    }
}
