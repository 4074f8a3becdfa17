//! The kernel TLS probe says what the kernel does: on this machine's kernel, and on a kernel
//! that has kTLS (booted in a QEMU guest, `testbed::vm`), where it must find both HBONE suites
//! and key updates.

use std::time::Duration;

use meshcore::ktls::{self, KernelTls};
use testbed::vm::VmKernel;

/// Set in the guest: the test runs its checks there instead of booting another guest.
const IN_GUEST: &str = "MESH_KTLS_IN_GUEST";

/// The ULPs the kernel has registered (the probe's attempt loads `tls` if it can be loaded).
fn registered_ulps() -> Vec<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_probe_agrees_with_the_kernels_own_list() {
    let found = ktls::probe();
    let ulps = registered_ulps();
    match &found {
        KernelTls::Available { .. } => {
            assert!(ulps.iter().any(|u| u == "tls"), "{found} but ULPs {ulps:?}")
        }
        KernelTls::Unavailable { reason } => {
            assert!(
                !ulps.iter().any(|u| u == "tls"),
                "{reason} but ULPs {ulps:?}"
            );
            assert!(reason.contains("CONFIG_TLS"), "says what to fix: {reason}");
        }
    }
}

#[test]
fn a_kernel_with_ktls_is_found_with_key_updates() {
    if std::env::var_os(IN_GUEST).is_some() {
        let found = ktls::probe();
        println!("guest kernel: {found}; ULPs {:?}", registered_ulps());
        assert_eq!(found, KernelTls::Available { rekey: true });
        assert!(registered_ulps().iter().any(|u| u == "tls"));
        return;
    }
    let kernel = VmKernel::installed().expect("the guest kernel");
    let exe = std::env::current_exe().expect("this test's path");
    let out = kernel
        .run(
            &exe,
            &[
                "--exact",
                "a_kernel_with_ktls_is_found_with_key_updates",
                "--nocapture",
                "--test-threads=1",
            ],
            &[(IN_GUEST, "1")],
            Duration::from_secs(300),
        )
        .expect("booting the guest");
    assert_eq!(
        out.exit,
        Some(0),
        "under {}, console:\n{}",
        kernel.release,
        out.console
    );
    assert!(out.console.contains("1 passed"), "{}", out.console);
}
