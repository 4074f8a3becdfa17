//! Types shared by ztunnel's eBPF programs (`ztunnel-ebpf`) and its loader (`ztunnel::ebpf`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, so both sides agree on the
//! layout byte for byte. Addresses and ports are kept exactly as the kernel's context structs
//! hold them (network byte order), so the programs copy without converting. Owns no logic.
#![no_std]

/// Socket mark of ztunnel's own sockets (mirrors `meshcore::MESH_SOCKET_MARK`): never captured.
pub const MESH_SOCKET_MARK: u32 = 0x539;
/// In-pod listener for captured outbound connections (mirrors `meshcore::OUTBOUND_PORT`).
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod listener for captured inbound plaintext (mirrors `meshcore::INBOUND_PLAINTEXT_PORT`).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE (mirrors `meshcore::HBONE_PORT`): arrives at ztunnel directly, never redirected.
pub const HBONE_PORT: u16 = 15008;

/// Source address kubelet probes arrive from once the node's probe SNAT rewrote them
/// (mirrors `meshcore::enrollment::PROBE_SNAT_V4` / `_V6`): inbound TCP from exactly these
/// reaches the app without capture.
pub const PROBE_SNAT_V4: [u8; 4] = [169, 254, 7, 127];
pub const PROBE_SNAT_V6: [u8; 16] = [
    0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
];

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// Map names (also their pin file names under ztunnel's bpffs directory).
pub const MAP_NETNS: &str = "ZT_NETNS";
pub const MAP_EXCLUDED: &str = "ZT_EXCL";
pub const MAP_SOCK_DST: &str = "ZT_SOCK_DST";
pub const MAP_PORT_DST: &str = "ZT_PORT_DST";
pub const MAP_LISTEN: &str = "ZT_LISTEN";
pub const MAP_POD_IP: &str = "ZT_POD_IP";
pub const MAP_OWN_DIAL: &str = "ZT_OWN_DIAL";

/// Socket mark of ztunnel's transparent sockets dialling an app from its client's address
/// (source-address preservation); the app's replies carry it too.
pub const ORIG_SRC_MARK: u32 = 0x53a;
/// Fast path (not pinned): legs whose arriving bytes the verdict program redirects, the legs it
/// may redirect to, each leg's peer (socket cookies) and bytes redirected per receiving leg.
pub const MAP_SPLICE_RX: &str = "ZT_SPLICE_RX";
pub const MAP_SPLICE_TX: &str = "ZT_SPLICE_TX";
pub const MAP_SPLICE_PEER: &str = "ZT_SPLICE_PEER";
pub const MAP_SPLICE_BYTES: &str = "ZT_SPLICE_BYTES";
/// Fast path backpressure: per receiving leg, the bound on what it may have in flight to its
/// peer ([`SpliceDir`]).
pub const MAP_SPLICE_DIR: &str = "ZT_SPLICE_DIR";

/// `ZT_NETNS` value: what ztunnel wants done in one enrolled network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsConf {
    /// 1 while enrolled (reserved for per-pod switches).
    pub flags: u32,
    pub _pad: u32,
}

/// Direction of a port exclusion.
pub const DIR_OUTBOUND: u8 = 1;
pub const DIR_INBOUND: u8 = 2;

/// `ZT_EXCL` key: a destination port (host byte order) not captured in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExclKey {
    pub netns: u64,
    pub port: u16,
    pub dir: u8,
    pub _pad: [u8; 5],
}

/// Where a captured outbound connection was going, as the app dialled it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 in `addr[0]` (network order), or the 16 IPv6 bytes; v4-mapped dials are stored as
    /// IPv4 because that is the family the redirected connection uses.
    pub addr: [u32; 4],
    /// Port in network byte order, in the low 16 bits (as `bpf_sock_addr.user_port`).
    pub port: u32,
    /// `AF_INET` or `AF_INET6`: the family of the redirected connection (the listener's).
    pub family: u32,
    /// 1 if the app dialled on an IPv6 socket (its getpeername must answer in IPv6 form).
    pub v6_socket: u32,
    pub _pad: u32,
}

/// `ZT_PORT_DST` key: a captured connection as ztunnel's outbound listener sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortKey {
    pub netns: u64,
    /// The client's ephemeral port, host byte order.
    pub port: u32,
    /// `AF_INET` or `AF_INET6` (the listener's family).
    pub family: u32,
}

/// `ZT_LISTEN` key: one of ztunnel's listeners in a pod (netns, family, and its port: 15006,
/// 15008 or 15001). sk_lookup hands new connections to exactly these sockets, never to another
/// member of their SO_REUSEPORT group.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenKey {
    pub netns: u64,
    pub family: u32,
    /// The listener's port, host byte order.
    pub port: u32,
}

/// `ZT_POD_IP` key: an enrolled pod's address (value: its netns cookie). connect4/6 leave a
/// pod's dials to its own pod IPs alone; sk_lookup (which knows its pod from a load-time
/// global, not from this map) uses it only to tell the pod IPs from the pod's other local
/// addresses in its decision log.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpKey {
    /// IPv4 in `addr[0]` (network order) or the 16 IPv6 bytes.
    pub addr: [u32; 4],
    pub family: u32,
}

/// `ZT_OWN_DIAL` key: a connection ztunnel is opening to an app of its pod from a client's
/// address (a socket marked [`ORIG_SRC_MARK`]). Its SYN looks like inbound traffic from that
/// client, so sock_ops lists its tuple while it connects and sk_lookup lets exactly that
/// through to the app.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnDialKey {
    /// The client address ztunnel dials from, as in [`IpKey`].
    pub addr: [u32; 4],
    pub family: u32,
    /// ztunnel's source port (host order).
    pub remote_port: u16,
    /// The app's port (host order).
    pub local_port: u16,
}

/// `ZT_SPLICE_DIR` value, keyed by the receiving leg's socket cookie: one direction of a
/// splice. In flight = bytes redirected (`ZT_SPLICE_BYTES`) minus what the peer leg's TCP has
/// had acknowledged since the splice (its `tcp_sock.bytes_acked` minus `peer_acked_base`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceDir {
    /// The peer leg's `tcp_sock.bytes_acked` when the splice began.
    pub peer_acked_base: u64,
    /// Byte offset of `bytes_acked` in this kernel's `struct tcp_sock` (from its BTF).
    pub acked_off: u64,
    /// Most bytes in flight before the direction stops redirecting.
    pub limit: u64,
    /// Set (never cleared) by the program when in flight would pass `limit`: from then on this
    /// leg's bytes stay on it (its own receive buffer, so TCP holds the sender back) and
    /// ztunnel copies them.
    pub copy: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): plain-old-data, repr(C), every bit pattern valid, explicit padding.
    unsafe impl aya::Pod for super::NetnsConf {}
    unsafe impl aya::Pod for super::ExclKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::ListenKey {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::OwnDialKey {}
    unsafe impl aya::Pod for super::SpliceDir {}
}
