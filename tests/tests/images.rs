//! `cargo xtask images`: each archive is read by an independent parser (Python's standard
//! library, tests/python/oci_image.py: layout, digests, sizes, diff_ids), its config is what a
//! cluster runs (entrypoint, user, PATH, labels), its ref name is the image the manifests name,
//! and its programs run from the image's files alone (chroot): the base layer holds every
//! library they need. A second build of an image gives the same bytes.
//!
//! The images are built from the binaries the suite already built (`--bin-dir`, debug ones):
//! the same code path as the release images, without a release build of the workspace (tens
//! of minutes on a small machine).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The image's own PATH decides where programs are found (the runtime's behaviour).
const NFT_RULES: &str = "table inet mesh_image_test {\n chain out {\n  type filter hook output priority 0;\n  meta mark 0x539 accept\n }\n}\n";

/// What each image must be.
struct Expect {
    name: &'static str,
    user: &'static str,
    /// Other names the binary runs by (meshd's waypoint Deployments run `mesh-waypoint`).
    aliases: &'static [&'static str],
    /// Programs the component execs, each run in the image (in a fresh network namespace).
    tools: &'static [(&'static [&'static str], &'static str)],
}

const IMAGES: &[Expect] = &[
    Expect {
        name: "meshd",
        user: "65532:65532",
        aliases: &[],
        tools: &[],
    },
    Expect {
        name: "ztunnel",
        user: "0:0",
        aliases: &[],
        tools: &[
            (&["nft", "-f", "-"], NFT_RULES),
            (&["ip", "-4", "rule", "show"], ""),
            (&["mount", "--version"], ""),
        ],
    },
    Expect {
        name: "waypoint",
        user: "65532:65532",
        aliases: &["mesh-waypoint"],
        tools: &[],
    },
    Expect {
        name: "mesh-cni",
        user: "0:0",
        aliases: &[],
        tools: &[(&["nft", "-f", "-"], NFT_RULES)],
    },
];

#[test]
fn image_archives_are_complete_and_run() {
    if !mesh_tests::privileged() {
        return;
    }
    let root = workspace();
    let bins = localmesh::Bins::locate().expect("locate the mesh's binaries");
    let scratch = Scratch::new();
    // The binaries as they are now: both builds below must see the same inputs even if the
    // target directory is rebuilt meanwhile (a linker replaces files; links keep the old ones).
    let bin_dir = scratch.0.join("bin");
    std::fs::create_dir_all(&bin_dir).expect("create the binaries' directory");
    for e in IMAGES {
        let src = bins.ztunnel.with_file_name(e.name);
        let dst = bin_dir.join(e.name);
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)
                .unwrap_or_else(|err| panic!("{}: {err} (cargo build --bins?)", src.display()));
        }
    }
    let first = scratch.0.join("first");
    xtask_images(&root, &bin_dir, &first, &[]);

    let refs: Vec<String> = IMAGES
        .iter()
        .map(|e| format!("mesh/{}:{VERSION}", e.name))
        .collect();
    let mut revision = String::new();
    for e in IMAGES {
        let archive = first.join(format!("{}-{VERSION}.oci.tar", e.name));
        let rootfs = scratch.0.join(format!("rootfs-{}", e.name));
        let s = inspect(&archive, &rootfs);
        let reference = format!("mesh/{}:{VERSION}", e.name);
        assert_eq!(
            s["annotations"]["org.opencontainers.image.ref.name"], reference,
            "{s}"
        );
        assert_eq!(s["os"], "linux");
        assert_eq!(s["layers"], 2, "base libraries and the binary: {s}");
        let c = &s["config"];
        let entry = format!("/usr/local/bin/{}", e.name);
        assert_eq!(c["Entrypoint"], serde_json::json!([entry]), "{s}");
        assert_eq!(c["User"], e.user, "{s}");
        assert_eq!(c["WorkingDir"], "/", "{s}");
        let labels = &c["Labels"];
        assert_eq!(labels["org.opencontainers.image.version"], VERSION);
        let rev = labels["org.opencontainers.image.revision"]
            .as_str()
            .unwrap_or_default();
        let hex = rev.trim_end_matches("-dirty");
        assert!(
            hex.len() == 40 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "revision label {rev:?} is not a git commit"
        );
        revision = rev.to_string();
        let packages = labels["dev.mesh.base.packages"]
            .as_str()
            .unwrap_or_default();
        assert!(packages.contains("libc6"), "base packages: {packages:?}");
        // Root only where the component needs it, and then the image says why.
        assert_eq!(
            labels.get("dev.mesh.runs-as-root").is_some(),
            e.user == "0:0",
            "{labels}"
        );
        let env: Vec<(String, String)> = c["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(env.iter().any(|(k, _)| k == "PATH"), "{s}");

        // The program runs from the image's files alone, as the image's user.
        for name in std::iter::once(&e.name).chain(e.aliases) {
            let out = in_image(&rootfs, e.user, &env, false, &[name, "--version"], "");
            assert_eq!(
                out.trim(),
                format!("{} {VERSION}", e.name),
                "{name} --version in {}",
                e.name
            );
        }
        for (argv, stdin) in e.tools {
            in_image(&rootfs, e.user, &env, true, argv, stdin);
        }
        std::fs::remove_dir_all(&rootfs).expect("remove the extracted rootfs");
    }
    manifests_name_the_images(&root, &refs);

    // The same inputs give the same bytes (so the same digests). The revision is passed on
    // (and both runs have the same SOURCE_DATE_EPOCH): a commit landing between the two runs
    // must not count as a difference.
    let again = scratch.0.join("again");
    xtask_images(
        &root,
        &bin_dir,
        &again,
        &["--only", "ztunnel", "--revision", &revision],
    );
    let a = std::fs::read(first.join(format!("ztunnel-{VERSION}.oci.tar"))).expect("read");
    let b = std::fs::read(again.join(format!("ztunnel-{VERSION}.oci.tar"))).expect("read");
    assert!(a == b, "two builds of the ztunnel image differ");
}

