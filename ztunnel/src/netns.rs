//! Network namespaces: entering a pod's netns just long enough to create a socket there.
//!
//! ztunnel is a node process, but each enrolled pod's listeners and upstream sockets must live
//! in that pod's network namespace (so egress carries the pod IP and the node's CNI still sees
//! pod traffic). A socket stays in the namespace it was created in, so we `setns` the current
//! thread, create the socket, and switch straight back — no await in between. Owns nothing
//! about what the sockets are used for.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The namespace ztunnel started in, to which every thread returns after creating a socket.
static HOST_NETNS: OnceLock<File> = OnceLock::new();

/// Records the current thread's netns as "home". Call once from main before any `Netns::run`.
pub fn init_host_netns() -> io::Result<()> {
    let f = File::open("/proc/thread-self/ns/net")?;
    let _ = HOST_NETNS.set(f);
    Ok(())
}

/// A program run inside a namespace ([`Netns::command`]) that could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("running `{program}` in {netns}: {source} (is it installed?)")]
    Spawn {
        program: &'static str,
        netns: String,
        source: io::Error,
    },
    #[error("`{program}` in {netns} failed: {stderr}")]
    Failed {
        program: &'static str,
        netns: String,
        stderr: String,
    },
}

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", path.display())))?;
        Ok(Netns {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open namespace file (for attaching per-netns eBPF programs).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Raw fd, for child processes that `setns` in `pre_exec`.
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Runs `f` with the current thread inside this namespace. `f` must not block or await.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let home = HOST_NETNS
            .get()
            .ok_or_else(|| io::Error::other("netns::init_host_netns was not called"))?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("setns into {}: {e}", self.path.display())))?;
        let out = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A runtime thread stranded in a pod's namespace would open later sockets in the
            // wrong place; there is no safe way on.
            eprintln!("fatal: cannot return to the host network namespace: {e}");
            std::process::abort();
        }
        out
    }

    /// Replaces a per-namespace sysctl (`/proc/sys/net/...` resolves to the opener's
    /// namespace) and returns its previous value, so it can be restored.
    pub fn swap_sysctl(&self, path: &str, value: &str) -> io::Result<String> {
        self.run(|| {
            let old = std::fs::read_to_string(path)?;
            std::fs::write(path, value)?;
            Ok(old.trim().to_string())
        })
    }

    /// A listening socket bound to `addr` inside this namespace. IPv6 sockets are v6-only so
    /// that a v4 and a v6 listener can share a port and original-destination lookups stay
    /// per-family. SO_REUSEPORT lets the next ztunnel bind beside us during a handover; the
    /// socket is owned by [`LISTENER_UID`], so only a socket of that owner can join the group.
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let std = self.run(|| {
            let s = as_fsuid(LISTENER_UID, || {
                Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            })?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.set_nonblocking(true)?;
            s.bind(&SockAddr::from(addr))?;
            s.listen(1024)?;
            Ok(std::net::TcpListener::from(s))
        })?;
        TcpListener::from_std(std)
    }

    /// A socket to `dst`, an address of this namespace's pod, bound to `src`, a foreign
    /// address (the client's): transparent and marked [`crate::origsrc::ORIG_SRC_MARK`], so the
    /// replies come back to it once [`crate::origsrc::install`] has set up the pod. Dialling
    /// your own address is never captured outbound, so it needs no mesh mark.
    pub fn transparent_socket(&self, src: IpAddr, dst: SocketAddr) -> io::Result<TcpSocket> {
        self.run(|| {
            // Non-blocking from creation (SOCK_NONBLOCK): no fcntl pair per connection.
            let s = Socket::new(
                Domain::for_address(dst),
                Type::STREAM.nonblocking(),
                Some(Protocol::TCP),
            )?;
            if dst.is_ipv4() {
                s.set_ip_transparent_v4(true)?;
            } else {
                s.set_ip_transparent_v6(true)?;
            }
            s.set_mark(crate::origsrc::ORIG_SRC_MARK)?;
            s.set_tcp_nodelay(true)?;
            // The port is chosen at connect, knowing the whole 4-tuple: ports in TIME_WAIT
            // are reused (tcp_tw_reuse), where a port chosen at bind would exhaust them.
            set_bind_address_no_port(&s)?;
            s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
            Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(s)))
        })
    }

    /// Runs `program args` inside this namespace with `input` on its stdin; its stdout, or an
    /// error with its stderr. The forked child enters the namespace before exec; no thread of
    /// ours moves.
    pub fn command(
        &self,
        program: &'static str,
        args: &[&str],
        input: &str,
    ) -> Result<String, CommandError> {
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        let spawn_err = |source| CommandError::Spawn {
            program,
            netns: self.path.display().to_string(),
            source,
        };
        let fd = self.raw_fd();
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: pre_exec runs in the forked child before exec; setns is async-signal-safe and
        // `fd` stays open in the parent for the duration of the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(CommandError::Failed {
                program,
                netns: self.path.display().to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Connects to `dst` from inside this namespace with the mesh's socket mark, so capture
    /// never redirects ztunnel's own traffic.
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = self.run(|| {
            let s = Socket::new(
                Domain::for_address(dst),
                Type::STREAM.nonblocking(),
                Some(Protocol::TCP),
            )?;
            s.set_mark(meshcore::MESH_SOCKET_MARK)?;
            s.set_tcp_nodelay(true)?;
            Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(s)))
        })?;
        socket.connect(dst).await
    }
}

