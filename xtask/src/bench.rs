//! `cargo xtask bench`: runs the scenarios of `localmesh`'s benches (all, or the one `--only`
//! names) against release builds and prints their tables. Owns which scenarios run and how
//! they are printed; the measuring is `localmesh`'s, installing and building `main`'s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// `cargo xtask bench`'s arguments.
pub struct Options {
    pub seconds: u64,
    pub only: Option<String>,
    pub scale: usize,
    /// l4: a previous build's binaries, measured in the same run.
    pub baseline_bins: Option<PathBuf>,
    /// l4: rounds of every figure (each reported from its median round).
    pub rounds: u32,
}

/// Runs the wanted scenarios; `root` is the workspace (release binaries under target/release).
pub fn run(root: &Path, o: Options) -> anyhow::Result<()> {
    let Options {
        seconds,
        only,
        scale,
        baseline_bins,
        rounds,
    } = o;
    // SAFETY: called straight from main: no other thread exists yet that could read the
    // environment concurrently.
    unsafe { std::env::set_var("MESH_BIN_DIR", root.join("target/release")) };
    let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
    if baseline_bins.is_some() && !want("l4") {
        anyhow::bail!("--baseline-bins is for the l4 scenario: drop --only or use --only l4");
    }
    if want("l4") {
        // Absolute: the meshes run their processes from other directories.
        let baseline_bins = baseline_bins
            .map(|d| {
                std::path::absolute(&d).with_context(|| format!("--baseline-bins {}", d.display()))
            })
            .transpose()?;
        let report = localmesh::bench_l4::run(localmesh::bench::BenchOptions {
            duration: Duration::from_secs(seconds),
            baseline_bins,
            rounds,
        })?;
        localmesh::bench_l4::print(&report);
    }
    let opts = || localmesh::bench::BenchOptions {
        duration: Duration::from_secs(seconds),
        baseline_bins: None,
        rounds: 1,
    };
    if want("capture") {
        let rows = localmesh::bench::run_capture(opts())?;
        localmesh::bench::print_table("capture, cross-node (same run)", "nftables", "eBPF", &rows);
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
            "{:<32} {:>10} {:<9} {:>10} {:<9}   (handover took {:.2?})",
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
        "{:<32} {:>10.2} {:<9} {:>10.2} {:<9} {:>9.2}x   (no policy vs {n} policies)",
        "L4 authz: new connections",
        without,
        "c/s",
        with,
        "c/s",
        with / without
    );
    Ok(())
}
