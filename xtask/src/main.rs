//! `cargo xtask <command>`: the project's own commands. Each installs what a fresh machine of
//! our kind lacks (idempotently) before doing its job.
//!
//! - `deps`   install system packages the mesh and its tests use
//! - `test`   the whole test suite (what CI runs)
//! - `demo`   the local-mode demo; `--interactive` keeps it up
//! - `local`  run local mode with your own manifests
//! - `bench`  raw TCP vs mesh, eBPF vs nftables capture, fast path on/off, a rolling update of
//!   ztunnel under load, 10k policies: ratios from one run

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project commands for the mesh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing system packages (nftables, iproute2, tcpdump, python3 h2…).
    Deps,
    /// Build everything and run the whole test suite, then check nothing was left behind.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the local-mode demo. Exits 0 only if every check held.
    Demo {
        /// Stay up after the report and explain how to poke the mesh.
        #[arg(long)]
        interactive: bool,
    },
    /// Run local mode with your own manifests (a directory of Kubernetes YAML).
    Local {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
    },
    /// Benchmark raw TCP vs the mesh on the same path; prints ratios.
    Bench {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Run only one scenario: `l4` (raw vs mesh), `capture` (eBPF vs nftables), `fastpath`
        /// (same-node bulk with/without `--fast-path`), `restart` (a rolling update of both
        /// ztunnels under load) or `policy` (10,000 policies).
        #[arg(long, value_parser = ["l4", "capture", "fastpath", "restart", "policy"])]
        only: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Tools from `cargo install` (bpf-linker) live in $CARGO_HOME/bin; build scripts call them
    // by name.
    let cargo_home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    let path = std::env::var("PATH").unwrap_or_default();
    if !path.split(':').any(|p| p == format!("{cargo_home}/bin")) {
        // SAFETY: first thing in main, before any other thread exists.
        unsafe { std::env::set_var("PATH", format!("{cargo_home}/bin:{path}")) };
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()?;
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Deps => deps(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo { interactive } => {
            need_root()?;
            deps()?;
            build(false)?;
            let ok = localmesh::demo::run(localmesh::demo::DemoOptions {
                interactive,
                examples: root.join("examples/demo"),
            })?;
            if !ok {
                bail!("some demo checks failed (logs are kept under /tmp/mesh-testbed)");
            }
            Ok(())
        }
        Cmd::Local { manifests, nodes } => {
            need_root()?;
            deps()?;
            build(false)?;
            local(&manifests, nodes)
        }
        Cmd::Bench { seconds, only } => {
            need_root()?;
            deps()?;
            build(true)?;
            // SAFETY: no other thread exists yet that could read the environment concurrently.
            unsafe { std::env::set_var("MESH_BIN_DIR", root.join("target/release")) };
            let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
            if want("l4") {
                let rows = localmesh::bench::run(localmesh::bench::BenchOptions {
                    duration: Duration::from_secs(seconds),
                })?;
                localmesh::bench::print(&rows);
            }
            let opts = || localmesh::bench::BenchOptions {
                duration: Duration::from_secs(seconds),
            };
            if want("capture") {
                let rows = localmesh::bench::run_capture(opts())?;
                localmesh::bench::print_table(
                    "capture, cross-node (same run)",
                    "nftables",
                    "eBPF",
                    &rows,
                );
            }
            if want("fastpath") {
                let rows = localmesh::bench::run_fastpath(opts())?;
                localmesh::bench::print_table(
                    "same-node, eBPF (same run)",
                    "no fast path",
                    "fast path",
                    &rows,
                );
            }
            if want("restart") {
                let r = localmesh::bench_restart::run(Duration::from_secs(seconds.max(5)))?;
                localmesh::bench::print_table(
                    "rolling update of both ztunnels",
                    "steady",
                    "during",
                    &r.rows,
                );
                println!(
                    "{:<32} {:>10} {:<3} {:>10} {:<3}   (handover took {:.2?})",
                    "failed connections", r.errors_steady, "", r.errors_during, "", r.handover
                );
            }
            if !want("policy") {
                return Ok(());
            }
            let n = 10_000;
            let (without, with) = localmesh::bench_policy::run(Duration::from_secs(seconds), n)?;
            println!(
                "{:<32} {:>10.2} {:<3} {:>10.2} {:<3} {:>9.2}x   (no policy vs {n} policies)",
                "L4 authz: new connections",
                without,
                "c/s",
                with,
                "c/s",
                with / without
            );
            Ok(())
        }
    }
}

fn need_root() -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("local mode creates network namespaces and nftables rules: run as root");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd} >/dev/null 2>&1"))
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs what is missing, and only that.
fn deps() -> anyhow::Result<()> {
    let wanted = [
        ("nft", "nftables"),
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("tcpdump", "tcpdump"),
        ("curl", "curl"),
        ("python3", "python3"),
        ("bpftool", "bpftool"),
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
        .args(["-c", "import h2, prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !h2 {
        eprintln!("xtask: installing the Python h2 package (independent HBONE peer in tests)");
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            "h2",
            "prometheus_client",
        ]))?;
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

fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn test(args: &[String]) -> anyhow::Result<()> {
    need_root()?;
    deps()?;
    build(false)?;
    // Two mesh tests at a time keep a 2-core machine responsive.
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .args(args)
        .env("RUST_TEST_THREADS", "2");
    let mut suite = run(&mut cmd);
    // The mesh end-to-end tests once more in the other capture mode (the default run used
    // $MESH_CAPTURE or localmesh's default, eBPF).
    let other = if std::env::var("MESH_CAPTURE").is_ok_and(|m| m == "nftables") {
        "ebpf"
    } else {
        "nftables"
    };
    let mut again = Command::new(env!("CARGO"));
    again
        .args([
            "test",
            "-p",
            "mesh-tests",
            "--no-fail-fast",
            "--test",
            "l4",
            "--test",
            "policy",
            "--test",
            "wire_compat",
            "--test",
            "handover",
        ])
        .args(args)
        .env("RUST_TEST_THREADS", "2")
        .env("MESH_CAPTURE", other);
    let second = run(&mut again).with_context(|| format!("mesh tests with MESH_CAPTURE={other}"));
    if suite.is_ok() {
        suite = second;
    } else if let Err(e) = second {
        eprintln!("xtask: {e:#}");
    }
    // Whatever happened, check that nothing of ours was left on the machine.
    let mut leaks = Command::new(env!("CARGO"));
    leaks.args([
        "test",
        "-p",
        "mesh-tests",
        "--test",
        "leaks",
        "--",
        "--ignored",
    ]);
    let leak_check = run(&mut leaks);
    suite.context("test suite failed")?;
    leak_check.context("leak check failed")
}

fn local(manifests: &Path, nodes: usize) -> anyhow::Result<()> {
    localmesh::demo::install_stop_handler()?;
    let mesh = localmesh::LocalMesh::start(localmesh::MeshOptions {
        nodes,
        ..Default::default()
    })?;
    localmesh::demo::apply_dir(&mesh, manifests)?;
    println!(
        "Local mode is up with {nodes} nodes. Manifests from {} are applied.",
        manifests.display()
    );
    println!(
        "meshd watches {} — edit files there to change the mesh live.",
        mesh.config_dir.display()
    );
    for p in mesh.cluster.pods() {
        println!(
            "  pod {:<28} node-{}  {}  ip netns exec {} …",
            p.name, p.node, p.ip4, p.netns.name
        );
    }
    println!(
        "Logs: {}/*.log. Ctrl-C stops and cleans up.",
        mesh.dir().display()
    );
    localmesh::demo::wait_for_stop();
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
