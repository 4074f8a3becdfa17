//! What goes into an image's filesystem from this machine: a binary's shared libraries and
//! dynamic loader (as `ldd` resolves them), each copied at the same path with every symlink on
//! the way (Debian's merged /usr: `/lib64` → `usr/lib64` → …), and the Debian packages those
//! files come from (`dpkg -S`, versions by `dpkg-query`). Owns reading the host only; the
//! layers and the layout are `oci`'s.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// One entry of a layer, at a path relative to the image's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    /// A file's bytes from the host (read when the layer is written).
    File {
        from: PathBuf,
        mode: u32,
    },
    /// A file's bytes given here (small configuration files).
    Data {
        bytes: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: PathBuf,
    },
}

/// A layer's entries by path; a `BTreeMap` orders parents before their children, so the tar
/// is sorted and extracts in one pass.
pub type Tree = BTreeMap<PathBuf, Entry>;

/// Adds `path` (absolute, on the host) to `tree` at the same place, with every directory and
/// symlink met while resolving it, so that the image resolves it exactly as the host does.
pub fn add_host_path(tree: &mut Tree, path: &Path) -> anyhow::Result<()> {
    add_resolving(tree, path, 0)
}

fn add_resolving(tree: &mut Tree, path: &Path, depth: usize) -> anyhow::Result<()> {
    if depth > 16 {
        bail!("{}: too many levels of symlinks", path.display());
    }
    if !path.is_absolute() {
        bail!("{}: not an absolute path", path.display());
    }
    let mut host = PathBuf::from("/");
    let comps: Vec<Component> = path.components().skip(1).collect();
    for (i, comp) in comps.iter().enumerate() {
        match comp {
            Component::Normal(c) => host.push(c),
            Component::ParentDir => {
                host.pop();
                continue;
            }
            _ => continue,
        }
        let rel = host.strip_prefix("/")?.to_path_buf();
        let meta = std::fs::symlink_metadata(&host)
            .with_context(|| format!("reading {}", host.display()))?;
        let last = i + 1 == comps.len();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&host)?;
            tree.insert(
                rel,
                Entry::Symlink {
                    target: target.clone(),
                },
            );
            // Follow it, then resolve what is left of the path from where it leads.
            let parent = host.parent().unwrap_or(Path::new("/")).to_path_buf();
            let mut next = if target.is_absolute() {
                target
            } else {
                parent.join(target)
            };
            for rest in &comps[i + 1..] {
                next.push(rest);
            }
            return add_resolving(tree, &normalize(&next), depth + 1);
        } else if meta.is_dir() {
            tree.entry(rel).or_insert(Entry::Dir { mode: 0o755 });
            if last {
                bail!("{}: a directory, not a file", path.display());
            }
        } else if meta.is_file() && last {
            // World-readable (the image may run as non-root), no set-id bits.
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            tree.insert(
                rel,
                Entry::File {
                    from: host.clone(),
                    mode,
                },
            );
        } else {
            bail!("{}: not a regular file or directory", host.display());
        }
    }
    Ok(())
}

/// `a/b/../c` → `a/c` (lexically: symlinks are handled by the caller, one at a time).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// The shared libraries and the dynamic loader `binary` needs, as this machine's loader
/// resolves them (`ldd`, i.e. the loader itself in trace mode). Fails if one is missing.
pub fn shared_libraries(binary: &Path) -> anyhow::Result<BTreeSet<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (Debian's libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}{}",
            binary.display(),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))
}

fn parse_ldd(text: &str) -> anyhow::Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("a library is missing on this machine: {line}");
        }
        if line.contains("statically linked") {
            continue;
        }
        // `name => /path (0x…)`, `/lib64/ld-linux-x86-64.so.2 (0x…)` or the vDSO (no file).
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        }
    }
    if libs.is_empty() {
        bail!("no libraries and no loader listed; is this a dynamically linked ELF binary?");
    }
    Ok(libs)
}

/// The Debian packages owning `paths` (each path as given, else its canonical form: dpkg's
/// database predates merged /usr), with their installed versions, sorted by name.
pub fn packages_of(paths: &BTreeSet<PathBuf>) -> anyhow::Result<BTreeMap<String, String>> {
    let mut owners = BTreeSet::new();
    for p in paths {
        let mut found = None;
        for candidate in dpkg_spellings(p)? {
            found = dpkg_owner(&candidate)?;
            if found.is_some() {
                break;
            }
        }
        match found {
            Some(pkg) => owners.insert(pkg),
            None => bail!("{}: no Debian package owns it (dpkg -S)", p.display()),
        };
    }
    let mut versions = BTreeMap::new();
    for pkg in owners {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", &pkg])
            .output()
            .context("running dpkg-query")?;
        if !out.status.success() {
            bail!(
                "dpkg-query {pkg}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        versions.insert(pkg, String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    Ok(versions)
}

/// The names dpkg may know a file by on merged /usr: as given, canonical, and each with and
/// without the `/usr` prefix (packages list `/bin/mount` that now lives in `/usr/bin`).
fn dpkg_spellings(p: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let canonical =
        std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))?;
    let mut out = Vec::new();
    for q in [p.to_path_buf(), canonical] {
        let other = match q.strip_prefix("/usr") {
            Ok(rest) => Path::new("/").join(rest),
            Err(_) => Path::new("/usr").join(q.strip_prefix("/")?),
        };
        out.push(q);
        out.push(other);
    }
    Ok(out)
}

fn dpkg_owner(path: &Path) -> anyhow::Result<Option<String>> {
    let out = Command::new("dpkg")
        .arg("-S")
        .arg(path)
        .output()
        .context("running dpkg -S")?;
    if !out.status.success() {
        return Ok(None);
    }
    // `libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6`; diversions add other lines.
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| !l.starts_with("diversion"))
        .and_then(|l| l.split_once(": "))
        .map(|(pkg, _)| pkg.split(", ").next().unwrap_or(pkg).to_string()))
}

/// A package's copyright file (its licence: shipped with its binaries, as Debian's packages
/// require), if it has one.
pub fn copyright_file(package: &str) -> Option<PathBuf> {
    let name = package.split(':').next().unwrap_or(package);
    let p = PathBuf::from(format!("/usr/share/doc/{name}/copyright"));
    p.is_file().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parses_libraries_and_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs.into_iter().collect::<Vec<_>>(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn symlinks_on_the_way_are_kept() {
        let dir = std::env::temp_dir().join(format!("xtask-rootfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("usr/lib")).unwrap();
        std::fs::write(dir.join("usr/lib/libx.so.1.2"), b"x").unwrap();
        std::os::unix::fs::symlink("usr/lib", dir.join("lib")).unwrap();
        std::os::unix::fs::symlink("libx.so.1.2", dir.join("usr/lib/libx.so.1")).unwrap();
        let mut tree = Tree::new();
        add_host_path(&mut tree, &dir.join("lib/libx.so.1")).unwrap();
        let rel = dir.strip_prefix("/").unwrap();
        assert_eq!(
            tree.get(&rel.join("lib")),
            Some(&Entry::Symlink {
                target: "usr/lib".into()
            })
        );
        assert_eq!(
            tree.get(&rel.join("usr/lib/libx.so.1")),
            Some(&Entry::Symlink {
                target: "libx.so.1.2".into()
            })
        );
        assert!(matches!(
            tree.get(&rel.join("usr/lib/libx.so.1.2")),
            Some(Entry::File { mode: 0o644, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
