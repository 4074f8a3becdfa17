//! ztunnel's kernel programs: capture of enrolled pods' TCP, scoped by network namespace.
//!
//! - `zt_connect4/6` (cgroup connect, cgroup2 root): an enrolled netns's TCP connect to a
//!   non-loopback destination is rewritten to ztunnel's in-pod outbound listener (127.0.0.1 or
//!   ::1 :15001); the original destination is kept under the socket cookie.
//! - `zt_sockops` (sock_ops, cgroup2 root): at TCP_CONNECT_CB the client port is known and no
//!   SYN has left yet, so the original destination is re-keyed by (netns, family, port) — what
//!   ztunnel's listener sees on accept.
//! - `zt_getpeername4/6`: the app sees the peer it dialled, not the listener.
//! - `zt_sk_lookup` (one instance per enrolled netns, `ZT_SELF_NETNS` set at load): new inbound
//!   TCP to *any* local address of the pod — its pod IPs, but also IPv6 link-local, secondary
//!   and v4-mapped addresses — is handed to ztunnel's 15006 listener, which decides (a foreign
//!   address is closed there), unless it comes in on `lo`, targets a mesh port, is excluded, or
//!   is ztunnel's own delivery to the app (from the pod's own address, or from a client's
//!   address while listed in `ZT_OWN_DIAL`), or is a kubelet probe (source exactly the
//!   node's probe SNAT address, `PROBE_SNAT_V4/V6`). The accepted socket keeps the original
//!   destination as its local address. No listener (ztunnel down) means drop: fail closed.
//!   New connections to ztunnel's own in-pod ports go to exactly its sockets too (HBONE 15008
//!   from outside, 15001 from the pod's redirected connects on `lo`). Every such selection
//!   bypasses the listener's SO_REUSEPORT group: another process in the pod that joined the
//!   group (with ztunnel's uid) is never given a connection.
//! - `zt_splice` (sk_skb stream verdict on `ZT_SPLICE_RX`, only with `--fast-path`): bytes
//!   arriving on one of ztunnel's two legs of an authorized same-node connection are sent
//!   straight out of the other leg (`ZT_SPLICE_PEER` names it, `ZT_SPLICE_TX` holds it), and
//!   counted in `ZT_SPLICE_BYTES`. ztunnel alone fills these maps, after its policy check.
//!   Backpressure (`ZT_SPLICE_DIR`): once a direction would have more than its limit in flight
//!   (redirected minus what the peer leg's TCP has had acknowledged), it stops redirecting for
//!   good and passes its bytes to the receiving leg itself, where they are charged to that
//!   leg's receive buffer (its window closes) until ztunnel copies them.
//!
//! Every capture decision in an enrolled netns (redirect, pass, drop, with its reason) can be
//! logged through aya-log (`ztunnel --ebpf-log LEVEL`). The level is a read-only global fixed
//! at load (`AYA_LOG_LEVEL`, 0 when off), so with logging off the verifier prunes the logging
//! code: it costs nothing.
//!
//! Root attachments see every socket on the machine, including other ztunnels' pods and the
//! host: anything whose netns is not in this instance's `ZT_NETNS` passes untouched (and is
//! never logged), and sockets carrying the mesh mark (ztunnel's own) are never captured. Owns
//! no policy.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use core::net::{Ipv4Addr, Ipv6Addr};

