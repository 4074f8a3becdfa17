//! Run last by `cargo xtask test`: after the whole suite, nothing of ours may remain — no
//! network namespaces, scratch directories or processes from any test run.

#[test]
#[ignore = "run by `cargo xtask test` after the rest of the suite"]
fn nothing_left_behind() {
    if !mesh_tests::privileged() {
        return;
    }
    let left = testbed::leftovers();
    assert!(left.is_empty(), "left behind by the test suite: {left:#?}");
    // No pinned eBPF state of any ztunnel.
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ztunnel-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        pins.is_empty(),
        "eBPF pins left under /sys/fs/bpf: {pins:?}"
    );
    // Our binaries must not be running either.
    let mut running = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if matches!(comm.trim(), "ztunnel" | "meshd" | "mesh-echo") {
            running.push(format!(
                "{} ({})",
                comm.trim(),
                entry.file_name().to_string_lossy()
            ));
        }
    }
    assert!(running.is_empty(), "processes still running: {running:?}");
}
