//! `cargo xtask fuzz`: the cargo-fuzz targets under fuzz/ on nightly (installed if missing),
//! each with its libFuzzer limits, seeds, regressions and dictionary, and a summary of the
//! runs. Owns running the targets; the targets themselves are fuzz/'s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context, bail};

use crate::deps::have;
use crate::run;

/// How long each fuzz target runs.
#[derive(Clone, Copy, Debug)]
pub enum FuzzBudget {
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

/// The fuzz targets' build, running in the background at the lowest CPU priority.
///
/// Their sanitized release build takes ~7 minutes of a 2-core machine; `cargo xtask test` starts
/// it first so that it runs on what the suite leaves idle (a mesh test mostly waits on sockets
/// and namespaces; `nice 19` yields the CPU whenever a test or the workspace build wants it),
/// and `fuzz` waits for it instead of building. Dropped unfinished (the suite failed to build,
/// Ctrl-C), it kills the build.
pub struct BackgroundBuild {
    child: Option<Child>,
    log: PathBuf,
}

impl BackgroundBuild {
    pub fn start() -> anyhow::Result<Self> {
        fuzz_toolchain()?;
        std::fs::create_dir_all("fuzz/target")?;
        let log = Path::new("fuzz/target").join("build.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = nightly_cargo_niced();
        cmd.args(["fuzz", "build", "--fuzz-dir", "fuzz"])
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = cmd.spawn().context("starting the fuzz targets' build")?;
        eprintln!(
            "xtask: building the fuzz targets in the background (nice 19; log {})",
            log.display()
        );
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    /// Waits for the build; on failure the error carries the log's tail (cargo's reason).
    fn wait(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = child
            .wait()
            .context("waiting for the fuzz targets' build")?;
        if !status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            bail!(
                "building the fuzz targets failed with {status} ({}):\n{}",
                self.log.display(),
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for BackgroundBuild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the cargo-fuzz targets under fuzz/ with nightly (installing cargo-fuzz and the
/// toolchain if missing). Each run starts from fuzz/seeds/<t> and fuzz/regressions/<t> (inputs
/// that once failed, kept so they never fail again) and grows fuzz/corpus/<t>. The targets are
/// built here unless `built` is a build already under way.
pub fn fuzz(
    only: Option<&str>,
    budget: FuzzBudget,
    built: Option<BackgroundBuild>,
) -> anyhow::Result<()> {
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
    match built {
        Some(build) => build.wait()?,
        None => run(nightly_cargo().args(["fuzz", "build", "--fuzz-dir", "fuzz"]))?,
    }
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
    nightly(Command::new("cargo"))
}

/// [`nightly_cargo`] at the lowest CPU priority (coreutils' `nice`).
fn nightly_cargo_niced() -> Command {
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "19", "cargo"]);
    nightly(cmd)
}

/// Appends `+nightly` to a command that runs cargo, and unpins the toolchain.
fn nightly(mut cmd: Command) -> Command {
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
