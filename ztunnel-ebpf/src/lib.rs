//! Placeholder for the eBPF capture programs (aya-ebpf); see the eBPF capture issue.
