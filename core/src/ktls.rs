//! Kernel TLS (kTLS): can this kernel take over an HBONE connection's record encryption once
//! rustls has finished the handshake?
//!
//! Owns: [`probe`], which asks the kernel on throwaway loopback sockets of its own, and the
//! [`KernelTls`] answer that ztunnel logs at start and shows in its config dump. HBONE's records
//! are encrypted in user space by rustls today whatever the answer; the probe says what a
//! kernel offload could use here, so an operator can see it without reading kernel configs.
//!
//! Must not touch: live connections. Everything it sets is on sockets it opened and closes.
//!
//! What "available" takes, for HBONE's two suites (TLS 1.3 AES-128-GCM and AES-256-GCM):
//! the `tls` upper-layer protocol on TCP (`CONFIG_TLS`; the module loads on first use), a
//! transmit and a receive key accepted for the suite, and, separately reported, whether the
//! kernel takes a second key on the same socket: TLS 1.3 peers rotate keys (KeyUpdate) before
//! AES-GCM's confidentiality limit, and a kernel that cannot follow a rotation would have to
//! close the connection instead.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};

use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};

/// What the kernel offers for HBONE's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelTls {
    /// No kTLS for HBONE here; `reason` says what was missing, in words an operator can act on.
    Unavailable { reason: String },
    /// Both suites can be handed to the kernel, in both directions.
    Available {
        /// Whether a socket's keys can be replaced (TLS 1.3 KeyUpdate followed in the kernel).
        rekey: bool,
    },
}

impl std::fmt::Display for KernelTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelTls::Unavailable { reason } => write!(f, "unavailable: {reason}"),
            KernelTls::Available { rekey: true } => {
                write!(f, "available (AES-128-GCM, AES-256-GCM; key updates)")
            }
            KernelTls::Available { rekey: false } => write!(
                f,
                "available (AES-128-GCM, AES-256-GCM; no key updates: this kernel cannot follow a TLS 1.3 KeyUpdate)"
            ),
        }
    }
}

/// The two TLS 1.3 suites HBONE negotiates ([`crate::tls`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Suite {
    Aes128Gcm,
    Aes256Gcm,
}

impl Suite {
    const ALL: [Suite; 2] = [Suite::Aes128Gcm, Suite::Aes256Gcm];

    fn name(self) -> &'static str {
        match self {
            Suite::Aes128Gcm => "AES-128-GCM",
            Suite::Aes256Gcm => "AES-256-GCM",
        }
    }

    fn key_len(self) -> usize {
        match self {
            Suite::Aes128Gcm => 16,
            Suite::Aes256Gcm => 32,
        }
    }
}

/// One direction's TLS 1.3 key as the kernel takes it (`TLS_TX` / `TLS_RX`): the suite's `key`,
/// TLS 1.3's 12-byte `iv` (the kernel wants 4 bytes of salt, then 8 of IV) and the sequence
/// number of the next record. An error names the length that was wrong.
pub(crate) fn crypto_info(
    suite: Suite,
    key: &[u8],
    iv: &[u8],
    seq: u64,
) -> Result<sockopt::TlsCryptoInfo, String> {
    const TLS_1_3_VERSION: u16 = 0x0304;
    let wrong = |what: &str, len: usize| format!("{} {what} of {len} bytes", suite.name());
    if iv.len() != 12 {
        return Err(wrong("IV", iv.len()));
    }
    let (salt, iv) = iv.split_at(4);
    let salt: [u8; 4] = salt.try_into().map_err(|_| wrong("salt", salt.len()))?;
    let iv: [u8; 8] = iv.try_into().map_err(|_| wrong("IV", iv.len()))?;
    let rec_seq = seq.to_be_bytes();
    Ok(match suite {
        Suite::Aes128Gcm => {
            sockopt::TlsCryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: libc::tls_crypto_info {
                    version: TLS_1_3_VERSION,
                    cipher_type: libc::TLS_CIPHER_AES_GCM_128,
                },
                iv,
                key: key.try_into().map_err(|_| wrong("key", key.len()))?,
                salt,
                rec_seq,
            })
        }
        Suite::Aes256Gcm => {
            sockopt::TlsCryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: libc::tls_crypto_info {
                    version: TLS_1_3_VERSION,
                    cipher_type: libc::TLS_CIPHER_AES_GCM_256,
                },
                iv,
                key: key.try_into().map_err(|_| wrong("key", key.len()))?,
                salt,
                rec_seq,
            })
        }
    })
}

/// Asks the kernel, on loopback sockets of its own, what it offers HBONE (see the module docs).
///
/// Never fails: anything that stops the probe is the reason kTLS is unavailable. Takes a few
/// syscalls per suite; call it once at start.
pub fn probe() -> KernelTls {
    let mut rekey = true;
    for suite in Suite::ALL {
        match probe_suite(suite) {
            Ok(suite_rekeys) => rekey &= suite_rekeys,
            Err(reason) => return KernelTls::Unavailable { reason },
        }
    }
    KernelTls::Available { rekey }
}

