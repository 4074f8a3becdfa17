//! Source-address preservation: an enrolled pod's app sees its clients' IP addresses, as it
//! would without the mesh (and as with Istio), not its own pod IP.
//!
//! ztunnel dials the app from inside the pod with a transparent socket bound to the client's
//! address ([`Netns::transparent_socket`]) and marked [`ORIG_SRC_MARK`]. Its SYN crosses `lo`, so
//! with `net.ipv4.tcp_fwmark_accept=1` (one of the pod sysctls enrollment sets; it covers IPv6
//! too) the app's accepted socket inherits the mark, and a policy route sends marked packets
//! to `lo`: the app's replies to the client's address come back to ztunnel instead of leaving
//! the pod. Marks are cleared when a packet crosses into another namespace, so nothing from
//! outside the pod can match the rule. With eBPF capture the dial's SYN looks like that
//! client's inbound traffic: sock_ops lists the marked socket's tuple while it connects
//! (`ZT_OWN_DIAL`) and sk_lookup lets exactly that through to the app. Owns the per-pod
//! routing; which connections use it is the inbound path's business.

use std::net::{IpAddr, SocketAddr};

use crate::netns::{CommandError, Netns};

/// The mark of ztunnel's transparent sockets to an app, and so of the app's replies.
pub use ztunnel_ebpf_common::ORIG_SRC_MARK;
/// The routing table (and the rule's priority) holding the "everything is local" route.
const TABLE: u32 = 1338;

/// Installs the rule and route in the pod, for the families the pod has addresses in. An
/// earlier ztunnel's are kept as they are: a gap would send the replies of connections in
/// flight out of the pod (a handover re-enrolls pods while the old ztunnel still serves).
pub fn install(ns: &Netns, ips: &[IpAddr]) -> Result<(), CommandError> {
    for (flag, any) in families(ips) {
        let present = ns.command(
            "ip",
            &[flag, "rule", "show", "pref", &TABLE.to_string()],
            "",
        )?;
        let mut script = format!("route replace local {any} dev lo table {TABLE}\n");
        if !present.contains(&format!("lookup {TABLE}")) {
            script += &format!("rule add pref {TABLE} fwmark {ORIG_SRC_MARK:#x} lookup {TABLE}\n");
        }
        ns.command("ip", &[flag, "-batch", "-"], &script)?;
    }
    Ok(())
}

/// Removes the rule and route; whatever is already gone is fine.
pub fn remove(ns: &Netns) {
    let script = format!("rule del pref {TABLE}\nroute flush table {TABLE}\n");
    for flag in ["-4", "-6"] {
        let _ = ns.command("ip", &[flag, "-force", "-batch", "-"], &script);
    }
}

/// The source address to dial an app at `target` from, for a client at `client`: the
/// client's own, when it can be (same family, not loopback or unspecified).
pub fn source_for(client: IpAddr, target: SocketAddr) -> Option<IpAddr> {
    let client = client.to_canonical();
    let usable =
        client.is_ipv4() == target.is_ipv4() && !client.is_loopback() && !client.is_unspecified();
    usable.then_some(client)
}

fn families(ips: &[IpAddr]) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        out.push(("-4", "0.0.0.0/0"));
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        out.push(("-6", "::/0"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_is_the_clients_address_when_it_can_be() {
        let v4: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let v6: SocketAddr = "[fd00::2]:8080".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source_for(ip("10.0.0.9"), v4), Some(ip("10.0.0.9")));
        assert_eq!(source_for(ip("::ffff:10.0.0.9"), v4), Some(ip("10.0.0.9")));
        assert_eq!(source_for(ip("fd00::9"), v6), Some(ip("fd00::9")));
        assert_eq!(source_for(ip("fd00::9"), v4), None);
        assert_eq!(source_for(ip("10.0.0.9"), v6), None);
        assert_eq!(source_for(ip("127.0.0.1"), v4), None);
        assert_eq!(source_for(ip("::1"), v6), None);
    }
}
