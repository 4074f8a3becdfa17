//! Traffic capture: making an enrolled pod's TCP reach ztunnel's in-pod listeners, and
//! recovering where each captured connection was going.
//!
//! One implementation per mode behind one type, so callers never care which is active:
//! - `ebpf` ([`crate::ebpf`]): cgroup connect/getpeername/sock_ops hooks at the cgroup2 root,
//!   scoped to enrolled netns by cookie, plus an sk_lookup program per pod netns.
//! - `nftables`: a table inside the pod's netns: locally generated TCP is REDIRECTed to the
//!   outbound listener (15001), arriving TCP other than HBONE (15008) to the inbound plaintext
//!   listener (15006); sockets carrying the mesh mark and loopback traffic are left alone. The
//!   original destination comes from conntrack (SO_ORIGINAL_DST).
//! - Both modes let inbound TCP from exactly the node's probe SNAT address
//!   (`meshcore::enrollment::PROBE_SNAT_V4/V6`, what mesh-cni's probe SNAT rewrites the node's
//!   own connections to) reach the app directly: kubelet probes work on STRICT pods.
//! - `auto`: eBPF if it loads, else nftables, with the reason logged, in the config dump
//!   ([`Capture::fallback_reason`]) and in the metric label.
//!
//! Enrolling a pod in one mode removes the other mode's state from it (no double capture).
//! Owns the rules, the programs' per-pod state and the lookup; not the listeners.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use meshcore::enrollment::{PROBE_SNAT_V4, PROBE_SNAT_V6};
use meshcore::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, MESH_SOCKET_MARK, OUTBOUND_PORT};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::ebpf::{Ebpf, EbpfError, Instance};
pub use crate::ebpf::{EbpfLog, Exclusions};
use crate::netns::{CommandError, Netns};

/// The nftables table ztunnel owns inside each enrolled pod's namespace.
pub const NFT_TABLE: &str = "ztunnel";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    /// eBPF if the kernel and privileges allow, else nftables (the reason is reported).
    Auto,
    /// eBPF socket hooks (cgroup connect/getpeername/sock_ops at the cgroup2 root, sk_lookup per pod).
    Ebpf,
    /// nftables REDIRECT inside each pod's network namespace.
    Nftables,
}

