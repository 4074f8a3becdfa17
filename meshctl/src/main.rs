//! `meshctl`: parses the command line, picks the backend (local mode's directories with
//! `--config-dir`, else the cluster of `--kubeconfig` / $KUBECONFIG / in-cluster) and maps the
//! outcome to the exit code: 0 done, 1 error or a failed check (stderr or the report says what
//! to do), 2 usage.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use meshctl::cli::{Cli, Command, ManifestArgs, Overlay};
use meshctl::cluster::{Cluster, ClusterError};
use meshctl::local::LocalBackend;
use meshctl::manifests::{self, Manifests};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (&cli.command, &cli.config_dir) {
        (Command::Waypoint(w), Some(dir)) => {
            let backend = LocalBackend::new(dir.clone(), cli.status_dir.clone());
            meshctl::waypoint::run(&backend, w).map_err(|e| e.to_string())
        }
        (_, Some(_)) => usage(
            "install, check, status and uninstall work on clusters: drop --config-dir (and MESH_CONFIG_DIR), pass --kubeconfig FILE or set KUBECONFIG",
        ),
        (command, None) => {
            let cluster = match Cluster::connect(cli.kubeconfig.as_deref(), cli.context.as_deref())
            {
                Ok(c) => c,
                Err(e @ ClusterError::Infer(_)) if matches!(command, Command::Waypoint(_)) => {
                    usage(&format!(
                        "--config-dir DIR (or MESH_CONFIG_DIR) for local mode, or a cluster: {e}"
                    ))
                }
                Err(e) => fail(e),
            };
            on_cluster(&cluster, command)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// A command on a cluster; Err("") when the report already said everything.
fn on_cluster(cluster: &Cluster, command: &Command) -> Result<(), String> {
    let s = |e: &dyn std::fmt::Display| e.to_string();
    match command {
        Command::Waypoint(w) => meshctl::waypoint::run(cluster, w).map_err(|e| s(&e)),
        Command::Install(a) => {
            let m = load(&a.manifests)?;
            let wait = (!a.no_wait).then_some(a.timeout);
            meshctl::install::run(cluster, &m, a.dry_run, wait).map_err(|e| s(&e))
        }
        Command::Check(a) => {
            let m = load(&ManifestArgs {
                overlay: Overlay::Dev,
                manifests: None,
            })?;
            match meshctl::check::run(cluster, &m, a) {
                Ok(0) => Ok(()),
                Ok(_) => Err(String::new()),
                Err(e) => Err(s(&e)),
            }
        }
        Command::Status => {
            let m = load(&ManifestArgs {
                overlay: Overlay::Dev,
                manifests: None,
            })?;
            meshctl::status::run(cluster, &m).map_err(|e| s(&e))
        }
        Command::Uninstall(a) => {
            let m = load(&a.manifests)?;
            meshctl::uninstall::run(cluster, &m, a.crds, a.timeout, a.force).map_err(|e| s(&e))
        }
    }
}

fn load(args: &ManifestArgs) -> Result<Manifests, String> {
    let m = match (&args.manifests, args.overlay) {
        (Some(path), _) => Manifests::from_path(path),
        (None, Overlay::Dev) => Manifests::embedded("dev", manifests::DEV),
        (None, Overlay::Ha) => Manifests::embedded("ha", manifests::HA),
    };
    m.map_err(|e| e.to_string())
}

fn usage(message: &str) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::MissingRequiredArgument, message)
        .exit()
}

fn fail(e: ClusterError) -> ! {
    eprintln!("error: {e}");
    std::process::exit(1)
}
