//! The fast path (`--fast-path`): the `zt_splice` stream verdict attached to the `ZT_SPLICE_RX`
//! sockhash, and splicing two of ztunnel's own sockets so the kernel forwards their bytes to
//! each other. Owns the splice maps only; which connections may be spliced is
//! [`crate::fastpath`]'s decision, and capture is [`super`]'s.

use std::io;
use std::os::fd::RawFd;

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::SkSkb;
use ztunnel_ebpf_common::{MAP_SPLICE_BYTES, MAP_SPLICE_PEER, MAP_SPLICE_RX, MAP_SPLICE_TX};

use super::sock::socket_cookie;
use super::{Ebpf, EbpfError, io_err, prog_err, program, take_map};

const SPLICE: &str = "zt_splice";

/// The fast path's maps (present only with `--fast-path`).
pub(super) struct SpliceMaps {
    rx: SockHash<MapData, u64>,
    tx: SockHash<MapData, u64>,
    peer: BpfHashMap<MapData, u64, u64>,
    bytes: BpfHashMap<MapData, u64, u64>,
}

/// Two sockets spliced by [`Ebpf::splice`], by socket cookie.
#[derive(Clone, Copy, Debug)]
pub struct Spliced {
    pub a: u64,
    pub b: u64,
}

impl Ebpf {
    pub(super) fn load_splice(bpf: &mut aya::Ebpf) -> Result<SpliceMaps, EbpfError> {
        let sockhash = |bpf: &mut aya::Ebpf, name: &'static str| {
            let m = bpf.take_map(name).ok_or(EbpfError::Missing(name))?;
            SockHash::<MapData, u64>::try_from(m).map_err(|source| EbpfError::Map {
                name: name.into(),
                source,
            })
        };
        let rx = sockhash(bpf, MAP_SPLICE_RX)?;
        let tx = sockhash(bpf, MAP_SPLICE_TX)?;
        let peer = take_map(bpf, MAP_SPLICE_PEER)?;
        let bytes = take_map(bpf, MAP_SPLICE_BYTES)?;
        let prog: &mut SkSkb = program(bpf, SPLICE)?;
        prog.load().map_err(prog_err(SPLICE))?;
        // Attached to the map: lives as long as the map, i.e. this process.
        prog.attach(rx.fd()).map_err(prog_err(SPLICE))?;
        Ok(SpliceMaps {
            rx,
            tx,
            peer,
            bytes,
        })
    }

    /// Whether `--fast-path` is on (the splice program is attached).
    pub fn fast_path(&self) -> bool {
        self.splice.is_some()
    }

    /// Splices two connected TCP sockets of ztunnel's: from now on bytes arriving on either are
    /// sent out of the other by the kernel. Bytes already queued are pushed through at once.
    pub fn splice(&self, a: RawFd, b: RawFd) -> Result<Spliced, EbpfError> {
        let maps = self.splice.as_ref().ok_or(EbpfError::Missing(SPLICE))?;
        let ca = socket_cookie(a).map_err(io_err("getsockopt(SO_COOKIE)"))?;
        let cb = socket_cookie(b).map_err(io_err("getsockopt(SO_COOKIE)"))?;
        let spliced = Spliced { a: ca, b: cb };
        for fd in [a, b] {
            set_splice_sndbuf(fd).map_err(io_err("setsockopt(SO_SNDBUF)"))?;
        }
        let mut m = maps.lock().unwrap_or_else(|p| p.into_inner());
        let map_err = |name: &str| {
            let name = name.to_string();
            move |source| EbpfError::Map { name, source }
        };
        let result = (|| {
            for (me, other) in [(ca, cb), (cb, ca)] {
                m.bytes
                    .insert(me, 0, 0)
                    .map_err(map_err(MAP_SPLICE_BYTES))?;
                m.peer
                    .insert(me, other, 0)
                    .map_err(map_err(MAP_SPLICE_PEER))?;
            }
            // Both are redirect targets before either's arriving bytes are redirected.
            for (c, fd) in [(ca, a), (cb, b)] {
                m.tx.insert(c, fd, 0).map_err(map_err(MAP_SPLICE_TX))?;
            }
            for (c, fd) in [(ca, a), (cb, b)] {
                m.rx.insert(c, fd, 0).map_err(map_err(MAP_SPLICE_RX))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            remove_splice(&mut m, spliced);
            return Err(e);
        }
        drop(m);
        // Bytes that arrived before the verdict was attached sit in the receive queue until the
        // next data-ready; setting SO_RCVLOWAT signals data-ready now.
        for fd in [a, b] {
            set_rcvlowat(fd).map_err(io_err("setsockopt(SO_RCVLOWAT)"))?;
        }
        Ok(spliced)
    }

    /// Bytes the kernel forwarded that arrived on the socket with `cookie`.
    pub fn spliced_bytes(&self, cookie: u64) -> u64 {
        self.splice
            .as_ref()
            .and_then(|m| {
                m.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .bytes
                    .get(&cookie, 0)
                    .ok()
            })
            .unwrap_or(0)
    }

    /// Undoes [`Ebpf::splice`] (closing the sockets also drops them from the sockhashes).
    pub fn unsplice(&self, spliced: Spliced) {
        if let Some(m) = &self.splice {
            remove_splice(&mut m.lock().unwrap_or_else(|p| p.into_inner()), spliced);
        }
    }
}

fn remove_splice(m: &mut SpliceMaps, s: Spliced) {
    for c in [s.a, s.b] {
        let _ = m.peer.remove(&c);
        let _ = m.rx.remove(&c);
        let _ = m.tx.remove(&c);
        let _ = m.bytes.remove(&c);
    }
}
/// Send buffer of a spliced leg (the kernel doubles it for overhead).
///
/// The kernel's forwarding worker writes into a leg until its send buffer is full, then
/// reschedules itself one jiffy later (`sk_psock_backlog`: `schedule_delayed_work(.., 1)`; a
/// write-space wakeup cannot advance a pending delayed work). With the default autotuned
/// buffer (`tcp_wmem` max, 4 MiB) and HZ=250 that caps a stream at about 8 Gbit/s, less in
/// practice; the buffer must hold a jiffy's worth of the link. Set with `SO_SNDBUFFORCE`
/// (ztunnel has CAP_NET_ADMIN), else `SO_SNDBUF` (capped by `net.core.wmem_max`).
const SPLICE_SNDBUF: libc::c_int = 8 << 20;

fn set_splice_sndbuf(fd: RawFd) -> io::Result<()> {
    let set = |opt| {
        // SAFETY: a valid int option value of the stated size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&SPLICE_SNDBUF as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    set(libc::SO_SNDBUFFORCE).or_else(|_| set(libc::SO_SNDBUF))
}

fn set_rcvlowat(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid int option value of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