/// One suite on a fresh connected pair: the ULP, a receive key on one end, a transmit key on
/// the other, then a second transmit key. Ok(whether the second key was taken).
fn probe_suite(suite: Suite) -> Result<bool, String> {
    let (client, server) = loopback_pair()
        .map_err(|e| format!("could not open loopback sockets to ask the kernel: {e}"))?;
    for end in [&client, &server] {
        setsockopt(end, sockopt::TcpUlp::default(), b"tls").map_err(|e| match e {
            Errno::ENOENT => "the kernel has no TLS upper-layer protocol (built without \
                              CONFIG_TLS, or its `tls` module cannot be loaded)"
                .to_string(),
            e => format!("TCP_ULP \"tls\" refused: {}", e.desc()),
        })?;
    }
    let key = |what: &str, e: Errno| format!("{} {what} key refused: {}", suite.name(), e.desc());
    // A well-formed key, all zero: the probe's sockets never carry data.
    let zero = crypto_info(suite, &[0; 32][..suite.key_len()], &[0; 12], 0)?;
    setsockopt(&client, sockopt::TcpTlsTx, &zero).map_err(|e| key("transmit", e))?;
    setsockopt(&server, sockopt::TcpTlsRx, &zero).map_err(|e| key("receive", e))?;
    // Kernels without TLS 1.3 rekey answer a second key with EBUSY.
    Ok(setsockopt(&client, sockopt::TcpTlsTx, &zero).is_ok())
}

/// A connected TCP pair on 127.0.0.1 (TCP_ULP needs an established socket).
fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    // Both ends must be the same connection: a stray connector on the port would not be ours.
    if server.peer_addr()? != client.local_addr()? {
        return Err(io::Error::other(
            "a foreign connection reached the probe's listener",
        ));
    }
    Ok((client, server))
}

/// Sends one record of `content_type` (an alert or a handshake message, not application data)
/// through a socket whose sending key the kernel holds: `sendmsg` with the record type as a
/// `TLS_SET_RECORD_TYPE` control message. Non-blocking; `WouldBlock` when the socket is full.
///
/// The one piece of unsafe code for kTLS: nix has no safe wrapper for that control message.
pub(crate) fn send_record(
    fd: std::os::fd::RawFd,
    content_type: u8,
    payload: &[u8],
) -> io::Result<usize> {
    const TLS_SET_RECORD_TYPE: libc::c_int = 1;
    // cmsghdr-aligned room for one control message carrying one byte.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: `msg` points at `iov` and `control`, which outlive the `sendmsg` call; `control`
    // is 32 bytes, aligned for `cmsghdr`, and CMSG_SPACE(1) (24 on 64-bit Linux) fits in it,
    // so CMSG_FIRSTHDR is non-null and its data byte lies inside `control`. The kernel only
    // reads `payload` through `iov` (sendmsg does not write to it).
    unsafe {
        let space = libc::CMSG_SPACE(1) as usize;
        if space > std::mem::size_of_val(&control) {
            return Err(io::Error::other("control message buffer too small"));
        }
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the record type"));
        }
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = content_type;
        let sent = libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_says_what_to_fix_and_available_says_what_it_can() {
        let none = KernelTls::Unavailable {
            reason: "the kernel has no TLS upper-layer protocol".into(),
        };
        assert_eq!(
            none.to_string(),
            "unavailable: the kernel has no TLS upper-layer protocol"
        );
        let some = KernelTls::Available { rekey: false };
        assert!(some.to_string().contains("no key updates"), "{some}");
    }

    #[test]
    fn crypto_info_takes_salt_then_iv_and_checks_lengths() {
        let iv: Vec<u8> = (0..12).collect();
        let Ok(sockopt::TlsCryptoInfo::Aes256Gcm(info)) =
            crypto_info(Suite::Aes256Gcm, &[7; 32], &iv, 0x0102)
        else {
            panic!("an AES-256-GCM key");
        };
        assert_eq!(info.salt, [0, 1, 2, 3]);
        assert_eq!(info.iv, [4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(info.rec_seq, [0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(info.key, [7; 32]);
        let short_key = crypto_info(Suite::Aes128Gcm, &[0; 32], &iv, 0).err();
        assert_eq!(short_key.as_deref(), Some("AES-128-GCM key of 32 bytes"));
        let short_iv = crypto_info(Suite::Aes128Gcm, &[0; 16], &iv[..11], 0).err();
        assert_eq!(short_iv.as_deref(), Some("AES-128-GCM IV of 11 bytes"));
    }
}