use aya_ebpf::bindings::BPF_SK_LOOKUP_F_NO_REUSEPORT;
use aya_ebpf::bindings::{bpf_sock_addr, sk_action};
use aya_ebpf::helpers::generated::{bpf_map_lookup_elem, bpf_sk_release, bpf_skc_to_tcp_sock};
use aya_ebpf::helpers::{
    bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_sock_ops_cb_flags_set,
};
use aya_ebpf::macros::{cgroup_sock_addr, map, sk_lookup, sock_ops, stream_verdict};
use aya_ebpf::maps::{HashMap, LruHashMap, SockHash};
use aya_ebpf::programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext};
use aya_ebpf::{EbpfContext, Global};
use aya_log_ebpf::macro_support::Level;
use ztunnel_ebpf_common::{
    AF_INET, AF_INET6, DIR_INBOUND, DIR_OUTBOUND, ExclKey, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
    IpKey, ListenKey, MESH_SOCKET_MARK, NetnsConf, ORIG_SRC_MARK, OUTBOUND_PORT, OrigDst,
    OwnDialKey, PROBE_SNAT_V4, PROBE_SNAT_V6, PortKey, SpliceDir,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: u32 = 4;
const TCP_SYN_SENT: u32 = 2;
const LOOPBACK_IFINDEX: u32 = 1;
/// cgroup sock_addr verdict: let the syscall proceed (with whatever we rewrote).
const ALLOW: i32 = 1;

/// The pod network namespace this instance of `zt_sk_lookup` is attached to. sk_lookup
/// programs cannot ask for their netns cookie, so ztunnel loads one instance per enrolled pod
/// with this set; 0 in the shared load (whose sk_lookup is never attached).
#[unsafe(no_mangle)]
static ZT_SELF_NETNS: Global<u64> = Global::new(0);

/// An address as the context structs hold it (network order words) for the log.
#[inline(always)]
fn v4(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(addr))
}

#[inline(always)]
fn v6(w: [u32; 4]) -> Ipv6Addr {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    Ipv6Addr::from([
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ])
}

#[map(name = "ZT_NETNS")]
static ZT_NETNS: HashMap<u64, NetnsConf> = HashMap::pinned(4096, 0);
#[map(name = "ZT_EXCL")]
static ZT_EXCL: HashMap<ExclKey, u8> = HashMap::pinned(16384, 0);
#[map(name = "ZT_SOCK_DST")]
static ZT_SOCK_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);
#[map(name = "ZT_PORT_DST")]
static ZT_PORT_DST: LruHashMap<PortKey, OrigDst> = LruHashMap::pinned(65536, 0);
#[map(name = "ZT_POD_IP")]
static ZT_POD_IP: HashMap<IpKey, u64> = HashMap::pinned(8192, 0);
#[map(name = "ZT_OWN_DIAL")]
static ZT_OWN_DIAL: LruHashMap<OwnDialKey, u8> = LruHashMap::pinned(16384, 0);
#[map(name = "ZT_LISTEN")]
static ZT_LISTEN: SockHash<ListenKey> = SockHash::pinned(8192, 0);

// Fast path: not pinned (spliced sockets are ztunnel's own and die with it).
#[map(name = "ZT_SPLICE_RX")]
static ZT_SPLICE_RX: SockHash<u64> = SockHash::with_max_entries(65536, 0);
#[map(name = "ZT_SPLICE_TX")]
static ZT_SPLICE_TX: SockHash<u64> = SockHash::with_max_entries(65536, 0);
#[map(name = "ZT_SPLICE_PEER")]
static ZT_SPLICE_PEER: HashMap<u64, u64> = HashMap::with_max_entries(65536, 0);
#[map(name = "ZT_SPLICE_BYTES")]
static ZT_SPLICE_BYTES: HashMap<u64, u64> = HashMap::with_max_entries(65536, 0);
#[map(name = "ZT_SPLICE_DIR")]
static ZT_SPLICE_DIR: HashMap<u64, SpliceDir> = HashMap::with_max_entries(65536, 0);

#[inline(always)]
fn enrolled(netns: u64) -> bool {
    // SAFETY: a map lookup; the value is only tested for presence.
    unsafe { ZT_NETNS.get(netns).is_some() }
}

#[inline(always)]
fn excluded(netns: u64, port: u16, dir: u8) -> bool {
    let key = ExclKey {
        netns,
        port,
        dir,
        _pad: [0; 5],
    };
    // SAFETY: a map lookup; the value is only tested for presence.
    unsafe { ZT_EXCL.get(key).is_some() }
}

