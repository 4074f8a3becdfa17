//! The CA's roots: which root signs, which roots are trusted, and rotating them live.
//!
//! Layout under `<state>/ca/`: `root-cert.pem` + `root-key.pem` sign; `next/` holds a root being
//! introduced (trusted, not yet signing); `trusted/*.pem` holds retired signers still trusted.
//! A rotation that drops nothing is three steps, each waiting for the mesh to catch up:
//!
//! 1. [`prepare`]: make `next/`. The bundle becomes {old, new}; certificates are still signed by
//!    the old root, and every ztunnel renews its certificates to pick up the new bundle.
//! 2. [`activate`]: `next/` becomes the signer; the old root moves to `trusted/`. New
//!    certificates chain to the new root and verify everywhere, because everyone trusts both.
//! 3. [`retire`]: once old-signed certificates have been renewed, drop `trusted/`.
//!
//! meshd polls the directory ([`watch`]) and pushes the bundle to the data plane through the
//! config stream. Established connections are never touched. Owns these files only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshcore::ca::{CaError, CertAuthority};
use tokio::sync::watch;
use tracing::{error, info};

#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("CA {dir}: {source}")]
    Ca { dir: String, source: CaError },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no root is being introduced: run `meshd ca prepare-rotation` first")]
    NothingToActivate,
}

/// The signing root and every root the mesh trusts (signer first, no duplicates).
pub struct Roots {
    pub signer: Arc<CertAuthority>,
    pub bundle: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RootsError + '_ {
    move |source| RootsError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn ca_err(dir: &Path) -> impl FnOnce(CaError) -> RootsError + '_ {
    move |source| RootsError::Ca {
        dir: dir.display().to_string(),
        source,
    }
}

/// Loads the roots, creating the first signing root on a fresh state directory.
pub fn load(ca_dir: &Path, trust_domain: &str) -> Result<Roots, RootsError> {
    let signer = CertAuthority::load_or_create(ca_dir, trust_domain).map_err(ca_err(ca_dir))?;
    let mut bundle = vec![signer.root_pem().to_string()];
    let next = ca_dir.join("next");
    if next.join("root-cert.pem").exists() {
        let pem = std::fs::read_to_string(next.join("root-cert.pem")).map_err(io(&next))?;
        bundle.push(pem);
    }
    for path in trusted_files(ca_dir)? {
        bundle.push(std::fs::read_to_string(&path).map_err(io(&path))?);
    }
    let mut seen = std::collections::HashSet::new();
    bundle.retain(|pem| seen.insert(pem.trim().to_string()));
    Ok(Roots {
        signer: Arc::new(signer),
        bundle,
    })
}

fn trusted_files(ca_dir: &Path) -> Result<Vec<PathBuf>, RootsError> {
    let dir = ca_dir.join("trusted");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pem"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(&dir)(e)),
    };
    files.sort();
    Ok(files)
}

/// A cheap fingerprint of the directory: names, sizes and modification times.
fn fingerprint(ca_dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    let mut stack = vec![ca_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) => out.push((p, m.len(), m.modified().ok())),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// Polls the CA directory and publishes the roots whenever they change. A directory caught in
/// an inconsistent state (say, mid-rotation) is logged and the last good roots stay in force.
pub fn watch(
    ca_dir: PathBuf,
    trust_domain: String,
    first: Roots,
    every: Duration,
) -> watch::Receiver<Arc<Roots>> {
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut last = fingerprint(&ca_dir);
        loop {
            tokio::time::sleep(every).await;
            if tx.is_closed() {
                return;
            }
            let now = fingerprint(&ca_dir);
            if now == last {
                continue;
            }
            let loaded = {
                let (dir, td) = (ca_dir.clone(), trust_domain.clone());
                tokio::task::spawn_blocking(move || load(&dir, &td)).await
            };
            match loaded {
                Ok(Ok(roots)) => {
                    last = now;
                    info!(
                        roots = roots.bundle.len(),
                        "CA roots changed; pushing the new trust bundle"
                    );
                    tx.send_replace(Arc::new(roots));
                }
                Ok(Err(e)) => {
                    error!(error = %e, "CA directory unusable right now; keeping the last good roots")
                }
                Err(e) => error!(error = %e, "CA reload task failed"),
            }
        }
    });
    rx
}

/// Step 1: create the next root (trusted at once, not yet signing).
pub fn prepare(ca_dir: &Path, trust_domain: &str) -> Result<(), RootsError> {
    let next = ca_dir.join("next");
    CertAuthority::load_or_create(&next, trust_domain).map_err(ca_err(&next))?;
    Ok(())
}

/// Step 2: the next root starts signing; the old one stays trusted under `trusted/`.
pub fn activate(ca_dir: &Path) -> Result<(), RootsError> {
    let next = ca_dir.join("next");
    if !next.join("root-cert.pem").exists() || !next.join("root-key.pem").exists() {
        return Err(RootsError::NothingToActivate);
    }
    let trusted = ca_dir.join("trusted");
    {
        use std::os::unix::fs::DirBuilderExt;
        // Private like the rest of the CA's directory (see `state::ensure_dir`).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&trusted)
            .map_err(io(&trusted))?;
    }
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let old = ca_dir.join("root-cert.pem");
    let keep = trusted.join(format!("root-{stamp}.pem"));
    let tmp = trusted.join(format!(".root-{stamp}.tmp"));
    std::fs::copy(&old, &tmp).map_err(io(&old))?;
    std::fs::rename(&tmp, &keep).map_err(io(&keep))?;
    // Each rename replaces a file in place, so a concurrent reader never sees one missing (it
    // may see a mismatched pair for an instant, which fails to load and is retried).
    for f in ["root-key.pem", "root-cert.pem"] {
        std::fs::rename(next.join(f), ca_dir.join(f)).map_err(io(&next))?;
    }
    std::fs::remove_dir_all(&next).map_err(io(&next))?;
    Ok(())
}

/// Step 3: stop trusting retired roots. Returns how many were dropped.
pub fn retire(ca_dir: &Path) -> Result<usize, RootsError> {
    let files = trusted_files(ca_dir)?;
    for f in &files {
        std::fs::remove_file(f).map_err(io(f))?;
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_steps_change_bundle_and_signer() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let first = load(&ca, "td").unwrap();
        assert_eq!(first.bundle.len(), 1);
        prepare(&ca, "td").unwrap();
        let mid = load(&ca, "td").unwrap();
        assert_eq!(mid.bundle.len(), 2, "old and next both trusted");
        assert_eq!(
            mid.signer.root_pem(),
            first.signer.root_pem(),
            "old root still signs"
        );
        activate(&ca).unwrap();
        let after = load(&ca, "td").unwrap();
        assert_ne!(
            after.signer.root_pem(),
            first.signer.root_pem(),
            "new root signs"
        );
        assert_eq!(after.bundle.len(), 2);
        assert!(
            after.bundle.iter().any(|p| p == first.signer.root_pem()),
            "old root still trusted"
        );
        assert_eq!(retire(&ca).unwrap(), 1);
        let done = load(&ca, "td").unwrap();
        assert_eq!(done.bundle, vec![after.signer.root_pem().to_string()]);
        assert!(matches!(activate(&ca), Err(RootsError::NothingToActivate)));
    }
}
