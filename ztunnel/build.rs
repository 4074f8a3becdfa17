//! Builds the eBPF capture programs (`../ztunnel-ebpf`) for the BPF target with aya-build, so
//! `src/ebpf.rs` can embed the object. Needs bpf-linker and rust-src (`cargo xtask deps`
//! installs both). Owns nothing else.

use std::path::Path;

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
    )
}
