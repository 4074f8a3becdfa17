//! The fast path (`--fast-path`): the `zt_splice` stream verdict attached to the `ZT_SPLICE_RX`
//! sockhash, and splicing two of ztunnel's own sockets so the kernel forwards their bytes to
//! each other. Owns the splice maps only; which connections may be spliced is
//! [`crate::fastpath`]'s decision, and capture is [`super`]'s.

use std::io;
use std::os::fd::RawFd;

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::SkSkb;
use ztunnel_ebpf_common::{
    MAP_SPLICE_BYTES, MAP_SPLICE_DIR, MAP_SPLICE_PEER, MAP_SPLICE_RX, MAP_SPLICE_TX, SpliceDir,
};

use super::sock::socket_cookie;
use super::{Ebpf, EbpfError, io_err, prog_err, program, take_map};

const SPLICE: &str = "zt_splice";

/// The fast path's maps (present only with `--fast-path`).
pub(super) struct SpliceMaps {
    rx: SockHash<MapData, u64>,
    tx: SockHash<MapData, u64>,
    peer: BpfHashMap<MapData, u64, u64>,
    bytes: BpfHashMap<MapData, u64, u64>,
    dir: BpfHashMap<MapData, u64, SpliceDir>,
    /// Byte offset of `bytes_acked` in this kernel's `struct tcp_sock`.
    acked_off: u64,
}

/// Most bytes one direction may have in flight (redirected, not yet acknowledged by the
/// receiver of the other leg) before it falls back to ztunnel's copy for good. It covers what
/// the other leg's send buffer ([`SPLICE_SNDBUF`], doubled by the kernel) holds at full speed
/// plus the forwarding queue of a jiffy, so a receiver that keeps up stays spliced.
pub const SPLICE_INFLIGHT_LIMIT: u64 = 32 << 20;

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
        let dir = take_map(bpf, MAP_SPLICE_DIR)?;
        let acked_off = tcp_sock_bytes_acked_offset(BTF_VMLINUX).map_err(io_err(format!(
            "the fast path's bound needs tcp_sock.bytes_acked from {BTF_VMLINUX}"
        )))?;
        let prog: &mut SkSkb = program(bpf, SPLICE)?;
        prog.load().map_err(prog_err(SPLICE))?;
        // Attached to the map: lives as long as the map, i.e. this process.
        prog.attach(rx.fd()).map_err(prog_err(SPLICE))?;
        Ok(SpliceMaps {
            rx,
            tx,
            peer,
            bytes,
            dir,
            acked_off,
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
        // Nothing has been written to either leg yet: what each peer has had acknowledged
        // from now on is what the kernel forwarded.
        let acked_a = bytes_acked(a).map_err(io_err("getsockopt(TCP_INFO)"))?;
        let acked_b = bytes_acked(b).map_err(io_err("getsockopt(TCP_INFO)"))?;
        let mut m = maps.lock().unwrap_or_else(|p| p.into_inner());
        let map_err = |name: &str| {
            let name = name.to_string();
            move |source| EbpfError::Map { name, source }
        };
        let result = (|| {
            for (me, other, peer_acked_base) in [(ca, cb, acked_b), (cb, ca, acked_a)] {
                m.bytes
                    .insert(me, 0, 0)
                    .map_err(map_err(MAP_SPLICE_BYTES))?;
                let dir = SpliceDir {
                    peer_acked_base,
                    acked_off: m.acked_off,
                    limit: SPLICE_INFLIGHT_LIMIT,
                    copy: 0,
                };
                // Before the peer entry: the program reads the bound once it finds a peer.
                m.dir.insert(me, dir, 0).map_err(map_err(MAP_SPLICE_DIR))?;
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

    /// Whether the program stopped redirecting the bytes arriving on the socket with `cookie`
    /// (its direction passed the in-flight bound): they stay on that socket for ztunnel to
    /// read, after every byte [`Ebpf::spliced_bytes`] counts, which is then final.
    pub fn splice_copying(&self, cookie: u64) -> bool {
        self.splice
            .as_ref()
            .and_then(|m| {
                m.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .dir
                    .get(&cookie, 0)
                    .ok()
            })
            .is_some_and(|d| d.copy != 0)
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
        let _ = m.dir.remove(&c);
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

/// `tcpi_bytes_acked` (= `tcp_sock.bytes_acked`) of a TCP socket.
fn bytes_acked(fd: RawFd) -> io::Result<u64> {
    super::sock::tcp_info(fd).map(|(_, acked)| acked)
}

const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Byte offset of `bytes_acked` in the kernel's `struct tcp_sock`, from its BTF: sk_skb
/// programs cannot call `bpf_tcp_sock`, and aya-ebpf has no CO-RE field relocations, so the
/// program reads the field at the offset it is given.
fn tcp_sock_bytes_acked_offset(path: &str) -> io::Result<u64> {
    let data = std::fs::read(path)?;
    btf_member_offset(&data, "tcp_sock", "bytes_acked")
        .ok_or_else(|| io::Error::other("struct tcp_sock has no plain member bytes_acked"))
}

/// Byte offset of `member` in struct `name`, walking a raw (native-endian) BTF blob. None when
/// the blob is malformed or either is missing, or the member is a bitfield.
fn btf_member_offset(data: &[u8], name: &str, member: &str) -> Option<u64> {
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(data.get(off..off + 4)?.try_into().ok()?))
    };
    if data.get(0..2)? != 0xeb9f_u16.to_ne_bytes() {
        return None;
    }
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
    let strings = data.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    let str_at = |off: u32| -> Option<&[u8]> {
        let s = strings.get(off as usize..)?;
        Some(&s[..s.iter().position(|&c| c == 0)?])
    };
    let (mut at, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
    while at + 12 <= end {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        let kind_flag = info >> 31 != 0;
        at += 12;
        // Bytes following the common header, by kind (include/uapi/linux/btf.h).
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF.., FUNC, FLOAT, TYPE_TAG
            _ => return None,
        };
        if kind == 4 && str_at(name_off)? == name.as_bytes() {
            for m in 0..vlen {
                let m_at = at + 12 * m;
                if str_at(u32_at(m_at)?)? == member.as_bytes() {
                    let off = u32_at(m_at + 8)?;
                    let (bits, bitfield) = if kind_flag {
                        (off & 0x00ff_ffff, off >> 24 != 0)
                    } else {
                        (off, false)
                    };
                    return (!bitfield && bits % 8 == 0).then_some(u64::from(bits / 8));
                }
            }
            return None;
        }
        at += extra;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This kernel's BTF names the field; the offset is inside the struct and 8-aligned.
    #[test]
    fn finds_bytes_acked_in_this_kernels_btf() {
        let Ok(off) = tcp_sock_bytes_acked_offset(BTF_VMLINUX) else {
            return; // no BTF here: nothing to check (the fast path refuses to load)
        };
        assert!(off > 0 && off < 4096 && off % 8 == 0, "offset {off}");
    }

    #[test]
    fn malformed_btf_is_none() {
        assert_eq!(btf_member_offset(&[], "tcp_sock", "bytes_acked"), None);
        assert_eq!(btf_member_offset(&[0x9f, 0xeb, 1, 0], "a", "b"), None);
        let mut hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        hdr.extend([0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(btf_member_offset(&hdr, "a", "b"), None);
    }
}