/// The common prefix of connect4/6: TCP, enrolled netns, not one of ztunnel's own sockets.
/// Returns the netns cookie when the connect is a capture candidate.
#[inline(always)]
fn candidate(ctx: &SockAddrContext) -> Option<u64> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel-provided context; fields are read at full width.
    let (ty, proto) = unsafe {
        (
            read_volatile(addr_of!((*sa).type_)),
            read_volatile(addr_of!((*sa).protocol)),
        )
    };
    if ty != SOCK_STREAM || (proto != IPPROTO_TCP && proto != 0) {
        return None;
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if !enrolled(netns) {
        return None;
    }
    // SAFETY: `sk` is always set for connect hooks; checked for null anyway.
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a valid PTR_TO_SOCKET for this program.
    let mark = unsafe { read_volatile(addr_of!((*sk).mark)) };
    if mark == MESH_SOCKET_MARK {
        return None;
    }
    Some(netns)
}

/// Whether `addr` is one of the pod's own addresses (dialling yourself stays local, as with
/// nftables where such traffic leaves through `lo`).
#[inline(always)]
fn own_address(netns: u64, addr: [u32; 4], family: u32) -> bool {
    // SAFETY: map lookup, value copied out.
    unsafe { ZT_POD_IP.get(IpKey { addr, family }) }.is_some_and(|c| *c == netns)
}

#[inline(always)]
fn is_loopback_v4(be: u32) -> bool {
    let host = u32::from_be(be);
    host >> 24 == 127 || host == 0
}

#[cgroup_sock_addr(connect4)]
pub fn zt_connect4(ctx: SockAddrContext) -> i32 {
    let Some(netns) = candidate(&ctx) else {
        return ALLOW;
    };
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: context fields, full-width reads.
    let (ip, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let host_port = u16::from_be(port as u16);
    let pass = if is_loopback_v4(ip) {
        Some("loopback")
    } else if own_address(netns, [ip, 0, 0, 0], AF_INET) {
        Some("own-address")
    } else if excluded(netns, host_port, DIR_OUTBOUND) {
        Some("excluded-port")
    } else {
        None
    };
    if let Some(reason) = pass {
        aya_log_ebpf::debug!(
            &ctx,
            "connect4 pass reason={} netns={} dst={}:{}",
            reason,
            netns,
            v4(ip),
            host_port
        );
        return ALLOW;
    }
    let dst = OrigDst {
        addr: [ip, 0, 0, 0],
        port,
        family: AF_INET,
        v6_socket: 0,
        _pad: 0,
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ZT_SOCK_DST.insert(cookie, dst, 0).is_err() {
        // Without a record ztunnel could not route it: let it fail at the listener instead
        // of going direct (fail closed).
    }
    // SAFETY: writable context fields of connect4.
    unsafe {
        write_volatile(
            addr_of_mut!((*sa).user_ip4),
            u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        );
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(OUTBOUND_PORT.to_be()),
        );
    }
    aya_log_ebpf::debug!(
        &ctx,
        "connect4 redirect reason=captured netns={} dst={}:{} to=127.0.0.1:{}",
        netns,
        v4(ip),
        host_port,
        OUTBOUND_PORT
    );
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn zt_connect6(ctx: SockAddrContext) -> i32 {
    let Some(netns) = candidate(&ctx) else {
        return ALLOW;
    };
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: context fields, full-width reads.
    let (w, port) = unsafe {
        (
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ],
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let mapped = w[0] == 0 && w[1] == 0 && w[2] == 0xffffu32.to_be();
    let loopback6 = w[0] == 0 && w[1] == 0 && w[2] == 0 && (w[3] == 1u32.to_be() || w[3] == 0);
    let own = if mapped {
        own_address(netns, [w[3], 0, 0, 0], AF_INET)
    } else {
        own_address(netns, w, AF_INET6)
    };
    let host_port = u16::from_be(port as u16);
    let pass = if loopback6 || (mapped && is_loopback_v4(w[3])) {
        Some("loopback")
    } else if own {
        Some("own-address")
    } else if excluded(netns, host_port, DIR_OUTBOUND) {
        Some("excluded-port")
    } else {
        None
    };
    if let Some(reason) = pass {
        aya_log_ebpf::debug!(
            &ctx,
            "connect6 pass reason={} netns={} dst=[{}]:{}",
            reason,
            netns,
            v6(w),
            host_port
        );
        return ALLOW;
    }
    let dst = if mapped {
        OrigDst {
            addr: [w[3], 0, 0, 0],
            port,
            family: AF_INET,
            v6_socket: 1,
            _pad: 0,
        }
    } else {
        OrigDst {
            addr: w,
            port,
            family: AF_INET6,
            v6_socket: 1,
            _pad: 0,
        }
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ZT_SOCK_DST.insert(cookie, dst, 0);
    // A v4-mapped dial travels as IPv4: send it to the IPv4 listener (::ffff:127.0.0.1).
    let target = if mapped {
        [
            0,
            0,
            0xffffu32.to_be(),
            u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        ]
    } else {
        [0, 0, 0, 1u32.to_be()]
    };
    // SAFETY: writable context fields of connect6.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), target[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), target[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), target[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), target[3]);
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(OUTBOUND_PORT.to_be()),
        );
    }
    aya_log_ebpf::debug!(
        &ctx,
        "connect6 redirect reason=captured netns={} dst=[{}]:{} to=[{}]:{}",
        netns,
        v6(w),
        host_port,
        v6(target),
        OUTBOUND_PORT
    );
    ALLOW
}

#[sock_ops]
pub fn zt_sockops(ctx: SockOpsContext) -> u32 {
    // SAFETY: context field read at full width.
    let op = unsafe { read_volatile(addr_of!((*ctx.ops).op)) };
    if op == BPF_SOCK_OPS_STATE_CB {
        own_dial_connected(&ctx);
        return 1;
    }
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    if own_dial_connecting(&ctx) {
        return 1;
    }
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: map lookup; the value is copied out at once.
    let Some(dst) = (unsafe { ZT_SOCK_DST.get(cookie) }).copied() else {
        return 1;
    };
    // SAFETY: helper valid for sock_ops programs (5.15+); context field read at full width.
    let (netns, port) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            read_volatile(addr_of!((*ctx.ops).local_port)),
        )
    };
    let key = PortKey {
        netns,
        port,
        family: dst.family,
    };
    let _ = ZT_PORT_DST.insert(key, dst, 0);
    1
}

