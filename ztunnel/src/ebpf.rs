//! The eBPF capture loader: loads `ztunnel-ebpf`, attaches and pins it, and keeps its maps.
//!
//! Everything of one ztunnel instance lives under one bpffs directory, named by [`Instance`]
//! (`/sys/fs/bpf/ztunnel-<node>-<netns cookie of ztunnel itself>`, or `ztunnel@<NAME>` with
//! `--ebpf-instance NAME`, for ztunnel pods that each have a netns of their own): the maps
//! (pinned by name), one link per cgroup hook (`link_*`), one sk_lookup link per enrolled pod
//! (`sklookup_<netns cookie>`). Pinned links outlive a crash, so an enrolled pod's connects keep
//! going to its (then closed) in-pod listener and fail: fail closed. A restarted ztunnel (or
//! the next one of a rolling update, started beside it) reuses the pinned maps and replaces
//! the links. [`Ebpf::remove_all`] (graceful stop, `ztunnel
//! cleanup`) deletes the directory's contents and the directory. Owns the kernel objects only;
//! which pods are enrolled is [`crate::pods`]'s business.
//!
//! `zt_sk_lookup` cannot learn which netns it runs in, so each enrolled pod gets its own
//! instance of it, loaded with that pod's netns cookie as a read-only global (and the shared
//! maps reused from the pins): it then captures every local address of the pod, not only the
//! pod IPs the mesh knows (audit H1: IPv6 link-local, secondary addresses).
//!
//! `--ebpf-log LEVEL` ([`EbpfLog`]) fixes the programs' aya-log level at load and forwards
//! their records (each capture decision with its reason) to ztunnel's log; `off` (the default)
//! loads them with level 0, which the verifier prunes, and starts no reader.
//!
//! With `--fast-path` it also attaches the `zt_splice` stream verdict to the (unpinned)
//! `ZT_SPLICE_RX` sockhash and offers [`Ebpf::splice`]: two of ztunnel's own sockets whose
//! arriving bytes the kernel then forwards to each other. Which connections may be spliced is
//! [`crate::fastpath`]'s decision.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use aya::maps::{HashMap as BpfHashMap, IterableMap, MapData, SockHash};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps};
use tokio::net::TcpStream;
use tracing::{info, warn};
use ztunnel_ebpf_common::{
    AF_INET, AF_INET6, DIR_INBOUND, DIR_OUTBOUND, ExclKey, IpKey, ListenKey, MAP_EXCLUDED,
    MAP_LISTEN, MAP_NETNS, MAP_POD_IP, MAP_PORT_DST, MAP_SPLICE_BYTES, MAP_SPLICE_PEER,
    MAP_SPLICE_RX, MAP_SPLICE_TX, NetnsConf, OrigDst, PortKey,
};

use crate::capture::ListenerInfo;

mod instance;
mod kernel_log;
mod pins;
mod sock;
mod splice;

pub use instance::{BadName, DirKind, Instance, dir_kind, instance_dirs, valid_name};
pub use kernel_log::EbpfLog;
use kernel_log::{start_log_reader, sweep_log_pins};
pub use pins::remove_dir;
use pins::{link_pin_inodes, remove_pin, replace_pin};
use sock::{decode, ip_key, listener_addr, take};
pub use sock::{netns_cookie, tcp_info};
use splice::SpliceMaps;
pub use splice::Spliced;

/// The compiled programs, built from `ztunnel-ebpf` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel-ebpf"));

/// Set to a reason to make the loader refuse, as if the kernel could not run eBPF capture
/// (tests of `auto` fallback and of the explicit-mode error).
pub const REFUSE_ENV: &str = "ZTUNNEL_EBPF_REFUSE";

/// Set (non-empty) to look original destinations up and remove them in two calls, as on
/// kernels before 5.14 that cannot take from a hash map in one (tests of that fallback).
pub const NO_TAKE_ENV: &str = "ZTUNNEL_EBPF_NO_TAKE";

const BPFFS: &str = "/sys/fs/bpf";

