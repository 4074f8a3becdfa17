//! Small socket helpers: the kernel's cookies of a socket and of its netns, its `TCP_INFO` state and
//! bytes acked, a listener's bound address, and addresses in the maps' encodings; and the one map
//! call aya does not offer for hash maps ([`take`]). Stateless: must not keep maps or touch pins.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use ztunnel_ebpf_common::{AF_INET, AF_INET6, IpKey, OrigDst};

const SO_NETNS_COOKIE: libc::c_int = 71;
const SO_COOKIE: libc::c_int = 57;

/// The netns cookie of a socket (the namespace it was created in).
pub fn netns_cookie(fd: RawFd) -> io::Result<u64> {
    getsockopt_u64(fd, SO_NETNS_COOKIE)
}

/// A `SOL_SOCKET` option whose value is a u64 (the kernel's socket and netns cookies).
fn getsockopt_u64(fd: RawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: value is a writable u64 and len says so.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}
pub(super) fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    getsockopt_u64(fd, SO_COOKIE)
}
pub(super) fn ip_key(ip: IpAddr) -> IpKey {
    match crate::capture::canonical_addr(SocketAddr::new(ip, 0)).ip() {
        IpAddr::V4(v4) => IpKey {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            family: AF_INET,
        },
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            IpKey {
                addr: [w(0), w(4), w(8), w(12)],
                family: AF_INET6,
            }
        }
    }
}
pub(super) fn decode(d: &OrigDst) -> SocketAddr {
    let port = u16::from_be(d.port as u16);
    let ip = if d.family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(d.addr[0].to_ne_bytes()))
    } else {
        let mut b = [0u8; 16];
        for (i, w) in d.addr.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(b))
    };
    SocketAddr::new(ip, port)
}

/// The address a listener of ours is bound to.
pub(super) fn listener_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: `fd` is one of the pod's listeners, open for the duration of this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet socket"))
}

/// (tcpi_state, tcpi_bytes_acked) of a TCP socket.
pub fn tcp_info(fd: RawFd) -> io::Result<(u8, u64)> {
    // struct tcp_info: tcpi_state at byte 0, tcpi_bytes_acked (u64) at byte 120 (Linux 4.1+).
    const BYTES_ACKED: usize = 120;
    let mut buf = [0u64; 32];
    let mut len = std::mem::size_of_val(&buf) as libc::socklen_t;
    // SAFETY: buf is writable for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < BYTES_ACKED + 8 {
        return Err(io::Error::other("TCP_INFO too short (kernel < 4.1)"));
    }
    let state = buf[0].to_ne_bytes()[0];
    Ok((state, buf[BYTES_ACKED / 8]))
}

/// Takes `key`'s value out of a hash map in one call (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`: hash maps
/// since Linux 5.14; older kernels refuse with `EINVAL` or `ENOTSUPP`). `Ok(None)`: no such key.
pub(super) fn take<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_int = 21;
    /// The head of `union bpf_attr` for map element commands; the kernel zero-fills the rest.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = MaybeUninit::<V>::zeroed();
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: attr points at key (readable, size_of::<K>() = the map's key size, checked when aya
    // opened the map as K, V) and value (writable, the value size) for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if rc == 0 {
        // SAFETY: the kernel wrote the whole value; V is Pod, so any bytes are a valid V.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(e),
    }
}
