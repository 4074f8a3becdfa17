//! Where the mesh's binaries are: `$MESH_BIN_DIR`, else the workspace's target directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Paths of the binaries local mode runs.
#[derive(Clone, Debug)]
pub struct Bins {
    pub meshd: PathBuf,
    pub ztunnel: PathBuf,
    pub echo: PathBuf,
    /// The L7 proxy run for `mesh-waypoint` containers; checked when such a pod starts, so a
    /// mesh without waypoints runs without it.
    pub waypoint: PathBuf,
    /// The user CLI (`meshctl waypoint ...`); checked where used, like the waypoint.
    pub meshctl: PathBuf,
    /// The CNI plugin, node agent and installer; checked when a mesh enrolls through CNI.
    pub cni: PathBuf,
}

impl Bins {
    /// Finds the binaries, preferring `$MESH_BIN_DIR`, then `$CARGO_TARGET_DIR/<profile>`, then
    /// this workspace's `target/debug` and `target/release` (newest wins).
    pub fn locate() -> anyhow::Result<Bins> {
        let dir = if let Ok(d) = std::env::var("MESH_BIN_DIR") {
            PathBuf::from(d)
        } else {
            let target = std::env::var("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
            let candidates = [target.join("debug"), target.join("release")];
            candidates
                .into_iter()
                .filter(|d| d.join("ztunnel").exists())
                .max_by_key(|d| d.join("ztunnel").metadata().and_then(|m| m.modified()).ok())
                .with_context(|| {
                    format!(
                        "no built ztunnel under {}: run `cargo build --bins` first",
                        target.display()
                    )
                })?
        };
        let bins = Bins {
            meshd: dir.join("meshd"),
            ztunnel: dir.join("ztunnel"),
            echo: dir.join("mesh-echo"),
            waypoint: dir.join("waypoint"),
            meshctl: dir.join("meshctl"),
            cni: dir.join("mesh-cni"),
        };
        for b in [&bins.meshd, &bins.ztunnel, &bins.echo] {
            if !b.exists() {
                bail!(
                    "{} is missing: run `cargo build --bins` (or set MESH_BIN_DIR)",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}