/// The `ZT_OWN_DIAL` key of a connecting socket (its source is the client's address).
#[inline(always)]
fn own_dial_key(ctx: &SockOpsContext) -> OwnDialKey {
    let ops = ctx.ops;
    // SAFETY: context fields read at full width. local_port is in host order; remote_port
    // holds the network-order port in its upper half on little-endian (ntohl gives it).
    unsafe {
        let family = read_volatile(addr_of!((*ops).family));
        let addr = if family == AF_INET6 {
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ]
        } else {
            [read_volatile(addr_of!((*ops).local_ip4)), 0, 0, 0]
        };
        OwnDialKey {
            addr,
            family: if family == AF_INET6 {
                AF_INET6
            } else {
                AF_INET
            },
            remote_port: read_volatile(addr_of!((*ops).local_port)) as u16,
            local_port: u32::from_be(read_volatile(addr_of!((*ops).remote_port))) as u16,
        }
    }
}

/// At TCP_CONNECT_CB (port chosen, SYN not yet sent): lists a socket marked
/// `ORIG_SRC_MARK` in `ZT_OWN_DIAL` and asks for its state changes, to unlist it.
#[inline(always)]
fn own_dial_connecting(ctx: &SockOpsContext) -> bool {
    // SAFETY: context field; a full socket at TCP_CONNECT_CB, checked for null anyway.
    let sk = unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a valid PTR_TO_SOCKET here.
    if unsafe { read_volatile(addr_of!((*sk).mark)) } != ORIG_SRC_MARK {
        return false;
    }
    let _ = ZT_OWN_DIAL.insert(own_dial_key(ctx), 1, 0);
    // SAFETY: helper valid for sock_ops programs.
    unsafe { bpf_sock_ops_cb_flags_set(ctx.ops, BPF_SOCK_OPS_STATE_CB_FLAG as i32) };
    true
}

