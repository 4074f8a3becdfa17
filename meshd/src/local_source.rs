//! The local-mode resource source: a directory of YAML/JSON manifests, polled for changes.
//!
//! Owns reading files, keeping each file's last good content when an edit does not parse, and
//! publishing the merged [`ResourceSet`]. Knows nothing of translation: any other source (a
//! Kubernetes watch) only has to publish a `watch::Receiver<Arc<ResourceSet>>` too.
//!
//! A source fault never empties the view: a root (or subdirectory) that cannot be listed keeps
//! what it last held, a deletion is acted on only once it has held still for a poll (as edits
//! are), and a file that cannot be read or parsed keeps its last good content. Only regular
//! files are read (opened non-blocking, checked with fstat, size-capped), so a FIFO or a link
//! to a device cannot stall or exhaust meshd; a directory reached twice through symlinks is
//! listed once, so symlink loops cannot either.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::parse;
use crate::resources::{Resource, ResourceSet};
use crate::waypoints::{Refusal, Waypoint};

/// Every this many polls files are re-read even if mtime and size look unchanged, so an edit
/// that kept both (coarse timestamps) is still picked up.
const REHASH_EVERY: u64 = 20;
/// Nobody nests manifests deeper than this (symlink loops are cut by the visited set, not by
/// this).
const MAX_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("config directory {path}: {source}")]
    Dir { path: String, source: io::Error },
    #[error("config directory {0} is not a directory")]
    NotADir(String),
    #[error("starting the directory poller: {0}")]
    Thread(io::Error),
}

/// Why a manifest file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a regular file ({0}); only regular files are read")]
    NotRegular(&'static str),
    #[error("{size} bytes is over the {} MiB limit for a manifest file", parse::MAX_FILE_BYTES >> 20)]
    TooLarge { size: u64 },
}

/// A running poller; it stops when dropped.
pub struct LocalSource {
    stop: Arc<AtomicBool>,
    _thread: JoinHandle<()>,
}

impl Drop for LocalSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl LocalSource {
    /// Loads the directory once (so the first published set is complete), then polls it every
    /// `interval` on its own thread.
    pub fn start(
        dir: &Path,
        interval: Duration,
    ) -> Result<(LocalSource, watch::Receiver<Arc<ResourceSet>>), SourceError> {
        let md = std::fs::metadata(dir).map_err(|source| SourceError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        if !md.is_dir() {
            return Err(SourceError::NotADir(dir.display().to_string()));
        }
        let mut scanner = Scanner::new(dir.to_path_buf());
        scanner.scan(true);
        let (tx, rx) = watch::channel(Arc::new(scanner.merged()));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("meshd-source".into())
            .spawn(move || {
                let mut tick = 0u64;
                while !stop2.load(Ordering::Relaxed) && !tx.is_closed() {
                    std::thread::sleep(interval);
                    tick += 1;
                    scanner.force_rehash = tick.is_multiple_of(REHASH_EVERY);
                    if scanner.scan(false) {
                        let set = scanner.merged();
                        tx.send_if_modified(|cur| {
                            let changed = **cur != set;
                            if changed {
                                *cur = Arc::new(set);
                            }
                            changed
                        });
                    }
                }
            })
            .map_err(SourceError::Thread)?;
        info!(dir = %dir.display(), "watching config directory");
        Ok((
            LocalSource {
                stop,
                _thread: thread,
            },
            rx,
        ))
    }
}

#[derive(Default)]
struct FileState {
    /// (mtime, size) when last read.
    seen: Option<(SystemTime, u64)>,
    /// A new (mtime, size) seen once; read when it holds still for one more poll, so a file
    /// being written is not read half-way (which could drop the resources after the cut).
    pending: Option<(SystemTime, u64)>,
    /// Missing from one listing; dropped if still missing at the next, so a file replaced by
    /// delete-and-create (or a dir swapped under us) does not flap its resources out and back.
    missing: bool,
    hash: Option<u64>,
    /// The last read error reported, so one unreadable file logs once, not every poll.
    error: Option<String>,
    /// The file's last content that parsed.
    resources: Vec<Resource>,
}

/// What a listing found: the manifest files, and the directories that could not be listed
/// (whose files are kept as they were, not taken as deleted).
#[derive(Default)]
struct Listing {
    files: BTreeSet<PathBuf>,
    unlistable: BTreeMap<PathBuf, String>,
}

/// The poll loop's state: what each file last held.
pub(crate) struct Scanner {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    force_rehash: bool,
    /// The root's listing error while it lasts, logged when it starts and when it ends.
    root_error: Option<String>,
    /// Subdirectories that could not be listed at the last poll, for the same logging.
    unlistable: BTreeMap<PathBuf, String>,
}

impl Scanner {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Scanner {
            dir,
            files: BTreeMap::new(),
            force_rehash: false,
            root_error: None,
            unlistable: BTreeMap::new(),
        }
    }

