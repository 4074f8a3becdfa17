//! Run last by `cargo xtask test`: after the whole suite, nothing of ours may remain — no
//! network namespaces, scratch directories or processes from any test run.

#[test]
#[ignore = "run by `cargo xtask test` after the rest of the suite"]
fn nothing_left_behind() {
    if !mesh_tests::privileged() {
        return;
    }
    // Runs whose owner is still alive belong to someone else working on this machine right now
    // (a demo, another test run), not to this suite: every test process has exited by now.
    let left: Vec<String> = testbed::leftovers()
        .into_iter()
        .filter(|l| !owner_alive(l))
        .collect();
    assert!(left.is_empty(), "left behind by the test suite: {left:#?}");
    // No pinned eBPF state of a ztunnel that is gone (a live mesh's, such as a demo running
    // next to the suite, is not ours to judge), listed by the documented cleanup command.
    let bins = localmesh::Bins::locate().expect("locate the ztunnel binary");
    let out = std::process::Command::new(&bins.ztunnel)
        .args(["cleanup", "--orphans", "--dry-run"])
        .output()
        .expect("run ztunnel cleanup --orphans --dry-run");
    assert!(
        out.status.success(),
        "ztunnel cleanup --orphans --dry-run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pins = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        pins.is_empty(),
        "eBPF state left of stopped ztunnels:\n{pins}"
    );
    // Named instances (`--ebpf-instance`, never orphans to `--orphans`): the suite's are
    // `ztunnel@e2e-<run id>`; one whose run's owner is gone was left behind.
    let named: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|n| {
            let run = n.strip_prefix("ztunnel@e2e-")?.to_string();
            (!owner_alive(&format!("(run {run})"))).then_some(n)
        })
        .collect();
    assert!(named.is_empty(), "named eBPF instances left: {named:?}");
    // Our binaries must not be running either.
    let mut running = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        // Orphans only: a process of a live run still has its owner as parent.
        let ppid = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|st| {
                st.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string))
            })
            .unwrap_or_default();
        if matches!(comm.trim(), "ztunnel" | "meshd" | "mesh-echo") && ppid == "1" {
            running.push(format!(
                "{} ({})",
                comm.trim(),
                entry.file_name().to_string_lossy()
            ));
        }
    }
    assert!(running.is_empty(), "processes still running: {running:?}");
}

/// Whether the run named in a leftover line (`… (run <pid>-<hex>)`) is owned by a live process.
fn owner_alive(line: &str) -> bool {
    let pid = line
        .rsplit_once("(run ")
        .and_then(|(_, run)| run.split('-').next())
        .and_then(|p| p.parse::<i32>().ok());
    match pid {
        Some(pid) if pid as u32 != std::process::id() => {
            std::path::Path::new(&format!("/proc/{pid}")).exists()
        }
        _ => false,
    }
}
