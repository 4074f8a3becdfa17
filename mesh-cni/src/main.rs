//! `mesh-cni`: run by the container runtime as a CNI plugin (CNI_COMMAND set), or as
//! `mesh-cni agent` / `mesh-cni install` by the node DaemonSet. A thin dispatcher: one line
//! per mode.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mesh-cni",
    version,
    about = "The mesh's CNI plugin, node agent and installer"
)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Put the plugin into the node's CNI chain and keep it there.
    Install(mesh_cni::install::InstallArgs),
    /// The node agent: enrolls this node's ambient pods with ztunnel over ZDS.
    Agent(mesh_cni::agent::AgentArgs),
}

fn main() {
    if std::env::var_os("CNI_COMMAND").is_some() {
        std::process::exit(mesh_cni::plugin::main());
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let code = match Cli::parse().command {
        Mode::Install(args) => mesh_cni::install::run(args),
        Mode::Agent(args) => mesh_cni::agent::run(args),
    };
    std::process::exit(code);
}
