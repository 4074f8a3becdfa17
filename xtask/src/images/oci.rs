//! The OCI image layout, written by hand (image-spec v1.1): gzip'd tar layers with their
//! digests, the image config, the manifest, `index.json`, `oci-layout`, and the archive holding
//! them. Everything is deterministic — fixed mtimes and owners, sorted entries, gzip without a
//! name or time — so the same inputs give the same digests. Owns the format only; what goes in
//! an image is `images`'s, the host files `rootfs`'s.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::rootfs::{Entry, Tree};

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// A content-addressed blob, kept in a file until the archive is written.
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    pub path: PathBuf,
}

impl Blob {
    pub fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.size})
    }
}

/// A layer: its compressed blob and the digest of its uncompressed tar (the config's diff_id).
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

/// Passes bytes through while hashing and counting them.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        let hex: String = self
            .hash
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (self.inner, format!("sha256:{hex}"), self.len)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A tar header for an entry owned by root with a fixed mtime.
fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h
}

/// Appends `tree`'s entries (already sorted) to a tar stream.
fn append_tree<W: Write>(tar: &mut tar::Builder<W>, tree: &Tree, mtime: u64) -> anyhow::Result<()> {
    for (path, entry) in tree {
        match entry {
            Entry::Dir { mode } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0, mtime);
                tar.append_data(&mut h, path, io::empty())?;
            }
            Entry::File { from, mode } => {
                let f = File::open(from).with_context(|| format!("opening {}", from.display()))?;
                let size = f.metadata()?.len();
                let mut h = header(tar::EntryType::Regular, *mode, size, mtime);
                // Exactly `size` bytes, even if the file grew since.
                tar.append_data(&mut h, path, f.take(size))
                    .with_context(|| format!("adding {}", from.display()))?;
            }
            Entry::Data { bytes, mode } => {
                let mut h = header(tar::EntryType::Regular, *mode, bytes.len() as u64, mtime);
                tar.append_data(&mut h, path, bytes.as_slice())?;
            }
            Entry::Symlink { target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, mtime);
                tar.append_link(&mut h, path, target)?;
            }
        }
    }
    Ok(())
}

/// Writes `tree` as a gzip'd tar layer into `dir`, hashing both forms on the way.
pub fn write_layer(
    tree: &Tree,
    mtime: u64,
    level: Compression,
    dir: &Path,
    name: &str,
) -> anyhow::Result<Layer> {
    let path = dir.join(name);
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let compressed = Hashing::new(BufWriter::new(file));
    // GzBuilder's defaults: no file name, mtime 0 — nothing varies between runs.
    let gz = flate2::GzBuilder::new().write(compressed, level);
    let mut tar = tar::Builder::new(Hashing::new(gz));
    append_tree(&mut tar, tree, mtime)?;
    let plain = tar.into_inner()?;
    let (gz, diff_id, _) = plain.finish();
    let compressed: Hashing<BufWriter<File>> = GzEncoder::finish(gz)?;
    let (mut file, digest, size) = compressed.finish();
    file.flush()?;
    Ok(Layer {
        blob: Blob { digest, size, path },
        diff_id,
    })
}

/// Writes `bytes` (a JSON document) as a blob file in `dir`.
pub fn write_json_blob(value: &Value, dir: &Path, name: &str) -> anyhow::Result<Blob> {
    let bytes = serde_json::to_vec(value)?;
    let path = dir.join(name);
    let mut h = Hashing::new(File::create(&path)?);
    h.write_all(&bytes)?;
    let (_, digest, size) = h.finish();
    Ok(Blob { digest, size, path })
}

/// Writes the image layout archive: `oci-layout`, `index.json`, then `blobs/sha256/…` sorted,
/// into `out` (via a temporary file, so a failed run leaves no half archive).
pub fn write_archive(out: &Path, index: &Value, blobs: &[&Blob], mtime: u64) -> anyhow::Result<()> {
    let tmp = out.with_extension("tar.part");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let mut tree = Tree::new();
    tree.insert(
        "oci-layout".into(),
        Entry::Data {
            bytes: br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            mode: 0o644,
        },
    );
    tree.insert(
        "index.json".into(),
        Entry::Data {
            bytes: serde_json::to_vec(index)?,
            mode: 0o644,
        },
    );
    tree.insert("blobs".into(), Entry::Dir { mode: 0o755 });
    tree.insert("blobs/sha256".into(), Entry::Dir { mode: 0o755 });
    for b in blobs {
        let hex = b.digest.trim_start_matches("sha256:");
        tree.insert(
            PathBuf::from("blobs/sha256").join(hex),
            Entry::File {
                from: b.path.clone(),
                mode: 0o644,
            },
        );
    }
    // The layout's own order (layout files first) rather than the tree's: readers that stream
    // the archive find index.json before the blobs.
    let (meta, rest): (Tree, Tree) = tree
        .into_iter()
        .partition(|(p, _)| p == Path::new("oci-layout") || p == Path::new("index.json"));
    append_tree(&mut tar, &meta, mtime)?;
    append_tree(&mut tar, &rest, mtime)?;
    tar.into_inner()?.flush()?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
