//! `meshctl`: parses the command line, picks the backend (local mode's directories) and maps
//! the outcome to the exit code: 0 done, 1 error (stderr says what to do), 2 usage.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use meshctl::cli::{Cli, Command};
use meshctl::local::LocalBackend;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(config_dir) = cli.config_dir else {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--config-dir DIR (or MESH_CONFIG_DIR) is required: the directory of manifests meshd watches",
            )
            .exit()
    };
    let backend = LocalBackend::new(config_dir, cli.status_dir);
    let result = match &cli.command {
        Command::Waypoint(w) => meshctl::waypoint::run(&backend, w),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