/// The cgroup hooks: (program name in the object, pin name of its link).
const CGROUP_ADDR_HOOKS: [(&str, &str); 4] = [
    ("zt_connect4", "link_connect4"),
    ("zt_connect6", "link_connect6"),
    ("zt_getpeername4", "link_getpeername4"),
    ("zt_getpeername6", "link_getpeername6"),
];
const SOCKOPS: (&str, &str) = ("zt_sockops", "link_sockops");
const SK_LOOKUP: &str = "zt_sk_lookup";
/// The ports of ztunnel's in-pod listeners (`ZT_LISTEN` keys).
const LISTENER_PORTS: [u16; 3] = [
    meshcore::OUTBOUND_PORT,
    meshcore::INBOUND_PLAINTEXT_PORT,
    meshcore::HBONE_PORT,
];
/// The per-pod sk_lookup instance's netns (a read-only global of the object).
const SELF_NETNS_GLOBAL: &str = "ZT_SELF_NETNS";
/// aya-log's ring buffer of records (a map of the object).
const LOGS_MAP: &str = "AYA_LOGS";
/// Maps of the fast path, unused by the per-pod sk_lookup loads: created there at minimum size.
const SPLICE_MAPS: [&str; 4] = [
    MAP_SPLICE_RX,
    MAP_SPLICE_TX,
    MAP_SPLICE_PEER,
    MAP_SPLICE_BYTES,
];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("eBPF capture refused by {REFUSE_ENV}={0}")]
    Refused(String),
    #[error("eBPF capture needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")]
    NotRoot,
    #[error("no cgroup2 filesystem mounted (see /proc/mounts): cgroup socket hooks need cgroup v2")]
    NoCgroup2,
    #[error(
        "cgroup v1 {0} controller is mounted: it disables cgroup-bpf socket hooks for tasks it classifies"
    )]
    CgroupV1Net(String),
    #[error("kernel has no BTF (/sys/kernel/btf/vmlinux missing)")]
    NoBtf,
    #[error("bpffs is not mounted at {BPFFS} and mounting it failed: {0}")]
    NoBpffs(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    BadInstance(#[from] instance::BadName),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: String,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: String,
        source: aya::programs::links::LinkError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: String,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: String,
        source: aya::pin::PinError,
    },
    #[error("object is missing {0}")]
    Missing(&'static str),
    #[error("eBPF log reader: {0}")]
    Logger(aya_log::Error),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EbpfError {
    let what = what.into();
    move |source| EbpfError::Io { what, source }
}

/// Maps and programs of one loaded instance.
struct State {
    netns: BpfHashMap<MapData, u64, NetnsConf>,
    excluded: BpfHashMap<MapData, ExclKey, u8>,
    pod_ip: BpfHashMap<MapData, IpKey, u64>,
    listen: SockHash<MapData, ListenKey>,
    /// Enrolled netns cookies, with their exclusions (for removal).
    enrolled: std::collections::HashMap<u64, (Vec<ExclKey>, Vec<IpKey>)>,
    /// The object: keeps the fast path's program attached to its map.
    _object: aya::Ebpf,
}

pub struct Ebpf {
    dir: PathBuf,
    /// The cgroup link pins this process made, by inode: a newer ztunnel adopting the instance
    /// replaces them (new inodes), which is how a stopping one knows it is not the last.
    own_links: Vec<(PathBuf, u64)>,
    /// `AYA_LOG_LEVEL` of every program this process loads.
    log_level: u8,
    /// Where this process pinned its log ring buffer, so the per-pod loads write to it too
    /// (`None` with logging off: they get a page-sized buffer nobody reads).
    logs_pin: Option<PathBuf>,
    splice: Option<Mutex<SpliceMaps>>,
    state: Mutex<State>,
    /// Hot path (every captured connection): its own lock.
    port_dst: Mutex<BpfHashMap<MapData, PortKey, OrigDst>>,
    /// Whether the kernel takes a record out of `port_dst` in one call (Linux 5.14+); cleared
    /// at the first refusal.
    take_supported: AtomicBool,
}

/// The kernel's "operation not supported" (not in libc: it is not a userspace errno).
const ENOTSUPP: i32 = 524;

/// Checks the environment can run eBPF capture, saying why not.
pub fn preflight() -> Result<(), EbpfError> {
    if let Ok(reason) = std::env::var(REFUSE_ENV)
        && !reason.is_empty()
    {
        return Err(EbpfError::Refused(reason));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(EbpfError::NotRoot);
    }
    cgroup2_root()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(EbpfError::NoBtf);
    }
    ensure_bpffs()
}

/// Where cgroup v2 is mounted, from /proc/mounts; also refuses active v1 net_cls/net_prio.
pub fn cgroup2_root() -> Result<PathBuf, EbpfError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(io_err("reading /proc/mounts"))?;
    let mut root = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(path), Some(fstype), Some(opts)) = (f.get(1), f.get(2), f.get(3)) else {
            continue;
        };
        if *fstype == "cgroup2" && root.is_none() {
            root = Some(PathBuf::from(path));
        }
        if *fstype == "cgroup" {
            for c in ["net_cls", "net_prio"] {
                if opts.split(',').any(|o| o == c) {
                    return Err(EbpfError::CgroupV1Net(c.to_string()));
                }
            }
        }
    }
    root.ok_or(EbpfError::NoCgroup2)
}

