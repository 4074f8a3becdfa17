//! Tests that must not take the shared machine down with them: run one `#[ignore]`d test alone
//! in a child process of the test binary, under a memory cap, and measure its peak memory. And
//! the hostile input those tests feed (a YAML alias bomb).
//!
//! Owns only these test helpers; nothing in the mesh's own binaries uses them.

use std::process::Command;

/// Caps this process's address space at `bytes`: call it first thing in a child test, so a
/// regression fails that test instead of exhausting the machine's memory.
pub fn limit_address_space(bytes: u64) {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: setrlimit reads the struct passed by reference and nothing else.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
}

/// This process's peak resident memory so far (VmHWM), in KiB.
pub fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

/// Runs the `#[ignore]`d test `name` (its full path in the test binary) alone in a child
/// process of the current test binary, and fails unless it passes.
pub fn run_child_test(name: &str) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {name}: {}\n{stdout}\n{stderr}",
        out.status
    );
}

/// The security audit's 5.7 KB YAML alias bomb (K=1000, J=200), as a document of `kind`: it
/// expands to 200 million nodes.
pub fn yaml_alias_bomb(kind: &str) -> String {
    let a = vec!["x"; 1000].join(",");
    let b = vec!["*a"; 1000].join(",");
    let z = vec!["*b"; 200].join(",");
    format!(
        "apiVersion: v1\nkind: {kind}\nmetadata: {{name: bomb}}\na: &a [{a}]\nb: &b [{b}]\nz: [{z}]\n"
    )
}