    fn name(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Looks at every file once; returns true when some file's resources changed.
    pub(crate) fn scan(&mut self, initial: bool) -> bool {
        let listing = match list(&self.dir) {
            Ok(l) => {
                if let Some(e) = self.root_error.take() {
                    info!(dir = %self.dir.display(), "config directory can be listed again (it failed with: {e})");
                }
                l
            }
            Err(e) => {
                // Gone, renamed, replaced or unreadable: all source faults, none a statement
                // that the mesh has no config. Publishing nothing here would unenroll every pod.
                let e = e.to_string();
                if self.root_error.as_ref() != Some(&e) {
                    warn!(
                        dir = %self.dir.display(),
                        "cannot list the config directory: {e}; keeping the last good config ({} files) until it can be",
                        self.files.len()
                    );
                    self.root_error = Some(e);
                }
                return false;
            }
        };
        self.note_unlistable(&listing.unlistable);
        let mut changed = false;
        let mut gone = Vec::new();
        for (path, state) in &mut self.files {
            if listing.files.contains(path)
                || listing.unlistable.keys().any(|d| path.starts_with(d))
            {
                continue;
            }
            if state.missing {
                gone.push(path.clone());
            } else {
                state.missing = true;
            }
        }
        for path in gone {
            if let Some(state) = self.files.remove(&path) {
                info!(file = %self.name(&path), "file removed; dropping its {} resources", state.resources.len());
                changed |= !state.resources.is_empty();
            }
        }
        for path in &listing.files {
            changed |= self.look_at(path, initial);
        }
        changed
    }

    fn note_unlistable(&mut self, now: &BTreeMap<PathBuf, String>) {
        for (dir, e) in now {
            if self.unlistable.get(dir) != Some(e) {
                warn!(dir = %self.name(dir), "cannot list: {e}; keeping the last good content of its files");
            }
        }
        for dir in self.unlistable.keys() {
            if !now.contains_key(dir) {
                info!(dir = %self.name(dir), "can be listed again");
            }
        }
        self.unlistable = now.clone();
    }

    fn look_at(&mut self, path: &Path, initial: bool) -> bool {
        let name = self.name(path);
        let force = self.force_rehash;
        // Listed, so present now: a deletion seen before did not hold still.
        if let Some(state) = self.files.get_mut(path) {
            state.missing = false;
        }
        // A file may vanish between listing and stat; the next poll sees it gone.
        let Ok(md) = std::fs::metadata(path) else {
            return false;
        };
        let stat = (md.modified().unwrap_or(SystemTime::UNIX_EPOCH), md.len());
        let state = self.files.entry(path.to_path_buf()).or_default();
        if state.seen == Some(stat) && !force {
            return false;
        }
        if state.seen != Some(stat) && state.pending != Some(stat) && !initial {
            state.pending = Some(stat);
            return false;
        }
        state.pending = None;
        state.seen = Some(stat);
        let text = match read_manifest(path) {
            Ok(bytes) => {
                state.error = None;
                bytes
            }
            Err(e) => {
                let e = e.to_string();
                if state.error.as_ref() != Some(&e) {
                    let kept = state.resources.len();
                    error!(file = %name, "cannot read {name}: {e}; keeping its last good content ({kept} resources)");
                    state.error = Some(e);
                }
                return false;
            }
        };
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        let hash = h.finish();
        if state.hash == Some(hash) {
            return false;
        }
        state.hash = Some(hash);
        let parsed = match std::str::from_utf8(&text) {
            Ok(t) => parse::parse_file(&name, t).map_err(|e| e.to_string()),
            Err(e) => Err(format!("{name}: not UTF-8 text: {e}")),
        };
        match parsed {
            Ok(p) => {
                for w in &p.warnings {
                    warn!(file = %name, "{w}");
                }
                let mut resources = p.resources;
                keep_last_good_routes(&mut resources, &state.resources, &p.rejected, &name);
                keep_last_accepted_waypoints(&mut resources, &state.resources, &name);
                info!(file = %name, "loaded {name}: {} resources", resources.len());
                let changed = state.resources != resources;
                state.resources = resources;
                changed
            }
            Err(e) => {
                let kept = state.resources.len();
                error!(file = %name, "error in {e}; keeping the file's last good content ({kept} resources)");
                false
            }
        }
    }

    /// All files' resources, files in path order; a later file's copy of an object wins.
    pub(crate) fn merged(&self) -> ResourceSet {
        let mut set = ResourceSet::default();
        let mut owner: BTreeMap<String, &Path> = BTreeMap::new();
        for (path, state) in &self.files {
            for r in &state.resources {
                let what = r.describe();
                if set.insert(r.clone())
                    && let Some(first) = owner.get(&what)
                {
                    warn!(
                        "{what} is defined in both {} and {}; using the latter",
                        self.name(first),
                        self.name(path)
                    );
                }
                owner.insert(what, path);
            }
        }
        set
    }
}

/// A route resource refused on its own keeps its last good version from this file (marked
/// with why its newer version was refused); one that never was good is left out.
fn keep_last_good_routes(
    resources: &mut Vec<Resource>,
    before: &[Resource],
    rejected: &[parse::Rejected],
    file: &str,
) {
    for r in rejected {
        let last_good = before.iter().find_map(|old| match old {
            Resource::Route(route) if route.key() == r.key => Some(route.clone()),
            _ => None,
        });
        match last_good {
            Some(mut route) => {
                error!(file = %file, "error in {}; keeping its last good version", r.error);
                route.rejected = Some(r.error.clone());
                resources.push(Resource::Route(route));
            }
            None => {
                error!(file = %file, "error in {}; not applied (no earlier good version)", r.error)
            }
        }
    }
}

/// A waypoint Gateway whose new version is refused keeps its last accepted version from this
/// file (marked with why), so a bad edit does not take a running waypoint away; one never
/// accepted stays as written (reported not accepted, nothing rendered).
fn keep_last_accepted_waypoints(resources: &mut [Resource], before: &[Resource], file: &str) {
    for r in resources.iter_mut() {
        let what = r.describe();
        let Resource::Gateway(g) = r else { continue };
        let Some(refusal) = Waypoint::from_gateway(g).and_then(|w| w.refusal) else {
            continue;
        };
        let last_accepted = before.iter().find_map(|old| match old {
            Resource::Gateway(o)
                if o.metadata.ns() == g.metadata.ns()
                    && o.metadata.name == g.metadata.name
                    && Waypoint::from_gateway(o).is_some_and(|w| w.accepted()) =>
            {
                Some(o.clone())
            }
            _ => None,
        });
        let message = format!("{file}: {what}: {}", refusal.message);
        match last_accepted {
            Some(mut old) => {
                error!(file = %file, "error in {message}; keeping its last accepted version in force");
                old.refused_edit = Some(Refusal {
                    reason: refusal.reason,
                    message,
                });
                *r = Resource::Gateway(old);
            }
            None => {
                error!(file = %file, "error in {message}; not accepted (no earlier accepted version)")
            }
        }
    }
}

/// Reads one manifest: a regular file of at most [`parse::MAX_FILE_BYTES`]. Opened
/// non-blocking so a FIFO cannot block the poller, and checked on the open descriptor, so a
/// file swapped for something else after the listing is caught too.
pub(crate) fn read_manifest(path: &Path) -> Result<Vec<u8>, ReadError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let md = file.metadata()?;
    let ft = md.file_type();
    if !ft.is_file() {
        return Err(ReadError::NotRegular(file_kind(&ft)));
    }
    if md.len() > parse::MAX_FILE_BYTES {
        return Err(ReadError::TooLarge { size: md.len() });
    }
    // The file may grow after the fstat: read one byte past the cap to notice.
    let mut bytes = Vec::new();
    File::take(file, parse::MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if size > parse::MAX_FILE_BYTES {
        return Err(ReadError::TooLarge { size });
    }
    Ok(bytes)
}

fn file_kind(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Manifest files under `dir`, sorted; hidden entries (editor swap files, `..data` of
/// Kubernetes volume mounts) are skipped. Fails only if `dir` itself cannot be listed.
///
/// Symlinks are followed (mounted ConfigMaps are links), but each directory, by (device,
/// inode), is listed once: a link back to an ancestor or many links to `.` add nothing.
fn list(dir: &Path) -> io::Result<Listing> {
    let md = std::fs::metadata(dir)?;
    let mut visited = HashSet::from([(md.dev(), md.ino())]);
    let mut out = Listing::default();
    walk(dir, 0, &mut visited, &mut out)?;
    Ok(out)
}

fn walk(
    dir: &Path,
    depth: usize,
    visited: &mut HashSet<(u64, u64)>,
    out: &mut Listing,
) -> io::Result<()> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        entries.push(entry?.path());
    }
    // Name order, so which path of a directory reached twice is used does not change.
    entries.sort();
    for path in entries {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let md = match std::fs::metadata(&path) {
            Ok(md) => md,
            // Removed since the listing, or a dangling link: nothing there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            // Something there that cannot be looked at: keep what it held.
            Err(e) => {
                out.unlistable.insert(path, e.to_string());
                continue;
            }
        };
        if md.is_dir() {
            if depth < MAX_DEPTH
                && visited.insert((md.dev(), md.ino()))
                && let Err(e) = walk(&path, depth + 1, visited, out)
            {
                out.unlistable.insert(path, e.to_string());
            }
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            out.files.insert(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
    const NS_B: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n";

    fn namespaces(s: &Scanner) -> Vec<String> {
        s.merged().namespaces.keys().cloned().collect()
    }

    /// Runs `f` on the scanner on another thread and gives it back, failing if it has not
    /// finished within the bound the audit names for meshd being ready (2 s).
    fn within_deadline(mut s: Scanner, f: impl FnOnce(&mut Scanner) + Send + 'static) -> Scanner {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            f(&mut s);
            let _ = tx.send(s);
        });
        rx.recv_timeout(Duration::from_secs(2))
            .expect("the scanner did not finish within 2 s")
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo touches nothing else.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    #[test]
    fn bad_edits_keep_last_good_and_deletes_remove() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let f = dir.path().join("sub/ns.yaml");
        std::fs::write(&f, NS).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut s = Scanner::new(dir.path().to_path_buf());
        assert!(s.scan(true));
        assert!(s.merged().namespaces.contains_key("a"));
        std::fs::write(&f, "apiVersion: v1\nkind: Namespace\nmetadata: [oops\n").unwrap();
        // First poll sees the change, the second reads it (it held still).
        assert!(!s.scan(false));
        assert!(!s.scan(false));
        assert!(
            s.merged().namespaces.contains_key("a"),
            "last good content stays"
        );
        std::fs::remove_file(&f).unwrap();
        // A deletion holds still for a poll too, then applies.
        assert!(!s.scan(false));
        assert!(s.merged().namespaces.contains_key("a"));
        assert!(s.scan(false));
        assert!(s.merged().namespaces.is_empty());
    }

    #[test]
    fn a_bad_route_is_refused_alone_and_keeps_its_last_good_version() {
        let vs = |regex: &str, ns: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs, namespace: a}}\nspec: {{hosts: [web], http: [{{match: [{{uri: {{regex: '{regex}'}}}}], route: [{{destination: {{host: web}}}}]}}]}}\n"
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.yaml");
        // Never good: left out, the rest of the file applies.
        std::fs::write(&f, vs("(", "a")).unwrap();
        let mut s = Scanner::new(dir.path().to_path_buf());
        s.scan(true);
        let set = s.merged();
        assert_eq!(namespaces(&s), ["a"]);
        assert!(set.routes.is_empty(), "{:?}", set.routes);
        // Good.
        std::fs::write(&f, vs("/v1/.*", "a")).unwrap();
        s.scan(false);
        assert!(s.scan(false));
        let good = s.merged().routes["VirtualService/a/vs"].clone();
        assert!(good.rejected.is_none());
        // Bad again, with another edit in the same file: that edit applies, the route stays.
        std::fs::write(&f, vs("[z-a]", "b")).unwrap();
        s.scan(false);
        assert!(s.scan(false));
        let set = s.merged();
        assert_eq!(namespaces(&s), ["b"]);
        let kept = &set.routes["VirtualService/a/vs"];
        assert_eq!(kept.spec, good.spec, "the last good version");
        let why = kept.rejected.as_deref().unwrap();
        assert!(
            why.contains("r.yaml")
                && why.contains("VirtualService a/vs")
                && why.contains("uri.regex"),
            "{why}"
        );
    }