impl std::fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CaptureMode::Auto => "auto",
            CaptureMode::Ebpf => "ebpf",
            CaptureMode::Nftables => "nftables",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("nftables capture: {0}")]
    Nft(#[from] CommandError),
    #[error("eBPF capture: {0}")]
    Ebpf(#[from] EbpfError),
}

/// What enrolling left in the kernel for one pod, needed to undo it.
#[derive(Clone, Copy, Debug)]
pub struct Enrollment {
    /// The pod's netns cookie (eBPF mode).
    netns_cookie: Option<u64>,
}

pub struct Capture {
    mode: CaptureMode,
    fallback: Option<String>,
    ebpf: Option<Ebpf>,
    /// Whose eBPF state this is, and the name pod records give it.
    instance: Instance,
}

impl Capture {
    /// Sets up capture in `requested` mode for this ztunnel `instance`. An explicit mode
    /// that cannot run is an error; `auto` falls back to nftables and says why.
    /// `log` is the kernel programs' decision log level (eBPF mode only).
    pub fn new(
        requested: CaptureMode,
        instance: &Instance,
        fast_path: bool,
        log: EbpfLog,
    ) -> Result<Capture, CaptureError> {
        let instance = instance.clone();
        match requested {
            CaptureMode::Ebpf => Ok(Capture {
                mode: CaptureMode::Ebpf,
                fallback: None,
                ebpf: Some(Ebpf::load(&instance, fast_path, log)?),
                instance,
            }),
            CaptureMode::Nftables => {
                remove_ebpf_instance(&instance);
                Ok(Capture {
                    mode: CaptureMode::Nftables,
                    fallback: None,
                    ebpf: None,
                    instance,
                })
            }
            CaptureMode::Auto => match Ebpf::load(&instance, fast_path, log) {
                Ok(e) => Ok(Capture {
                    mode: CaptureMode::Ebpf,
                    fallback: None,
                    ebpf: Some(e),
                    instance,
                }),
                Err(e) => {
                    let reason = e.to_string();
                    warn!(reason = %reason, "capture auto: eBPF unavailable, falling back to nftables");
                    remove_ebpf_instance(&instance);
                    Ok(Capture {
                        mode: CaptureMode::Nftables,
                        fallback: Some(reason),
                        ebpf: None,
                        instance,
                    })
                }
            },
        }
    }

    /// nftables-only capture with no kernel setup (unit tests, tools).
    pub fn nftables() -> Capture {
        Capture {
            mode: CaptureMode::Nftables,
            fallback: None,
            ebpf: None,
            instance: Instance::NodeNetns {
                node: String::new(),
            },
        }
    }

    /// The ztunnel instance this capture belongs to.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The effective mode (never `auto`).
    pub fn mode(&self) -> CaptureMode {
        self.mode
    }

    /// Why `auto` did not pick eBPF, if it did not.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Starts capturing the pod's traffic. `listeners` are ztunnel's listeners in the pod
    /// (15001, 15006, 15008; eBPF capture hands each new connection to exactly these), `ips`
    /// its addresses. Idempotent: replaces whatever an earlier run left, including the other
    /// mode's state.
    pub fn enroll(
        &self,
        ns: &Netns,
        listeners: &[RawFd],
        ips: &[IpAddr],
        excl: &Exclusions,
    ) -> Result<Enrollment, CaptureError> {
        match &self.ebpf {
            Some(e) => {
                // Leftover rules of an nftables run would capture twice.
                nft(
                    ns,
                    &format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"),
                )?;
                let cookie = e.enroll(ns.file(), listeners, ips, excl)?;
                Ok(Enrollment {
                    netns_cookie: Some(cookie),
                })
            }
            None => {
                nft(ns, &nft_ruleset(excl))?;
                Ok(Enrollment { netns_cookie: None })
            }
        }
    }

    /// Stops capturing; leaves nothing of ours in the namespace.
    pub fn unenroll(&self, ns: &Netns, enrollment: Enrollment) -> Result<(), CaptureError> {
        if let (Some(e), Some(cookie)) = (&self.ebpf, enrollment.netns_cookie) {
            e.unenroll(cookie)?;
        }
        // Declaring the table first makes the delete succeed even if it is already gone.
        remove_nft(ns)
    }

    /// After the first full reconcile: drops eBPF state of pods an earlier run enrolled and this
    /// one did not.
    pub fn sweep(&self) {
        if let Some(e) = &self.ebpf {
            e.sweep();
        }
    }

    /// Graceful stop, after every pod is unenrolled: removes the pinned programs and maps.
    pub fn shutdown(&self) {
        if let Some(e) = &self.ebpf
            && let Err(err) = e.remove_all()
        {
            warn!(error = %err, "removing eBPF pins failed; run `ztunnel cleanup`");
        }
    }

    /// A stop that keeps capture: removes the node-global eBPF state if no pod is enrolled in
    /// it and no newer ztunnel shares it ([`Ebpf::remove_if_idle`]); nftables mode keeps
    /// nothing outside the pods.
    pub fn release_if_idle(&self) {
        if let Some(e) = &self.ebpf {
            match e.remove_if_idle() {
                Ok(true) => info!("no pod enrolled and no newer ztunnel: eBPF pins removed"),
                Ok(false) => {}
                Err(err) => {
                    warn!(error = %err, "removing idle eBPF pins failed; run `ztunnel cleanup`")
                }
            }
        }
    }

    /// The eBPF loader, when capture runs in eBPF mode (the fast path needs it).
    pub fn ebpf(&self) -> Option<&Ebpf> {
        self.ebpf.as_ref()
    }

    /// What every connection accepted on `listener` shares, asked of the kernel once per
    /// listener instead of once per connection. A question the kernel does not answer here is
    /// left `None` and asked of each connection instead.
    pub fn listener_info(&self, listener: &tokio::net::TcpListener) -> ListenerInfo {
        ListenerInfo {
            local: listener.local_addr().ok(),
            netns_cookie: self
                .ebpf
                .as_ref()
                .and_then(|_| crate::ebpf::netns_cookie(listener.as_raw_fd()).ok()),
        }
    }

    /// Where a captured connection was originally going; `peer` is the address accept gave
    /// and `at` what its listener told [`Capture::listener_info`] (asking the socket again
    /// would cost syscalls per connection).
    pub fn original_dst(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        at: &ListenerInfo,
    ) -> io::Result<SocketAddr> {
        match &self.ebpf {
            Some(e) => e.original_dst(stream, peer, at),
            None => so_original_dst(stream, peer),
        }
    }
}

/// A listener's bound address and, under eBPF, the cookie of the netns it lives in: the same
/// for every connection it accepts.
#[derive(Clone, Copy, Debug)]
pub struct ListenerInfo {
    pub local: Option<SocketAddr>,
    pub netns_cookie: Option<u64>,
}

/// Removes ztunnel's nftables table from `ns` (absent is fine): unenrolling, and `ztunnel
/// cleanup` of pods a stopped ztunnel left captured.
pub fn remove_nft(ns: &Netns) -> Result<(), CaptureError> {
    nft(
        ns,
        &format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"),
    )
}

/// Removes a (crashed) eBPF instance of this node, e.g. when switching to nftables.
fn remove_ebpf_instance(instance: &Instance) {
    match instance.dir() {
        Ok(dir) if dir.exists() => match crate::ebpf::remove_dir(&dir) {
            Ok(()) => info!(dir = %dir.display(), "removed eBPF capture state of an earlier run"),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "removing eBPF capture state of an earlier run failed")
            }
        },
        _ => {}
    }
}

