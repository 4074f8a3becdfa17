//! Empty: the programs are the `ztunnel-ebpf` binary (src/main.rs).
#![no_std]