/// Mounts bpffs at [`BPFFS`] unless it is there.
///
/// Check and mount happen under an exclusive lock on the mount point itself: ztunnels starting
/// together on a node without bpffs (local mode's nodes, a handover) would otherwise each
/// mount it, and every later mount hides the pins of the ztunnels before it (seen on a freshly
/// booted machine: four stacked mounts, two ztunnels that never came up). A ztunnel that
/// waited for the lock opened the directory beneath the new mount, so it waits on the same
/// inode as the one that mounted; one that opens the path later locks the mount's root and
/// finds the mount in the re-check. The wait is bounded: anyone who can open the directory can
/// hold the lock.
fn ensure_bpffs() -> Result<(), EbpfError> {
    if bpffs_mounts()? > 0 {
        return Ok(());
    }
    let _locked = lock_bpffs_dir(BPFFS_LOCK_WAIT)?;
    if bpffs_mounts()? > 0 {
        return Ok(());
    }
    let out = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .map_err(|e| EbpfError::NoBpffs(e.to_string()))?;
    if !out.status.success() {
        return Err(EbpfError::NoBpffs(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// How long [`ensure_bpffs`] waits for the lock on [`BPFFS`].
const BPFFS_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn lock_bpffs_dir(wait: std::time::Duration) -> Result<nix::fcntl::Flock<File>, EbpfError> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = std::time::Instant::now() + wait;
    let mut dir =
        File::open(BPFFS).map_err(|e| EbpfError::NoBpffs(format!("opening {BPFFS}: {e}")))?;
    loop {
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Ok(locked),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                dir = file;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err((_, e)) => {
                return Err(EbpfError::NoBpffs(format!(
                    "locking {BPFFS} to mount it: {e} (another process has held the lock for {wait:?})"
                )));
            }
        }
    }
}

/// How many bpffs are mounted at [`BPFFS`] in this thread's mount namespace (the process's,
/// but for a test that gave one thread a namespace of its own).
fn bpffs_mounts() -> Result<usize, EbpfError> {
    let mounts = std::fs::read_to_string("/proc/thread-self/mounts")
        .map_err(io_err("reading /proc/thread-self/mounts"))?;
    Ok(mounts
        .lines()
        .filter(|l| {
            let mut fields = l.split_whitespace().skip(1);
            fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
        })
        .count())
}

impl Ebpf {
    /// Loads the programs (reusing pinned maps from an earlier run of this instance), attaches
    /// the cgroup hooks at the cgroup2 root and pins their links, replacing earlier links.
    pub fn load(instance: &Instance, fast_path: bool, log: EbpfLog) -> Result<Ebpf, EbpfError> {
        preflight()?;
        let cgroup = cgroup2_root()?;
        let dir = instance.dir()?;
        let adopted = dir.exists();
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        match Self::load_in(dir.clone(), &cgroup, adopted, fast_path, log) {
            Ok(e) => Ok(e),
            Err(err) => {
                // A half-done first load must not leave hooks behind; an adopted state stays
                // (its pods keep failing closed until a ztunnel that can load returns).
                if !adopted {
                    let _ = remove_dir(&dir);
                }
                Err(err)
            }
        }
    }

    fn load_in(
        dir: PathBuf,
        cgroup: &Path,
        adopted: bool,
        fast_path: bool,
        log: EbpfLog,
    ) -> Result<Ebpf, EbpfError> {
        let log_level = log.level();
        let mut bpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .override_global(aya_log::LEVEL, &log_level, true)
            .load(OBJECT)?;
        sweep_log_pins(&dir);
        let logs_pin = if log == EbpfLog::Off {
            None
        } else {
            Some(start_log_reader(&mut bpf, &dir)?)
        };
        let cg = File::open(cgroup)
            .map_err(io_err(format!("opening cgroup2 root {}", cgroup.display())))?;
        for (name, pin) in CGROUP_ADDR_HOOKS {
            let prog: &mut CgroupSockAddr = program(&mut bpf, name)?;
            prog.load().map_err(prog_err(name))?;
            let id = prog
                .attach(cg.as_fd(), CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            let link = prog.take_link(id).map_err(prog_err(name))?;
            replace_pin(fd_link(name, link)?, &dir.join(pin))?;
        }
        {
            let (name, pin) = SOCKOPS;
            let prog: &mut SockOps = program(&mut bpf, name)?;
            prog.load().map_err(prog_err(name))?;
            let id = prog
                .attach(cg.as_fd(), CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            let link = prog.take_link(id).map_err(prog_err(name))?;
            replace_pin(fd_link(name, link)?, &dir.join(pin))?;
        }
        let netns = take_map(&mut bpf, MAP_NETNS)?;
        let excluded = take_map(&mut bpf, MAP_EXCLUDED)?;
        let pod_ip = take_map(&mut bpf, MAP_POD_IP)?;
        let port_dst = take_map(&mut bpf, MAP_PORT_DST)?;
        let listen = bpf
            .take_map(MAP_LISTEN)
            .ok_or(EbpfError::Missing("ZT_LISTEN"))?;
        let listen = SockHash::try_from(listen).map_err(|source| EbpfError::Map {
            name: MAP_LISTEN.into(),
            source,
        })?;
        let splice = if fast_path {
            Some(Mutex::new(Self::load_splice(&mut bpf)?))
        } else {
            None
        };
        let take_allowed = std::env::var_os(NO_TAKE_ENV).is_none_or(|v| v.is_empty());
        info!(dir = %dir.display(), cgroup = %cgroup.display(), adopted, fast_path, ebpf_log = ?log, map_take = take_allowed, "eBPF capture loaded");
        Ok(Ebpf {
            own_links: link_pin_inodes(&dir),
            dir,
            log_level,
            logs_pin,
            splice,
            state: Mutex::new(State {
                netns,
                excluded,
                pod_ip,
                listen,
                enrolled: Default::default(),
                _object: bpf,
            }),
            port_dst: Mutex::new(port_dst),
            take_supported: AtomicBool::new(take_allowed),
        })
    }
}

impl Ebpf {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts capturing in the netns of `listeners` (ztunnel's listeners in the pod: inbound
    /// plaintext, HBONE and outbound, v4 and maybe v6; sk_lookup steers each new connection to
    /// the one of its family and port). Idempotent: a re-enroll (e.g. after a restart) replaces
    /// the listener sockets and the pod's sk_lookup link.
    pub fn enroll(
        &self,
        netns_file: &File,
        listeners: &[RawFd],
        ips: &[IpAddr],
        exclusions: &Exclusions,
    ) -> Result<u64, EbpfError> {
        let first = *listeners
            .first()
            .ok_or(EbpfError::Missing("an inbound listener"))?;
        let cookie = netns_cookie(first)
            .map_err(io_err("getsockopt(SO_NETNS_COOKIE) on the pod listener"))?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for &fd in listeners {
            let addr = listener_addr(fd).map_err(io_err("getsockname on a pod listener"))?;
            let key = ListenKey {
                netns: cookie,
                family: if addr.is_ipv6() { AF_INET6 } else { AF_INET },
                port: u32::from(addr.port()),
            };
            st.listen
                .insert(key, fd, 0)
                .map_err(|source| EbpfError::Map {
                    name: MAP_LISTEN.into(),
                    source,
                })?;
        }
        // Exclusions before enrollment, so no excluded connection is ever captured.
        let (old, old_ips) = st.enrolled.remove(&cookie).unwrap_or_default();
        let mut ip_keys = Vec::new();
        for ip in ips {
            let key = ip_key(*ip);
            st.pod_ip
                .insert(key, cookie, 0)
                .map_err(|source| EbpfError::Map {
                    name: MAP_POD_IP.into(),
                    source,
                })?;
            ip_keys.push(key);
        }
        for k in old_ips.iter().filter(|k| !ip_keys.contains(k)) {
            let _ = st.pod_ip.remove(k);
        }
        let mut keys = Vec::new();
        for (ports, dir) in [
            (&exclusions.outbound, DIR_OUTBOUND),
            (&exclusions.inbound, DIR_INBOUND),
        ] {
            for &port in ports {
                let key = ExclKey {
                    netns: cookie,
                    port,
                    dir,
                    _pad: [0; 5],
                };
                st.excluded
                    .insert(key, 1, 0)
                    .map_err(|source| EbpfError::Map {
                        name: MAP_EXCLUDED.into(),
                        source,
                    })?;
                keys.push(key);
            }
        }
        for k in old.iter().filter(|k| !keys.contains(k)) {
            let _ = st.excluded.remove(k);
        }
        let pin = self.dir.join(format!("sklookup_{cookie:x}"));
        replace_pin(self.pod_sk_lookup(netns_file, cookie)?, &pin)?;
        st.netns
            .insert(cookie, NetnsConf { flags: 1, _pad: 0 }, 0)
            .map_err(|source| EbpfError::Map {
                name: MAP_NETNS.into(),
                source,
            })?;
        st.enrolled.insert(cookie, (keys, ip_keys));
        Ok(cookie)
    }

    /// Loads an instance of `zt_sk_lookup` for the pod whose netns cookie is `cookie` (shared
    /// maps from the pins) and attaches it to `netns_file`. The load's own objects go when it
    /// returns; the link keeps the program.
    fn pod_sk_lookup(&self, netns_file: &File, cookie: u64) -> Result<FdLink, EbpfError> {
        let mut loader = aya::EbpfLoader::new();
        loader
            .default_map_pin_directory(&self.dir)
            .override_global(SELF_NETNS_GLOBAL, &cookie, true)
            .override_global(aya_log::LEVEL, &self.log_level, true);
        for name in SPLICE_MAPS {
            loader.map_max_entries(name, 1);
        }
        match &self.logs_pin {
            Some(path) => loader.map_pin_path(LOGS_MAP, path.as_path()),
            None => loader.map_max_entries(LOGS_MAP, 4096),
        };
        let mut bpf = loader.load(OBJECT)?;
        let prog: &mut SkLookup = program(&mut bpf, SK_LOOKUP)?;
        prog.load().map_err(prog_err(SK_LOOKUP))?;
        let id = prog
            .attach(netns_file.as_fd())
            .map_err(prog_err(SK_LOOKUP))?;
        Ok(FdLink::from(
            prog.take_link(id).map_err(prog_err(SK_LOOKUP))?,
        ))
    }

    /// Stops capturing in `cookie`'s netns and removes every trace of it from the kernel.
    pub fn unenroll(&self, cookie: u64) -> Result<(), EbpfError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Connects first: from here on the pod dials directly.
        let _ = st.netns.remove(&cookie);
        remove_pin(&self.dir.join(format!("sklookup_{cookie:x}")))?;
        for family in [AF_INET, AF_INET6] {
            for port in LISTENER_PORTS {
                let _ = st.listen.remove(&ListenKey {
                    netns: cookie,
                    family,
                    port: u32::from(port),
                });
            }
        }
        let (excl, ips) = st.enrolled.remove(&cookie).unwrap_or_default();
        for k in excl {
            let _ = st.excluded.remove(&k);
        }
        for k in ips {
            let _ = st.pod_ip.remove(&k);
        }
        Ok(())
    }

    /// After a restart: forgets netns enrolled by an earlier run that this run did not enroll
    /// again (pods that left while ztunnel was down), so they stop failing closed.
    pub fn sweep(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mine: HashSet<u64> = st.enrolled.keys().copied().collect();
        let stale: Vec<u64> = st
            .netns
            .keys()
            .filter_map(Result::ok)
            .filter(|c| !mine.contains(c))
            .collect();
        let stale_excl: Vec<ExclKey> = st
            .excluded
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !mine.contains(&k.netns))
            .collect();
        for c in &stale {
            let _ = st.netns.remove(c);
            info!(
                netns_cookie = c,
                "eBPF: dropped a netns enrolled before the restart and not since"
            );
        }
        for k in &stale_excl {
            let _ = st.excluded.remove(k);
        }
        let stale_ips: Vec<IpKey> = st
            .pod_ip
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| !mine.contains(c))
            .map(|(k, _)| k)
            .collect();
        for k in &stale_ips {
            let _ = st.pod_ip.remove(k);
        }
        drop(st);
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(hex) = name.strip_prefix("sklookup_")
                    && u64::from_str_radix(hex, 16).is_ok_and(|c| !mine.contains(&c))
                    && let Err(err) = remove_pin(&e.path())
                {
                    warn!(pin = %e.path().display(), error = %err, "eBPF: removing a stale sk_lookup link failed");
                }
            }
        }
    }

    /// The original destination of a connection accepted on an in-pod listener: for the
    /// outbound listener, the record connect4/6 left (consumed); for inbound (sk_lookup keeps
    /// addresses), the accepted socket's own local address. `peer` is the address accept gave,
    /// `at` what its listener is (bound address, netns): on the outbound path the connection
    /// costs one syscall here, the record's lookup-and-delete.
    pub fn original_dst(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        at: &ListenerInfo,
    ) -> io::Result<SocketAddr> {
        // A listener bound to one address (the outbound one) gives every connection that
        // address; one bound to a wildcard (inbound) does not: ask the socket.
        let local = match at.local {
            Some(l) if !l.ip().is_unspecified() => l,
            _ => stream.local_addr()?,
        };
        if !(local.ip().is_loopback() && local.port() == meshcore::OUTBOUND_PORT) {
            return Ok(crate::capture::canonical_addr(local));
        }
        let netns = match at.netns_cookie {
            Some(c) => c,
            None => netns_cookie(stream.as_raw_fd())?,
        };
        let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
        let key = PortKey {
            netns,
            port: u32::from(peer.port()),
            family,
        };
        let missing = |e: &dyn std::fmt::Display| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no eBPF record for client port {}: {e}", peer.port()),
            )
        };
        let mut map = self.port_dst.lock().unwrap_or_else(|p| p.into_inner());
        if self.take_supported.load(Ordering::Relaxed) {
            match take(map.map().fd().as_fd(), &key) {
                Ok(Some(dst)) => return Ok(decode(&dst)),
                Ok(None) => return Err(missing(&"not found")),
                // Linux < 5.14 cannot take from a hash map in one call: get, then remove.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
                    self.take_supported.store(false, Ordering::Relaxed);
                    info!(error = %e, "the kernel cannot look up and delete in one call: original destinations now take two (map_take=false)");
                }
                Err(e) => return Err(missing(&e)),
            }
        }
        let dst = map.get(&key, 0).map_err(|e| missing(&e))?;
        let _ = map.remove(&key);
        drop(map);
        Ok(decode(&dst))
    }

    /// Removes every pin of this instance, and its directory. Links whose last reference was the
    /// pin detach now; those held by a live process detach when it exits.
    pub fn remove_all(&self) -> Result<(), EbpfError> {
        remove_dir(&self.dir)
    }

    /// A stop that keeps capture (restart or uninstall look the same to ztunnel): removes the
    /// instance when nothing needs it — no pod enrolled in it (on uninstall the agent
    /// unenrolls every pod first) and no newer ztunnel took it over (the cgroup link pins are
    /// still the ones this process made; an adopting ztunnel replaces them). Otherwise leaves
    /// it: enrolled pods fail closed until a ztunnel returns. Returns whether it removed it.
    pub fn remove_if_idle(&self) -> Result<bool, EbpfError> {
        let enrolled = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.netns.keys().next().is_some()
        };
        if enrolled || link_pin_inodes(&self.dir) != self.own_links {
            return Ok(false);
        }
        remove_dir(&self.dir)?;
        Ok(true)
    }
}