/// Every image the rendered manifests (base and each overlay) run is one of ours, and the
/// base runs meshd, ztunnel and mesh-cni.
fn manifests_name_the_images(root: &Path, refs: &[String]) {
    let manifests = root.join("manifests");
    let mut dirs = vec![manifests.join("base")];
    if let Ok(rd) = std::fs::read_dir(manifests.join("overlays")) {
        let mut overlays: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        overlays.sort();
        dirs.extend(overlays);
    }
    for dir in &dirs {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .expect("run kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let images: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("image:"))
            .map(|v| v.trim().trim_matches(['"', '\'']))
            .collect();
        for image in &images {
            assert!(
                refs.iter().any(|r| r == image),
                "{} runs {image}, which `cargo xtask images` does not build ({refs:?})",
                dir.display()
            );
        }
        if dir.ends_with("base") {
            for name in ["meshd", "ztunnel", "mesh-cni"] {
                let r = format!("mesh/{name}:{VERSION}");
                assert!(images.contains(&r.as_str()), "base does not run {r}");
            }
        }
    }
}

/// Runs `argv` in `rootfs` (chroot; `net`: in a fresh network namespace too) with the image's
/// environment and user; its stdout, or a failed assertion with its stderr.
fn in_image(
    rootfs: &Path,
    user: &str,
    env: &[(String, String)],
    net: bool,
    argv: &[&str],
    stdin: &str,
) -> String {
    let mut cmd = Command::new("unshare");
    if net {
        cmd.arg("--net");
    }
    cmd.arg("chroot")
        .arg(format!("--userspec={user}"))
        .arg(rootfs)
        .args(argv)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run unshare/chroot");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{argv:?} in {} as {user}: {}\n{}",
        rootfs.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The independent reader's summary; it extracts the image's filesystem into `rootfs`.
fn inspect(archive: &Path, rootfs: &Path) -> Value {
    let out = Command::new(std::env::var("MESH_PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(workspace().join("tests/python/oci_image.py"))
        .arg(archive)
        .arg("--rootfs")
        .arg(rootfs)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{} is not a valid image layout: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("oci_image.py's JSON")
}

/// `cargo xtask images --bin-dir <bins> --out <out> <extra…>` (the alias's own command).
fn xtask_images(root: &Path, bins: &Path, out: &Path, extra: &[&str]) {
    let status = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--package", "xtask", "--", "images"])
        .arg("--bin-dir")
        .arg(bins)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("SOURCE_DATE_EPOCH", "1764460800")
        .current_dir(root)
        .status()
        .expect("run cargo xtask images");
    assert!(status.success(), "cargo xtask images {extra:?}: {status}");
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// This run's directory under cargo's scratch area for integration tests; removed on drop,
/// and those of dead test processes removed on the next run.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("images-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = base.join(format!("images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
