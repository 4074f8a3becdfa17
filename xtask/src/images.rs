//! `cargo xtask images`: OCI image archives for the mesh's components, without a container
//! daemon. Each image has two layers: a base with exactly the shared libraries and dynamic
//! loader its programs need, taken from this Debian machine (recorded as package versions in a
//! label), plus the tools the component execs; then the component's binary. Owns what goes in
//! each image and its config; the format is [`oci`]'s, reading the host [`rootfs`]'s.

mod oci;
mod provenance;
mod rootfs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use flate2::Compression;
use serde_json::json;

use rootfs::{Entry, Tree};

/// One image.
struct Spec {
    /// The image's name (`mesh/<name>`) and its binary's.
    name: &'static str,
    /// Host programs the component execs, copied with their libraries at the same paths.
    tools: &'static [&'static str],
    /// Other names the binary is run by (symlinks beside it on PATH).
    aliases: &'static [&'static str],
    /// `uid:gid` the image runs as.
    user: &'static str,
    /// Why the component needs root, for those that do (a label says so).
    root_because: Option<&'static str>,
}

const SPECS: &[Spec] = &[
    Spec {
        name: "meshd",
        tools: &[],
        aliases: &[],
        user: "65532:65532",
        root_because: None,
    },
    Spec {
        name: "ztunnel",
        // nftables capture (capture.rs), policy routes in pods (origsrc.rs), mounting bpffs
        // when the node has none (ebpf.rs). The eBPF object is embedded in the binary.
        tools: &["/usr/sbin/nft", "/usr/sbin/ip", "/usr/bin/mount"],
        aliases: &[],
        user: "0:0",
        root_because: Some(
            "enters pod network namespaces and programs capture: needs root with NET_ADMIN, \
             SYS_ADMIN, NET_RAW, BPF, PERFMON (the DaemonSet grants exactly those)",
        ),
    },
    Spec {
        name: "waypoint",
        tools: &[],
        // The command of the waypoint Deployments meshd renders (meshd::waypoints).
        aliases: &["mesh-waypoint"],
        user: "65532:65532",
        root_because: None,
    },
    Spec {
        name: "mesh-cni",
        // The probe SNAT table in the node's network namespace (probe_snat.rs).
        tools: &["/usr/sbin/nft"],
        aliases: &[],
        user: "0:0",
        root_because: Some(
            "writes the host's CNI configuration and binary directories and opens pods' \
             network namespaces: needs root with SYS_ADMIN and NET_ADMIN",
        ),
    },
];

/// The image names `cargo xtask images` knows.
pub fn names() -> Vec<&'static str> {
    SPECS.iter().map(|s| s.name).collect()
}

pub struct Options {
    /// Take the binaries from here instead of building them (`cargo build --release`).
    pub bin_dir: Option<PathBuf>,
    pub out: PathBuf,
    /// Only these images (all when empty).
    pub only: Vec<String>,
    /// The source revision for the label (default: `git rev-parse HEAD`, `-dirty` if the
    /// tracked files differ from it).
    pub revision: Option<String>,
}

const PATH: &str = "PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin";

/// Builds the images; returns the archives written.
pub fn run(root: &Path, opts: Options) -> anyhow::Result<Vec<PathBuf>> {
    for o in &opts.only {
        if !SPECS.iter().any(|s| s.name == o) {
            bail!(
                "no image named {o:?}: the images are {}",
                names().join(", ")
            );
        }
    }
    let specs: Vec<&Spec> = SPECS
        .iter()
        .filter(|s| opts.only.is_empty() || opts.only.iter().any(|o| o == s.name))
        .collect();
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => {
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "--release", "--bins"]);
            for s in &specs {
                cmd.args(["-p", s.name]);
            }
            let status = cmd.status().context("running cargo build")?;
            if !status.success() {
                bail!("cargo build --release failed ({status})");
            }
            std::env::var("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|_| root.join("target"))
                .join("release")
        }
    };
    let version = env!("CARGO_PKG_VERSION");
    let revision = match opts.revision {
        Some(r) => r,
        None => provenance::git_revision(root),
    };
    let mtime = provenance::source_date(root);
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let mut written = Vec::new();
    for spec in specs {
        let out = opts.out.join(format!("{}-{version}.oci.tar", spec.name));
        let work = opts
            .out
            .join(format!(".work-{}-{}", spec.name, std::process::id()));
        std::fs::create_dir_all(&work)?;
        let ctx = Ctx {
            bin_dir: &bin_dir,
            work: &work,
            version,
            revision: &revision,
            mtime,
            level: Compression::default(),
        };
        let result = build_image(spec, &ctx, &out);
        let _ = std::fs::remove_dir_all(&work);
        result.with_context(|| format!("image {}", spec.name))?;
        let size = std::fs::metadata(&out)?.len();
        eprintln!(
            "xtask: {} ({:.1} MB) mesh/{}:{version}",
            out.display(),
            size as f64 / 1e6,
            spec.name
        );
        written.push(out);
    }
    Ok(written)
}

struct Ctx<'a> {
    bin_dir: &'a Path,
    work: &'a Path,
    version: &'a str,
    revision: &'a str,
    mtime: u64,
    level: Compression,
}

