//! The kernel TLS probe says what the kernel does. (Under a kernel that has kTLS, the probe and
//! the whole kernel path are checked in a QEMU guest: `hbone::kernel`'s unit tests.)

use meshcore::ktls::{self, KernelTls};

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
