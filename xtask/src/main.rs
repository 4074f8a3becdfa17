//! `cargo xtask <command>`: the project's own commands. Each installs what a fresh machine of
//! our kind lacks (idempotently) before doing its job.
//!
//! - `deps`   install system packages the mesh and its tests use
//! - `test`   the whole test suite (what CI runs)
//! - `demo`   the local-mode demo; `--interactive` keeps it up; `--api`: meshd reads the Kubernetes API double
//! - `local`  run local mode with your own manifests
//! - `bench`  raw TCP vs mesh, eBPF vs nftables capture, fast path on/off, a rolling update of
//!   ztunnel under load, 10k policies, the waypoint's HTTP engine vs Envoy and nginx: ratios
//!   from one run; the control plane at 10k pods against the Kubernetes API double
//! - `fuzz`   the libFuzzer targets in fuzz/ (cargo-fuzz, nightly), each for a while
//! - `images` OCI image archives of meshd, ztunnel, waypoint and mesh-cni (no container daemon)
//!
//! This file owns the command line, `test`, `local` and the small helpers every command uses;
//! `deps`, `bench`, `fuzz` and `images` are modules of their own.

mod bench;
mod deps;
mod fuzz;
mod images;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use deps::deps;
use fuzz::{BackgroundBuild, FuzzBudget, fuzz};

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
        /// meshd reads a Kubernetes API (the test double, started with the mesh) instead of
        /// the config directory; the manifests are written there.
        #[arg(long)]
        api: bool,
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
        /// ztunnels under load), `policy` (10,000 policies), `waypoint` (the waypoint's HTTP
        /// engine vs Envoy and nginx as reverse proxies) or `control-plane` (meshd in Kubernetes
        /// mode with 10,000 pods, 1,000 Services, 1,000 policies and 100 nodes' subscribers).
        #[arg(long, value_parser = ["l4", "capture", "fastpath", "restart", "policy", "waypoint", "control-plane"])]
        only: Option<String>,
        /// control-plane: divide the cluster's size by this (10: 1,000 pods over 10 nodes).
        #[arg(long, default_value_t = 1)]
        scale: usize,
        /// l4: also measure the mesh pair with the `ztunnel` in this directory (e.g. a copy of
        /// target/release from the commit before a change), in the same run, interleaved per
        /// figure: prints before / after / ratio rows.
        #[arg(long, value_name = "DIR")]
        baseline_bins: Option<PathBuf>,
        /// l4: measure every figure this many times (interleaved rounds) and report each from
        /// its median round, with the spread and, with --baseline-bins, each round's ratio.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        rounds: u32,
    },
    /// Run the fuzz targets in fuzz/ (all, or one), each for a time or a number of runs.
    /// Crashes are saved under fuzz/artifacts/<target>/; new coverage under fuzz/corpus/.
    Fuzz {
        /// Only this target (see `cargo +nightly fuzz list --fuzz-dir fuzz`).
        #[arg(long)]
        target: Option<String>,
        /// Executions per target (after the seeds and regressions have run).
        #[arg(long, conflicts_with = "seconds")]
        runs: Option<u64>,
        /// Seconds per target (the default: 300).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Build OCI image archives (target/images/<name>-<version>.oci.tar, image mesh/<name>:<version>)
    /// of meshd, ztunnel, waypoint and mesh-cni from release builds, without a container daemon.
    Images {
        /// Use the binaries in this directory instead of building release ones.
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
        /// Where the archives go (relative paths: to the workspace root).
        #[arg(long, value_name = "DIR", default_value = "target/images")]
        out: PathBuf,
        /// Only this image (repeatable).
        #[arg(long, value_name = "NAME", value_parser = images::names())]
        only: Vec<String>,
        /// The source revision for the image label (default: git's HEAD, `-dirty` if changed).
        #[arg(long)]
        revision: Option<String>,
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
        Cmd::Demo { interactive, api } => {
            need_root()?;
            deps()?;
            build(false)?;
            let ok = localmesh::demo::run(localmesh::demo::DemoOptions {
                interactive,
                api,
                ..localmesh::demo::DemoOptions::new(root.join("examples/demo"))
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
        Cmd::Bench {
            seconds,
            only,
            scale,
            baseline_bins,
            rounds,
        } => {
            need_root()?;
            deps()?;
            build(true)?;
            let opts = bench::Options {
                seconds,
                only,
                scale,
                baseline_bins,
                rounds,
            };
            bench::run(&root, opts)
        }
        Cmd::Fuzz {
            target,
            runs,
            seconds,
        } => {
            let budget = match (runs, seconds) {
                (Some(n), _) => FuzzBudget::Runs(n),
                (None, s) => FuzzBudget::Seconds(s.unwrap_or(300)),
            };
            fuzz(target.as_deref(), budget, None)
        }
        Cmd::Images {
            bin_dir,
            out,
            only,
            revision,
        } => images::run(
            &root,
            images::Options {
                bin_dir,
                out: root.join(out),
                only,
                revision,
            },
        )
        .map(|_| ()),
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
    // The fuzz smoke's build (the longest single step) overlaps everything below.
    let fuzz_build = BackgroundBuild::start()?;
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
            "--test",
            "hostile",
            "--test",
            "waypoint_binding",
            "--test",
            "enrollment",
            "--test",
            "zds_enroll",
            "--test",
            "zds_paths",
            "--test",
            "zds_exclusions",
            "--test",
            "conn_hold",
            "--test",
            "endpoint_retry",
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
    // A short run of each fuzz target, so they keep building and the regression inputs keep
    // passing; `cargo xtask fuzz` is the real run.
    let fuzz_smoke = fuzz(None, FuzzBudget::Runs(2000), Some(fuzz_build));
    suite.context("test suite failed")?;
    leak_check.context("leak check failed")?;
    fuzz_smoke.context("fuzz smoke failed")
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
