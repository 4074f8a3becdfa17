//! Traffic capture: making an enrolled pod's TCP reach ztunnel's in-pod listeners, and
//! recovering where each captured connection was going.
//!
//! One implementation per mode behind one enum, so callers never care which is active. The
//! `nftables` mode installs a table inside the pod's netns: locally generated TCP is
//! REDIRECTed to the outbound listener (15001), arriving TCP other than HBONE (15008) to the
//! inbound plaintext listener (15006); sockets carrying the mesh mark and loopback traffic
//! are left alone. The original destination comes from conntrack (SO_ORIGINAL_DST).
//! Owns the rules and the lookup; not the listeners.

use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use meshcore::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, MESH_SOCKET_MARK, OUTBOUND_PORT};
use tokio::net::TcpStream;

use crate::netns::Netns;

/// The nftables table ztunnel owns inside each enrolled pod's namespace.
pub const NFT_TABLE: &str = "ztunnel";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    /// nftables REDIRECT inside each pod's network namespace.
    Nftables,
}

impl std::fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaptureMode::Nftables => f.write_str("nftables"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("running nft in {netns}: {source} (is the nftables package installed?)")]
    Spawn { netns: String, source: io::Error },
    #[error("nft in {netns} failed: {stderr}")]
    Nft { netns: String, stderr: String },
}

#[derive(Clone, Copy, Debug)]
pub struct Capture {
    mode: CaptureMode,
}

impl Capture {
    pub fn new(mode: CaptureMode) -> Capture {
        Capture { mode }
    }

    pub fn mode(&self) -> CaptureMode {
        self.mode
    }

    /// Starts capturing the pod's traffic. Idempotent: replaces whatever an earlier run left.
    pub fn enroll(&self, ns: &Netns) -> Result<(), CaptureError> {
        match self.mode {
            CaptureMode::Nftables => nft(ns, &nft_ruleset()),
        }
    }

    /// Stops capturing; leaves nothing of ours in the namespace.
    pub fn unenroll(&self, ns: &Netns) -> Result<(), CaptureError> {
        match self.mode {
            // Declaring the table first makes the delete succeed even if it is already gone.
            CaptureMode::Nftables => nft(ns, &format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")),
        }
    }

    /// Where a captured connection was originally going.
    pub fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        match self.mode {
            CaptureMode::Nftables => so_original_dst(stream),
        }
    }
}

fn nft_ruleset() -> String {
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
             meta l4proto tcp redirect to :{out}\n\
           }}\n\
           chain inbound {{\n\
             type nat hook prerouting priority -100; policy accept;\n\
             meta l4proto != tcp return\n\
             meta mark {mark:#x} return\n\
             iifname \"lo\" return\n\
             tcp dport {hbone} return\n\
             meta l4proto tcp redirect to :{inb}\n\
           }}\n\
         }}\n",
        t = NFT_TABLE,
        mark = MESH_SOCKET_MARK,
        out = OUTBOUND_PORT,
        inb = INBOUND_PLAINTEXT_PORT,
        hbone = HBONE_PORT,
    )
}

/// Runs `nft -f -` inside `ns` with `script` on stdin.
fn nft(ns: &Netns, script: &str) -> Result<(), CaptureError> {
    let netns = ns.path().display().to_string();
    let fd = ns.raw_fd();
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
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
    let mut child = cmd.spawn().map_err(|source| CaptureError::Spawn { netns: netns.clone(), source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| CaptureError::Spawn { netns: netns.clone(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| CaptureError::Spawn { netns: netns.clone(), source })?;
    if !out.status.success() {
        return Err(CaptureError::Nft { netns, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(())
}

/// conntrack's pre-NAT destination of a REDIRECTed connection.
fn so_original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80; // same value for IP6T_SO_ORIGINAL_DST
    let fd = stream.as_raw_fd();
    match stream.local_addr()? {
        SocketAddr::V4(_) => {
            let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: sa is a properly sized, writable sockaddr_in.
            let rc = unsafe { libc::getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sa.sin_port))))
        }
        SocketAddr::V6(_) => {
            let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            // SAFETY: sa is a properly sized, writable sockaddr_in6.
            let rc = unsafe { libc::getsockopt(fd, libc::SOL_IPV6, SO_ORIGINAL_DST, (&mut sa as *mut libc::sockaddr_in6).cast(), &mut len) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, 0)))
        }
    }
}
