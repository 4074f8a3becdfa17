//! Builds the eBPF capture programs (`../ztunnel-ebpf`) for the BPF target with aya-build, so
//! `src/ebpf.rs` can embed the object. Needs bpf-linker and rust-src (`cargo xtask deps`
//! installs both), then strips the object's DWARF. Owns nothing else.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

fn main() -> aya_build::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest).join("../ztunnel-ebpf");
    let common_dir = Path::new(&manifest).join("../ztunnel-ebpf-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.toml").display()
    );
    // The BPF target needs `core` built from source (-Z build-std); our toolchain is stable,
    // where RUSTC_BOOTSTRAP=1 unlocks that flag. The eBPF crate is its own workspace (it cannot
    // build for the host), so cargo must run from its directory.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    std::env::set_current_dir(&ebpf_dir)?;
    let root = ebpf_dir.to_string_lossy().into_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ztunnel-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )?;
    let object = Path::new(&std::env::var("OUT_DIR")?).join("ztunnel-ebpf");
    strip_debug(&object)
}

/// Drops the object's DWARF (`.debug_*`): ~1.1 MB of the 1.2 MB object, which `src/ebpf.rs`
/// embeds in the ztunnel binary and so in every ztunnel's resident pages. The loader needs only
/// `.BTF` and `.BTF.ext` (CO-RE relocations, map and program types), which `--strip-debug` keeps.
fn strip_debug(object: &Path) -> anyhow::Result<()> {
    // bpf-linker's LLVM (installed by `cargo xtask deps`) first; any llvm-objcopy understands BPF.
    for tool in ["llvm-objcopy-22", "llvm-objcopy"] {
        let status = match Command::new(tool).arg("--strip-debug").arg(object).status() {
            Ok(status) => status,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("running {tool}")),
        };
        if !status.success() {
            bail!("{tool} --strip-debug {} failed: {status}", object.display());
        }
        return Ok(());
    }
    bail!("llvm-objcopy not found (needed to strip the eBPF object): run `cargo xtask deps`")
}