fn build_image(spec: &Spec, ctx: &Ctx, out: &Path) -> anyhow::Result<()> {
    let src = ctx.bin_dir.join(spec.name);
    if !src.is_file() {
        bail!(
            "{} is missing: build it first (cargo build --bins -p {})",
            src.display(),
            spec.name
        );
    }
    // Debug info stays on the build machine (symbols stay, for backtraces).
    let binary = ctx.work.join(spec.name);
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&binary)
        .arg(&src)
        .status()
        .context("running strip (binutils)")?;
    if !status.success() {
        bail!("strip --strip-debug {} failed ({status})", src.display());
    }

    let mut files: BTreeSet<PathBuf> = rootfs::shared_libraries(&binary)?;
    for tool in spec.tools {
        files.insert(PathBuf::from(tool));
        files.extend(rootfs::shared_libraries(Path::new(tool))?);
    }
    let packages = rootfs::packages_of(&files)?;
    let mut base = Tree::new();
    for f in &files {
        rootfs::add_host_path(&mut base, f)?;
    }
    for pkg in packages.keys() {
        if let Some(c) = rootfs::copyright_file(pkg) {
            rootfs::add_host_path(&mut base, &c)?;
        }
    }
    add_etc(&mut base);

    let mut app = Tree::new();
    for d in ["usr", "usr/local", "usr/local/bin"] {
        app.insert(d.into(), Entry::Dir { mode: 0o755 });
    }
    let entrypoint = format!("/usr/local/bin/{}", spec.name);
    app.insert(
        entrypoint.trim_start_matches('/').into(),
        Entry::File {
            from: binary.clone(),
            mode: 0o755,
        },
    );
    for alias in spec.aliases {
        app.insert(
            format!("usr/local/bin/{alias}").into(),
            Entry::Symlink {
                target: spec.name.into(),
            },
        );
    }

    let layers = [
        oci::write_layer(&base, ctx.mtime, ctx.level, ctx.work, "base.tar.gz")?,
        oci::write_layer(&app, ctx.mtime, ctx.level, ctx.work, "app.tar.gz")?,
    ];
    let package_list: Vec<String> = packages.iter().map(|(p, v)| format!("{p}={v}")).collect();
    let mut labels = BTreeMap::from([
        (
            "org.opencontainers.image.title".to_string(),
            spec.name.to_string(),
        ),
        (
            "org.opencontainers.image.version".into(),
            ctx.version.into(),
        ),
        (
            "org.opencontainers.image.revision".into(),
            ctx.revision.into(),
        ),
        (
            "org.opencontainers.image.licenses".into(),
            "Apache-2.0".into(),
        ),
        // Where the base layer's files come from, so its security updates can be tracked.
        ("dev.mesh.base.packages".into(), package_list.join(" ")),
    ]);
    if let Some(why) = spec.root_because {
        labels.insert("dev.mesh.runs-as-root".into(), why.into());
    }
    let created = provenance::rfc3339(ctx.mtime);
    let config = json!({
        "created": created,
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "User": spec.user,
            "Env": [PATH],
            "Entrypoint": [entrypoint],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": [
            {"created": created, "created_by": format!(
                "cargo xtask images: shared libraries and tools from Debian ({})",
                package_list.join(" "))},
            {"created": created, "created_by": format!("cargo xtask images: {entrypoint}")},
        ],
    });
    let config = oci::write_json_blob(&config, ctx.work, "config.json")?;
    let reference = format!("mesh/{}:{}", spec.name, ctx.version);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": oci::MANIFEST_TYPE,
        "config": config.descriptor(oci::CONFIG_TYPE),
        "layers": layers.iter().map(|l| l.blob.descriptor(oci::LAYER_TYPE)).collect::<Vec<_>>(),
    });
    let manifest = oci::write_json_blob(&manifest, ctx.work, "manifest.json")?;
    let mut descriptor = manifest.descriptor(oci::MANIFEST_TYPE);
    descriptor["platform"] = json!({"architecture": oci_arch(), "os": "linux"});
    descriptor["annotations"] = json!({
        "org.opencontainers.image.ref.name": reference,
        // containerd's import (`ctr images import`, `kind load image-archive`) names the image
        // from this one; the manifests' `mesh/<name>` is short for docker.io/mesh/<name>.
        "io.containerd.image.name": format!("docker.io/{reference}"),
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": oci::INDEX_TYPE,
        "manifests": [descriptor],
    });
    let blobs = [&manifest, &config, &layers[0].blob, &layers[1].blob];
    oci::write_archive(out, &index, &blobs, ctx.mtime)
}

/// /etc for a process that may run as the non-root user, and /tmp.
fn add_etc(tree: &mut Tree) {
    let data = |s: &str| Entry::Data {
        bytes: s.as_bytes().to_vec(),
        mode: 0o644,
    };
    tree.insert("etc".into(), Entry::Dir { mode: 0o755 });
    tree.insert(
        "etc/passwd".into(),
        data(
            "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n",
        ),
    );
    tree.insert("etc/group".into(), data("root:x:0:\nnonroot:x:65532:\n"));
    // glibc's resolver: the pod's /etc/hosts (kubelet's), then DNS (its resolv.conf).
    tree.insert(
        "etc/nsswitch.conf".into(),
        data("passwd: files\ngroup: files\nhosts: files dns\n"),
    );
    tree.insert("tmp".into(), Entry::Dir { mode: 0o1777 });
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