    #[test]
    fn a_refused_waypoint_edit_keeps_the_last_accepted_waypoint_in_force() {
        use crate::translate::{Settings, translate};
        let gw = |listener: &str, labels: &str| {
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: shop, labels: {{{labels}}}}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [{listener}]}}\n"
            )
        };
        let good = gw("{name: mesh, port: 15008, protocol: HBONE}", "");
        // A Service bound to the waypoint, and the waypoint running (as local mode runs it).
        let bound = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: wp}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: wp, namespace: shop}\nspec: {clusterIP: 10.96.0.2, selector: {gateway.networking.k8s.io/gateway-name: wp}, ports: [{name: mesh, port: 15008}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: wp-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none}}\nspec: {serviceAccountName: wp}\nstatus: {podIP: 10.0.0.9}\n";
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("gw.yaml");
        std::fs::write(&f, &good).unwrap();
        std::fs::write(dir.path().join("web.yaml"), bound).unwrap();
        let settings = Settings {
            trust_domain: "td".into(),
            cluster_domain: "cluster.local".into(),
        };
        let view = |s: &Scanner| translate(&s.merged(), &settings, &Default::default());
        let mut s = Scanner::new(dir.path().to_path_buf());
        s.scan(true);
        let before = view(&s);
        let accepted = before.waypoints["shop/wp"].clone();
        assert!(accepted.accepted() && accepted.refused_edit.is_none());
        let usable = before.services["shop/web"].waypoint.clone().unwrap();
        assert_eq!(usable.unavailable, "");
        for (bad, reason) in [
            (
                gw("{name: mesh, port: 15008, protocol: HTTP}", ""),
                "ListenersNotValid",
            ),
            (
                gw(
                    "{name: mesh, port: 15008, protocol: HBONE}",
                    "istio.io/waypoint-for: nope",
                ),
                "InvalidParameters",
            ),
        ] {
            std::fs::write(&f, bad).unwrap();
            s.scan(false);
            assert!(s.scan(false));
            let v = view(&s);
            let w = &v.waypoints["shop/wp"];
            assert!(
                w.accepted(),
                "the last accepted version is in force: {:?}",
                w.refusal
            );
            assert_eq!(
                crate::waypoints::render(w),
                crate::waypoints::render(&accepted)
            );
            let why = w
                .refused_edit
                .as_ref()
                .expect("the refused edit is reported");
            assert_eq!(why.reason, reason);
            assert!(
                why.message.contains("gw.yaml") && why.message.contains("Gateway shop/wp"),
                "{}",
                why.message
            );
            assert_eq!(
                v.services["shop/web"].waypoint.as_ref(),
                Some(&usable),
                "binding still usable"
            );
        }
        // Fixed: accepted, nothing refused.
        std::fs::write(&f, &good).unwrap();
        s.scan(false);
        assert!(s.scan(false));
        assert_eq!(view(&s).waypoints["shop/wp"], accepted);
        // Gone: no waypoint, and one never accepted is not made up from anything.
        std::fs::write(
            &f,
            gw("{name: mesh, port: 15008, protocol: HTTP}", "")
                .replace("name: wp,", "name: other,"),
        )
        .unwrap();
        s.scan(false);
        assert!(s.scan(false));
        let v = view(&s);
        assert!(!v.waypoints.contains_key("shop/wp"));
        assert!(!v.waypoints["shop/other"].accepted());
        assert!(
            v.services["shop/web"]
                .waypoint
                .as_ref()
                .unwrap()
                .unavailable
                .contains("no waypoint Gateway shop/wp"),
            "{:?}",
            v.services["shop/web"].waypoint
        );
    }

    #[test]
    fn config_dir_outage_keeps_the_last_set() {
        let top = tempfile::tempdir().unwrap();
        let cfg = top.path().join("cfg");
        std::fs::create_dir_all(cfg.join("sub")).unwrap();
        std::fs::write(cfg.join("ns.yaml"), NS).unwrap();
        std::fs::write(cfg.join("sub/b.yaml"), NS_B).unwrap();
        let mut s = Scanner::new(cfg.clone());
        assert!(s.scan(true));
        assert_eq!(namespaces(&s), ["a", "b"]);
        // Renamed away (a GitOps swap, an editor, an NFS hiccup): nothing changes, however
        // many polls it lasts.
        std::fs::rename(&cfg, top.path().join("cfg.away")).unwrap();
        for _ in 0..3 {
            assert!(!s.scan(false));
            assert_eq!(namespaces(&s), ["a", "b"]);
        }
        // Replaced by something that is not a directory: the same.
        std::fs::write(&cfg, "not a dir").unwrap();
        assert!(!s.scan(false));
        assert_eq!(namespaces(&s), ["a", "b"]);
        std::fs::remove_file(&cfg).unwrap();
        std::fs::rename(top.path().join("cfg.away"), &cfg).unwrap();
        for _ in 0..3 {
            assert!(!s.scan(false));
            assert_eq!(namespaces(&s), ["a", "b"]);
        }
        // It is a source again: real edits still apply.
        std::fs::remove_file(cfg.join("sub/b.yaml")).unwrap();
        assert!(!s.scan(false));
        assert!(s.scan(false));
        assert_eq!(namespaces(&s), ["a"]);
    }

    #[test]
    fn an_unlistable_subdirectory_keeps_its_files() {
        // Root ignores permissions, so the fault here is a path that cannot be resolved
        // (ELOOP): the subdirectory is replaced by a symlink to itself.
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        std::fs::write(sub.join("b.yaml"), NS_B).unwrap();
        let mut s = Scanner::new(dir.path().to_path_buf());
        assert!(s.scan(true));
        std::fs::rename(&sub, dir.path().join(".sub.away")).unwrap();
        std::os::unix::fs::symlink("sub", &sub).unwrap();
        for _ in 0..3 {
            assert!(!s.scan(false));
            assert_eq!(namespaces(&s), ["a", "b"]);
        }
        // Once it lists again and the file is really gone, the deletion applies.
        std::fs::remove_file(&sub).unwrap();
        std::fs::create_dir(&sub).unwrap();
        assert!(!s.scan(false));
        assert!(s.scan(false));
        assert_eq!(namespaces(&s), ["a"]);
    }

    #[test]
    fn a_file_removed_and_back_within_the_settle_window_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ns.yaml");
        std::fs::write(&f, NS).unwrap();
        let mut s = Scanner::new(dir.path().to_path_buf());
        assert!(s.scan(true));
        // Moved aside and back (same mtime and size).
        let aside = dir.path().join(".ns.yaml.swp");
        std::fs::rename(&f, &aside).unwrap();
        assert!(!s.scan(false));
        std::fs::rename(&aside, &f).unwrap();
        assert!(!s.scan(false));
        assert!(!s.scan(false));
        assert_eq!(namespaces(&s), ["a"]);
        // Deleted and written again with the same content (`rm -rf cfg && cp -r new cfg`).
        std::fs::remove_file(&f).unwrap();
        assert!(!s.scan(false));
        std::fs::write(&f, NS).unwrap();
        for _ in 0..3 {
            assert!(!s.scan(false));
            assert_eq!(namespaces(&s), ["a"]);
        }
    }

    #[test]
    fn a_fifo_neither_stalls_the_scanner_nor_hides_other_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        mkfifo(&dir.path().join("a-fifo.yaml"));
        let s = Scanner::new(dir.path().to_path_buf());
        let s = within_deadline(s, |s| {
            s.scan(true);
        });
        assert_eq!(namespaces(&s), ["a"]);
        // A file added later still loads (the poller is not stuck on the FIFO).
        std::fs::write(dir.path().join("b.yaml"), NS_B).unwrap();
        let s = within_deadline(s, |s| {
            s.scan(false);
            s.scan(false);
        });
        assert_eq!(namespaces(&s), ["a", "b"]);
    }

    /// Run by the test below, in a child under a memory limit: before reads were capped, a
    /// `.yaml` link to /dev/zero was read until memory ran out.
    #[test]
    #[ignore = "run by a_link_to_a_device_is_not_read in a memory-limited child"]
    fn device_link_child() {
        use testbed::child::{limit_address_space, peak_rss_kib};
        limit_address_space(1 << 30);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.yaml")).unwrap();
        let before = peak_rss_kib();
        let s = within_deadline(Scanner::new(dir.path().to_path_buf()), |s| {
            s.scan(true);
        });
        let grew_kib = peak_rss_kib().saturating_sub(before);
        assert_eq!(namespaces(&s), ["a"]);
        assert!(grew_kib < 64 * 1024, "peak RSS grew {grew_kib} KiB");
    }

    #[test]
    fn a_link_to_a_device_is_not_read() {
        testbed::child::run_child_test("local_source::tests::device_link_child");
    }

    #[test]
    fn symlink_loops_are_listed_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        for l in ["l1", "l2", "l3"] {
            std::os::unix::fs::symlink(".", dir.path().join(l)).unwrap();
        }
        std::os::unix::fs::symlink("..", dir.path().join("sub/up")).unwrap();
        // A symlinked directory that is not a loop is still read.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("b.yaml"), NS_B).unwrap();
        std::os::unix::fs::symlink(other.path(), dir.path().join("linked")).unwrap();
        let s = Scanner::new(dir.path().to_path_buf());
        let s = within_deadline(s, |s| {
            s.scan(true);
            s.scan(false);
        });
        assert_eq!(namespaces(&s), ["a", "b"]);
        assert_eq!(s.files.len(), 2, "{:?}", s.files.keys().collect::<Vec<_>>());
    }

    #[test]
    fn an_oversized_file_keeps_its_last_good_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ns.yaml");
        std::fs::write(&f, NS).unwrap();
        let mut s = Scanner::new(dir.path().to_path_buf());
        assert!(s.scan(true));
        let mut big = String::from(NS_B);
        while big.len() as u64 <= parse::MAX_FILE_BYTES {
            big.push_str("# padding padding padding padding padding padding padding padding\n");
        }
        std::fs::write(&f, big).unwrap();
        assert!(!s.scan(false));
        assert!(!s.scan(false));
        assert_eq!(namespaces(&s), ["a"]);
    }

    #[test]
    fn read_errors_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("f.yaml");
        mkfifo(&fifo);
        let e = read_manifest(&fifo).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        let e = read_manifest(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("character device"), "{e}");
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; (parse::MAX_FILE_BYTES + 1) as usize]).unwrap();
        let e = read_manifest(&big).unwrap_err().to_string();
        assert!(e.contains("4 MiB"), "{e}");
    }
}
