//! Installing the plugin into the node's CNI configuration: find the primary CNI's config
//! (the lexically first `.conf`/`.conflist` in the conf dir, as kubelet picks it), append our
//! entry as the chain's last plugin, and put it back whenever the primary rewrites the file;
//! remove it on uninstall. Owns the conf dir's files and our binary in the CNI bin dir only.
//!
//! Every write is a temporary file in the same dir renamed over the target, so the runtime
//! never reads half a config. Stopping `install` leaves the entry in place on purpose: while
//! the agent is away, the plugin fails pods' ADD (they retry) instead of letting them start
//! uncaptured. Only `--uninstall` (or the agent's uninstall) takes it out.

pub mod conf;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

pub use conf::{ConfError, PLUGIN_TYPE};

/// `mesh-cni install`.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// The host's CNI binary dir (mounted into the DaemonSet's pod).
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The host's CNI config dir.
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The plugin binary to copy (default: this executable).
    #[arg(long)]
    pub plugin_binary: Option<PathBuf>,
    /// The agent's socket, as the plugin will find it on the host.
    #[arg(long, default_value = crate::event::DEFAULT_PLUGIN_SOCKET)]
    pub agent_socket: String,
    /// Namespaces whose pods the plugin never enrolls (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "mesh-system")]
    pub exclude_namespaces: Vec<String>,
    /// How often the conf dir is checked for a rewritten or new primary config.
    #[arg(long, default_value_t = 1000)]
    pub poll_interval_ms: u64,
    /// Insert once (waiting for a primary config to appear) and exit, instead of keeping the
    /// entry in place.
    #[arg(long)]
    pub once: bool,
    /// Remove our entry from every config in the conf dir and our binary, then exit.
    #[arg(long)]
    pub uninstall: bool,
    /// While this file exists, nothing is inserted (the agent creates it before it takes our
    /// entry out on uninstall, so the watcher does not put it back).
    #[arg(long)]
    pub pause_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Conf(#[from] ConfError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { what, path, source }
}

/// What one pass over the conf dir did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// No config in the dir yet (the primary CNI has not written one).
    NoPrimary,
    /// Our entry was already in place in this file.
    InPlace(PathBuf),
    /// Our entry was (re)written into this file.
    Inserted(PathBuf),
}

/// Our chain entry, as the plugin reads it from its stdin netconf.
pub fn entry(agent_socket: &str, exclude_namespaces: &[String]) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "agent_socket": agent_socket,
        "exclude_namespaces": exclude_namespaces,
    })
}

/// Copies `from` to `<bin_dir>/mesh-cni` (mode 0755) by rename, so a runtime exec'ing the
/// plugin meanwhile runs either the old or the new binary, never a partial one.
pub fn install_binary(from: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp-{}", std::process::id()));
    if same_file(from, &target) {
        // Already linked there (a rename between two links of one file does nothing).
        return Ok(target);
    }
    let copy = || -> Result<(), InstallError> {
        // Same filesystem (local mode's nodes share the host's): a hard link, not a copy of
        // a large binary per node. Across mounts (a DaemonSet's container) it fails: copy.
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(from, &tmp).is_err() {
            std::fs::copy(from, &tmp).map_err(io("copying the plugin binary to", &tmp))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(io("making executable", &tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, &target).map_err(io("renaming into place", &target))
    };
    copy().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(target)
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Writes `text` to `path` by renaming a synced temporary file over it, keeping the
/// permissions of `mode_from` (the file being replaced), else 0644.
fn write_atomic(path: &Path, text: &str, mode_from: &Path) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("conf");
    // A name the runtime never loads (no conf extension), hidden.
    let tmp = dir.join(format!(".{name}.mesh-cni-tmp-{}", std::process::id()));
    let mode = std::fs::metadata(mode_from)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let write = || -> Result<(), InstallError> {
        let mut f = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(text.as_bytes()).map_err(io("writing", &tmp))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io("setting the mode of", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("renaming into place", path))
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// One pass: our entry last in the primary config's chain. Idempotent; a malformed primary
/// is an error and stays untouched.
pub fn insert(conf_dir: &Path, entry: &Value) -> Result<Pass, InstallError> {
    let Some(primary) = conf::conf_files(conf_dir)?.into_iter().next() else {
        return Ok(Pass::NoPrimary);
    };
    let text = conf::read_conf(&primary)?;
    match conf::with_entry(&primary, &text, entry)? {
        conf::Insert::Unchanged => Ok(Pass::InPlace(primary)),
        conf::Insert::Write { text, wrapped } => {
            let target = if wrapped {
                primary.with_extension("conflist")
            } else {
                primary.clone()
            };
            write_atomic(&target, &text, &primary)?;
            if wrapped && target != primary {
                // The single-plugin file would sort first and shadow the list.
                std::fs::remove_file(&primary).map_err(io("removing the wrapped", &primary))?;
            }
            tracing::info!(file = %target.display(), "mesh-cni inserted into the CNI chain");
            Ok(Pass::Inserted(target))
        }
    }
}

/// Removes our entry from every config in `conf_dir` (the primary may have changed since we
/// inserted it). Returns the files edited. Configs that are malformed are skipped with an
/// error logged: they hold no entry we wrote.
pub fn remove(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut edited = Vec::new();
    for file in conf::conf_files(conf_dir)? {
        let text = conf::read_conf(&file)?;
        match conf::without_entry(&file, &text) {
            Ok(Some(text)) => {
                write_atomic(&file, &text, &file)?;
                tracing::info!(file = %file.display(), "mesh-cni removed from the CNI chain");
                edited.push(file);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "skipping"),
        }
    }
    Ok(edited)
}

/// `mesh-cni install`: the process's exit code.
pub fn run(args: InstallArgs) -> i32 {
    match run_inner(&args) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "mesh-cni install failed");
            eprintln!("mesh-cni install: {e}");
            1
        }
    }
}

fn run_inner(args: &InstallArgs) -> Result<(), InstallError> {
    if args.uninstall {
        remove(&args.cni_conf_dir)?;
        let bin = args.cni_bin_dir.join(PLUGIN_TYPE);
        match std::fs::remove_file(&bin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("removing", &bin)(e));
            }
            _ => {}
        }
        return Ok(());
    }
    let from = match &args.plugin_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(io("finding this executable", Path::new("")))?,
    };
    install_binary(&from, &args.cni_bin_dir)?;
    let entry = entry(&args.agent_socket, &args.exclude_namespaces);
    let interval = Duration::from_millis(args.poll_interval_ms.max(10));
    let mut waiting_logged = false;
    let mut last_error: Option<String> = None;
    // Polling, not inotify: the primary may replace the dir's files in any way (rename, a
    // new name, a bind-mounted dir swapped), and a pass costs one small read.
    loop {
        if args.pause_file.as_ref().is_some_and(|p| p.exists()) {
            std::thread::sleep(interval);
            continue;
        }
        match insert(&args.cni_conf_dir, &entry) {
            Ok(Pass::NoPrimary) => {
                if !waiting_logged {
                    tracing::info!(dir = %args.cni_conf_dir.display(), "waiting for the primary CNI's config");
                    waiting_logged = true;
                }
            }
            Ok(_) if args.once => return Ok(()),
            Ok(_) => last_error = None,
            // Transient or someone else's mistake: say it once, keep watching.
            Err(e) if !args.once => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(&msg) {
                    tracing::error!(error = %msg, "cannot insert mesh-cni");
                    eprintln!("mesh-cni install: {msg}");
                    last_error = Some(msg);
                }
            }
            Err(e) => return Err(e),
        }
        std::thread::sleep(interval);
    }
}