/// Owner of ztunnel's in-pod listening sockets. The kernel lets a socket join an SO_REUSEPORT
/// group only if it has the same owner as the group's sockets; as root-owned sockets, any root
/// process in the pod could join ztunnel's listeners and take connections off them, before
/// policy (audit L6). With an owner of their own, the pod's processes — root included — get
/// EADDRINUSE, while the next ztunnel (same owner) still joins for a handover. A pod process
/// holding CAP_SETUID can still become this uid and join: in eBPF mode sk_lookup hands every
/// connection to exactly ztunnel's sockets anyway; nftables mode has no such guard. `u32::MAX - 2`: far above the ids systems
/// and container runtimes hand out (65534 is nobody; user namespace ranges start at 100000).
pub const LISTENER_UID: libc::uid_t = libc::uid_t::MAX - 2;

/// Runs `f` (which creates a socket) with this thread's filesystem uid set to `uid`: a socket's
/// owner is the fsuid of its creator. setfsuid is per thread and needs CAP_SETUID.
fn as_fsuid<T>(uid: libc::uid_t, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    // SAFETY: setfsuid has no memory effects; it returns the previous fsuid, and reports
    // failure only by leaving it unchanged, which the second call reads back.
    let (before, now) = unsafe { (libc::setfsuid(uid), libc::setfsuid(uid)) };
    if now as libc::uid_t != uid {
        // SAFETY: as above.
        unsafe { libc::setfsuid(before as libc::uid_t) };
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("setfsuid({uid}) refused: ztunnel needs CAP_SETUID"),
        ));
    }
    let out = f();
    // SAFETY: as above; back to the thread's own fsuid.
    unsafe { libc::setfsuid(before as libc::uid_t) };
    out
}

/// IP_BIND_ADDRESS_NO_PORT (socket2 has no setter); honoured by IPv6 sockets too.
fn set_bind_address_no_port(s: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid c_int for the option's duration; fd is open.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Netns {
    /// A namespace handed over as an open fd (the CNI agent's, over ZDS); `label` names it in
    /// logs and the config dump, as a path does for one opened by name.
    pub fn from_fd(fd: std::os::fd::OwnedFd, label: PathBuf) -> Netns {
        Netns {
            path: label,
            file: File::from(fd),
        }
    }

    /// A second handle on the same namespace (for a pod whose listeners are replaced).
    pub fn try_clone(&self) -> io::Result<Netns> {
        Ok(Netns {
            path: self.path.clone(),
            file: self.file.try_clone()?,
        })
    }
}