/// Per-pod destination ports not to capture (host byte order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub outbound: Vec<u16>,
    pub inbound: Vec<u16>,
}

fn program<'a, T>(bpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    bpf.program_mut(name)
        .ok_or(EbpfError::Missing(name))?
        .try_into()
        .map_err(prog_err(name))
}

fn prog_err(name: &str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    let name = name.to_string();
    move |source| EbpfError::Program { name, source }
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    bpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, EbpfError> {
    let map = bpf.take_map(name).ok_or(EbpfError::Missing(name))?;
    BpfHashMap::try_from(map).map_err(|source| EbpfError::Map {
        name: name.into(),
        source,
    })
}

/// A program's link as the fd link that can be pinned.
fn fd_link<L>(name: &str, link: L) -> Result<FdLink, EbpfError>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|source| EbpfError::Link {
        name: name.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::{Arc, Barrier};

    use super::*;

    fn sh(args: &[&str]) {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    /// Runs `test` on a thread with a mount namespace of its own in which bpffs is not
    /// mounted, so the machine's mounts and other tests are untouched. Children (mount,
    /// umount) and threads that `test` spawns share that namespace.
    fn without_bpffs(test: impl FnOnce() + Send + 'static) {
        if !crate::test_support::privileged() {
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                .expect("unshare a mount namespace (needs root)");
            sh(&["mount", "--make-rprivate", "/"]);
            while bpffs_mounts().unwrap() > 0 {
                sh(&["umount", "-l", BPFFS]);
            }
            test();
        })
        .join()
        .unwrap();
    }

    /// Ztunnels starting together on a node without bpffs mount it once: a second mount would
    /// hide the first one's pins.
    #[test]
    fn concurrent_starts_mount_bpffs_once() {
        without_bpffs(|| {
            let starts = 8;
            let barrier = Arc::new(Barrier::new(starts));
            let threads: Vec<_> = (0..starts)
                .map(|_| {
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        ensure_bpffs()
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap().unwrap();
            }
            assert_eq!(bpffs_mounts().unwrap(), 1, "bpffs mounted more than once");
        });
    }

    /// A process holding the lock on the mount point delays a start only so long, then the
    /// start fails saying why.
    #[test]
    fn a_held_bpffs_lock_fails_the_mount_in_bounded_time() {
        without_bpffs(|| {
            let holder = nix::fcntl::Flock::lock(
                File::open(BPFFS).unwrap(),
                nix::fcntl::FlockArg::LockExclusive,
            )
            .unwrap();
            let err = lock_bpffs_dir(std::time::Duration::from_millis(100))
                .expect_err("the lock is held");
            assert!(err.to_string().contains("held the lock"), "{err}");
            drop(holder);
            lock_bpffs_dir(std::time::Duration::from_millis(100)).unwrap();
        });
    }
}