/// v4-mapped IPv6 addresses as plain IPv4 (what the mesh's config and policies hold).
pub fn canonical_addr(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

fn nft_ruleset(excl: &Exclusions) -> String {
    let set = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let out_excl = if excl.outbound.is_empty() {
        String::new()
    } else {
        format!("tcp dport {{ {} }} return\n", set(&excl.outbound))
    };
    let in_excl = if excl.inbound.is_empty() {
        String::new()
    } else {
        format!("tcp dport {{ {} }} return\n", set(&excl.inbound))
    };
    format!(
        "table inet {t}\n\
         delete table inet {t}\n\
         table inet {t} {{\n\
           chain outbound {{\n\
             type nat hook output priority -100; policy accept;\n\
             meta l4proto != tcp return\n\
             meta mark {mark:#x} return\n\
             oifname \"lo\" return\n\
             ip daddr 127.0.0.0/8 return\n\
             ip6 daddr ::1 return\n\
             {out_excl}\
             meta l4proto tcp redirect to :{out}\n\
           }}\n\
           chain inbound {{\n\
             type nat hook prerouting priority -100; policy accept;\n\
             meta l4proto != tcp return\n\
             meta mark {mark:#x} return\n\
             iifname \"lo\" return\n\
             ip saddr {probe4} return\n\
             ip6 saddr {probe6} return\n\
             tcp dport {hbone} return\n\
             {in_excl}\
             meta l4proto tcp redirect to :{inb}\n\
           }}\n\
         }}\n",
        t = NFT_TABLE,
        mark = MESH_SOCKET_MARK,
        out = OUTBOUND_PORT,
        inb = INBOUND_PLAINTEXT_PORT,
        hbone = HBONE_PORT,
        probe4 = PROBE_SNAT_V4,
        probe6 = PROBE_SNAT_V6,
    )
}

/// Runs `nft -f -` inside `ns` with `script` on stdin.
fn nft(ns: &Netns, script: &str) -> Result<(), CaptureError> {
    ns.command("nft", &["-f", "-"], script)?;
    Ok(())
}

/// conntrack's pre-NAT destination of a REDIRECTed connection. Its family is the peer's: both
/// ends of a socket are of one family (v4-mapped on a dual-stack socket).
fn so_original_dst(stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80; // same value for IP6T_SO_ORIGINAL_DST
    let fd = stream.as_raw_fd();
    match peer {
        SocketAddr::V4(_) => {
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: sa is a properly sized, writable sockaddr_in.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IP,
                    SO_ORIGINAL_DST,
                    (&mut sa as *mut libc::sockaddr_in).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sa.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            // SAFETY: sa is a properly sized, writable sockaddr_in6.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IPV6,
                    SO_ORIGINAL_DST,
                    (&mut sa as *mut libc::sockaddr_in6).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sa.sin6_port),
                0,
                0,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_programs_exempt_the_same_probe_addresses_as_the_node_snat() {
        assert_eq!(ztunnel_ebpf_common::PROBE_SNAT_V4, PROBE_SNAT_V4.octets());
        assert_eq!(ztunnel_ebpf_common::PROBE_SNAT_V6, PROBE_SNAT_V6.octets());
    }

    #[test]
    fn nft_inbound_exempts_exactly_the_probe_sources() {
        let rules = nft_ruleset(&Exclusions::default());
        assert!(rules.contains("ip saddr 169.254.7.127 return"));
        assert!(rules.contains("ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff return"));
    }
}