/// On a state change of a listed socket: once it left SYN_SENT (connected or failed), its SYN
/// is no longer looked up.
#[inline(always)]
fn own_dial_connected(ctx: &SockOpsContext) {
    // SAFETY: context field; args[0] is the old state for STATE_CB.
    let old = unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_1.args[0])) };
    if old == TCP_SYN_SENT {
        let _ = ZT_OWN_DIAL.remove(own_dial_key(ctx));
    }
}

/// Shared by getpeername4/6: the original destination of a socket we redirected, if any.
#[inline(always)]
fn redirected(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if !enrolled(netns) {
        return None;
    }
    // SAFETY: helper valid for cgroup sock_addr programs; map value copied out.
    unsafe {
        ZT_SOCK_DST
            .get(bpf_get_socket_cookie(ctx.as_ptr()))
            .copied()
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn zt_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = redirected(&ctx)
        && dst.family == AF_INET
    {
        let sa = ctx.sock_addr;
        // SAFETY: writable context fields of getpeername4.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip4), dst.addr[0]);
            write_volatile(addr_of_mut!((*sa).user_port), dst.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn zt_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = redirected(&ctx) {
        let w = if dst.family == AF_INET {
            [0, 0, 0xffffu32.to_be(), dst.addr[0]]
        } else {
            dst.addr
        };
        let sa = ctx.sock_addr;
        // SAFETY: writable context fields of getpeername6.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), w[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), w[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), w[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), w[3]);
            write_volatile(addr_of_mut!((*sa).user_port), dst.port);
        }
    }
    ALLOW
}

#[sk_lookup]
pub fn zt_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: context fields, full-width reads.
    let (proto, family, port, ifindex) = unsafe {
        (
            read_volatile(addr_of!((*l).protocol)),
            read_volatile(addr_of!((*l).family)),
            read_volatile(addr_of!((*l).local_port)),
            read_volatile(addr_of!((*l).ingress_ifindex)),
        )
    };
    if proto != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let port = port as u16;
    let family = if family == AF_INET6 {
        AF_INET6
    } else {
        AF_INET
    };
    let netns = ZT_SELF_NETNS.load();
    // Loopback (ztunnel delivering to the app, the app's own localhost) is never captured, and
    // too frequent to log; only the pod's redirected connects to ztunnel's outbound listener
    // are steered to exactly that socket.
    if ifindex == LOOPBACK_IFINDEX {
        if port == OUTBOUND_PORT {
            let _ = steer(&ctx, netns, family, port);
        }
        return sk_action::SK_PASS;
    }
    // SAFETY: context fields, full-width reads.
    let (addr, remote) = unsafe {
        if family == AF_INET {
            (
                [read_volatile(addr_of!((*l).local_ip4)), 0, 0, 0],
                [read_volatile(addr_of!((*l).remote_ip4)), 0, 0, 0],
            )
        } else {
            (
                [
                    read_volatile(addr_of!((*l).local_ip6[0])),
                    read_volatile(addr_of!((*l).local_ip6[1])),
                    read_volatile(addr_of!((*l).local_ip6[2])),
                    read_volatile(addr_of!((*l).local_ip6[3])),
                ],
                [
                    read_volatile(addr_of!((*l).remote_ip6[0])),
                    read_volatile(addr_of!((*l).remote_ip6[1])),
                    read_volatile(addr_of!((*l).remote_ip6[2])),
                    read_volatile(addr_of!((*l).remote_ip6[3])),
                ],
            )
        }
    };
    // SAFETY: context field; remote_port is in network order, local_port in host order.
    let remote_port = u16::from_be(unsafe { read_volatile(addr_of!((*l).remote_port)) });
    let (verdict, level, outcome, reason) =
        lookup_decision(&ctx, netns, family, addr, remote, remote_port, port);
    if family == AF_INET {
        aya_log_ebpf::log!(
            &ctx,
            level,
            "sk_lookup {} reason={} netns={} src={}:{} dst={}:{}",
            outcome,
            reason,
            netns,
            v4(remote[0]),
            remote_port,
            v4(addr[0]),
            port
        );
    } else {
        aya_log_ebpf::log!(
            &ctx,
            level,
            "sk_lookup {} reason={} netns={} src=[{}]:{} dst=[{}]:{}",
            outcome,
            reason,
            netns,
            v6(remote),
            remote_port,
            v6(addr),
            port
        );
    }
    verdict
}

/// What sk_lookup does with one new inbound connection of its pod: (verdict, log level,
/// outcome, reason). Any local address counts, not only the pod IPs the mesh knows: a SYN to
/// the pod's link-local or a secondary address must meet ztunnel too.
#[inline(always)]
fn lookup_decision(
    ctx: &SkLookupContext,
    netns: u64,
    family: u32,
    addr: [u32; 4],
    remote: [u32; 4],
    remote_port: u16,
    port: u16,
) -> (u32, Level, &'static str, &'static str) {
    const PASS: u32 = sk_action::SK_PASS;
    if port == HBONE_PORT && steer(ctx, netns, family, port).is_ok() {
        return (PASS, Level::Debug, "redirect", "hbone");
    }
    // Not steered (no such listener): the ordinary lookup decides.
    if port == HBONE_PORT || port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT {
        return (PASS, Level::Debug, "pass", "mesh-port");
    }
    // Traffic from the pod to itself (ztunnel delivering to the app, or the app dialling its
    // own address) arrives with a non-lo ifindex but the pod's own source address.
    if remote == addr {
        return (PASS, Level::Debug, "pass", "self");
    }
    // ztunnel delivering to the app from the client's address: listed while it connects.
    let own = OwnDialKey {
        addr: remote,
        family,
        remote_port,
        local_port: port,
    };
    // SAFETY: a map lookup; the value is only tested for presence.
    if unsafe { ZT_OWN_DIAL.get(own) }.is_some() {
        return (PASS, Level::Debug, "pass", "ztunnel-dial");
    }
    // Unenrolling removes the pod from ZT_NETNS before detaching this program.
    if !enrolled(netns) {
        return (PASS, Level::Debug, "pass", "not-enrolled");
    }
    if excluded(netns, port, DIR_INBOUND) {
        return (PASS, Level::Debug, "pass", "excluded-port");
    }
    // A kubelet probe, SNATed by the node to the probe address (which the node refuses to
    // forward from anywhere else): straight to the app, as with Istio.
    if is_probe_source(family, remote) {
        return (PASS, Level::Debug, "pass", "kubelet-probe");
    }
    // For the log only: ztunnel's inbound listener closes connections to foreign addresses.
    let pod_ip = own_address(netns, addr, family);
    match steer(ctx, netns, family, INBOUND_PLAINTEXT_PORT) {
        Ok(()) if pod_ip => (PASS, Level::Debug, "redirect", "pod-address"),
        Ok(()) => (PASS, Level::Info, "redirect", "foreign-address"),
        // Enrolled but ztunnel's listener is gone (restarting): refuse rather than deliver
        // plaintext that bypassed policy.
        Err(_) => (sk_action::SK_DROP, Level::Warn, "drop", "no-listener"),
    }
}

/// Whether `remote` (network-order words, as the context holds it) is exactly the probe SNAT
/// address of `family`.
#[inline(always)]
fn is_probe_source(family: u32, remote: [u32; 4]) -> bool {
    let w = |i: usize| {
        u32::from_ne_bytes([
            PROBE_SNAT_V6[i],
            PROBE_SNAT_V6[i + 1],
            PROBE_SNAT_V6[i + 2],
            PROBE_SNAT_V6[i + 3],
        ])
    };
    if family == AF_INET {
        remote[0] == u32::from_ne_bytes(PROBE_SNAT_V4)
    } else {
        remote == [w(0), w(4), w(8), w(12)]
    }
}

/// Selects ztunnel's listener on `port` in this pod for the connection being looked up.
/// NO_REUSEPORT: exactly that socket, never another member of its SO_REUSEPORT group.
#[inline(always)]
fn steer(ctx: &SkLookupContext, netns: u64, family: u32, port: u16) -> Result<(), i32> {
    let key = ListenKey {
        netns,
        family,
        port: u32::from(port),
    };
    ZT_LISTEN.redirect_sk_lookup(ctx, key, u64::from(BPF_SK_LOOKUP_F_NO_REUSEPORT))
}

/// Stream verdict of the same-node fast path: redirect to the egress of the peer leg while the
/// direction's in-flight bytes stay within its limit; past it, keep the bytes on this leg for
/// good (`SK_PASS` queues them on its own psock, charged to its receive buffer) for ztunnel
/// to copy.
#[stream_verdict]
pub fn zt_splice(ctx: SkBuffContext) -> u32 {
    // SAFETY: helper valid for sk_skb programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut core::ffi::c_void) };
    // SAFETY: map lookup, value copied out.
    let Some(mut peer) = (unsafe { ZT_SPLICE_PEER.get(cookie) }).copied() else {
        // Not (or no longer) spliced: leave the bytes to ztunnel's own reads.
        return sk_action::SK_PASS;
    };
    let Some(dir) = ZT_SPLICE_DIR.get_ptr_mut(cookie) else {
        // ztunnel writes the bound before the peer, and removes the peer first.
        return sk_action::SK_PASS;
    };
    // SAFETY (all `dir` and `p` accesses): live, aligned map values for the duration of the
    // program. This leg's skbs are verdicted one at a time under its lock: plain updates do
    // not race, and ztunnel only reads them.
    if unsafe { read_volatile(addr_of!((*dir).copy)) } != 0 {
        return sk_action::SK_PASS;
    }
    let len = u64::from(ctx.len());
    let Some(p) = ZT_SPLICE_BYTES.get_ptr_mut(cookie) else {
        return sk_action::SK_PASS;
    };
    let redirected = unsafe { read_volatile(p) };
    let d = unsafe { read_volatile(dir) };
    if let Some(acked) = peer_bytes_acked(peer, d.acked_off) {
        let delivered = acked.wrapping_sub(d.peer_acked_base);
        if (redirected + len).saturating_sub(delivered) > d.limit {
            unsafe { write_volatile(addr_of_mut!((*dir).copy), 1) };
            return sk_action::SK_PASS;
        }
    }
    // No peer socket: the redirect below fails as well and the skb is dropped, as before.
    let verdict = ZT_SPLICE_TX.redirect_skb(&ctx, &mut peer, 0);
    if verdict == sk_action::SK_PASS as i64 {
        unsafe { write_volatile(p, redirected + len) };
    }
    verdict as u32
}

/// `tcp_sock.bytes_acked` of the leg `ZT_SPLICE_TX` holds under `cookie` (sk_skb programs
/// have no `bpf_tcp_sock`; the offset comes from the kernel's BTF, via ztunnel).
#[inline(always)]
fn peer_bytes_acked(cookie: u64, off: u64) -> Option<u64> {
    if off == 0 || off > 4096 {
        return None;
    }
    // SAFETY: a sockhash lookup returns a referenced socket (or null), released below on
    // every path; the field is read with probe_read_kernel, which tolerates any address.
    unsafe {
        let sk = bpf_map_lookup_elem(
            addr_of!(ZT_SPLICE_TX).cast_mut().cast(),
            addr_of!(cookie).cast(),
        );
        if sk.is_null() {
            return None;
        }
        let tp = bpf_skc_to_tcp_sock(sk);
        let v = if tp.is_null() {
            None
        } else {
            bpf_probe_read_kernel((tp as *const u8).wrapping_add(off as usize) as *const u64).ok()
        };
        bpf_sk_release(sk);
        v
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
