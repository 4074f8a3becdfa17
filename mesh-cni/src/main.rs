//! `mesh-cni`: run by the container runtime as a CNI plugin (CNI_COMMAND set), or as
//! `mesh-cni agent` / `mesh-cni install` by the node DaemonSet.

fn main() {
    eprintln!("mesh-cni: not built yet");
    std::process::exit(1);
}
