//! The node side of kubelet probes to captured pods: connections the node itself opens to an
//! enrolled pod's IP leave with source [`meshcore::enrollment::PROBE_SNAT_V4`] / `_V6` (an nft
//! table in the node's network namespace with a set of enrolled pod IPs), so the pod's capture
//! can let exactly those reach the app without mTLS. Owns that nft table only.
//!
//! Which packets are "the node's own": `meta skuid` is only defined for a packet with a full
//! local socket (anything forwarded has none, so the match fails for it) — nft's form of
//! Istio's `-m owner --socket-exists`. `fib saddr type local` would not do: a forwarded packet
//! spoofing the node's address as its source matches it (IPv6 has no martian-source check).
//! The table also drops forwarded packets (another pod's, another node's) whose source already
//! is a probe address and whose destination is an enrolled pod: a spoofed "probe" never
//! reaches the pod through this node. Every call acts on the calling thread's network
//! namespace (the agent runs in the node's).

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use meshcore::enrollment::{PROBE_SNAT_V4, PROBE_SNAT_V6};

/// The nft table this module owns (family `inet`).
pub const TABLE: &str = "mesh-cni-probes";

#[derive(Debug, thiserror::Error)]
pub enum ProbeSnatError {
    #[error("running nft (is nftables installed and are we root with CAP_NET_ADMIN?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused to {action}: {stderr}")]
    Nft {
        action: &'static str,
        stderr: String,
    },
    #[error(
        "{0} cannot be a pod address (loopback, unspecified, multicast, link-local or a probe address): not adding it to the probe SNAT set"
    )]
    Unusable(IpAddr),
}

/// The probe SNAT table of this network namespace.
#[derive(Debug)]
pub struct ProbeSnat {
    _private: (),
}

impl ProbeSnat {
    /// Installs the table (or takes over the one an earlier agent left: its set elements stay,
    /// so probes to pods enrolled before a restart keep working; chains are rewritten).
    pub fn new() -> Result<ProbeSnat, ProbeSnatError> {
        nft("install the probe SNAT table", &ruleset())?;
        Ok(ProbeSnat { _private: () })
    }

    /// Adds enrolled pods' addresses (already present ones are fine).
    pub fn add(&self, ips: &[IpAddr]) -> Result<(), ProbeSnatError> {
        let script = elements("add", ips)?;
        if script.is_empty() {
            return Ok(());
        }
        nft("add pod addresses to the probe SNAT set", &script)
    }

    /// Removes addresses of pods that left (absent ones are fine).
    pub fn remove(&self, ips: &[IpAddr]) -> Result<(), ProbeSnatError> {
        // `delete element` fails on an absent element: add first so it always exists, in the
        // same atomic transaction.
        let ips: Vec<IpAddr> = ips.iter().copied().filter(|ip| usable(*ip)).collect();
        let mut script = elements("add", &ips)?;
        script += &elements("delete", &ips)?;
        if script.is_empty() {
            return Ok(());
        }
        nft("remove pod addresses from the probe SNAT set", &script)
    }

    /// Removes the whole table (uninstall). Absent is fine.
    pub fn remove_all(&self) -> Result<(), ProbeSnatError> {
        remove_table()
    }
}

/// Removes the table without a [`ProbeSnat`] (cleanup of a crashed agent's table).
pub fn remove_table() -> Result<(), ProbeSnatError> {
    nft(
        "remove the probe SNAT table",
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
    )
}

fn ruleset() -> String {
    format!(
        "table inet {t}\n\
         table inet {t} {{\n\
           set pods4 {{ type ipv4_addr; }}\n\
           set pods6 {{ type ipv6_addr; }}\n\
           chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
           chain forward {{ type filter hook forward priority filter; policy accept; }}\n\
         }}\n\
         flush chain inet {t} postrouting\n\
         flush chain inet {t} forward\n\
         table inet {t} {{\n\
           chain postrouting {{\n\
             meta l4proto tcp ip daddr @pods4 meta skuid >= 0 snat ip to {v4}\n\
             meta l4proto tcp ip6 daddr @pods6 meta skuid >= 0 snat ip6 to {v6}\n\
           }}\n\
           chain forward {{\n\
             ip saddr {v4} ip daddr @pods4 drop\n\
             ip6 saddr {v6} ip6 daddr @pods6 drop\n\
           }}\n\
         }}\n",
        t = TABLE,
        v4 = PROBE_SNAT_V4,
        v6 = PROBE_SNAT_V6,
    )
}

/// Addresses the set must never hold: SNATing the node's connections to them would break the
/// node (loopback), or they are not pod addresses at all.
fn usable(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local()
                || v6 == PROBE_SNAT_V6)
        }
    }
}

/// `add`/`delete element` lines for `ips`, by family; refuses unusable addresses.
fn elements(verb: &str, ips: &[IpAddr]) -> Result<String, ProbeSnatError> {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for ip in ips {
        if !usable(*ip) {
            return Err(ProbeSnatError::Unusable(*ip));
        }
        match ip.to_canonical() {
            IpAddr::V4(a) => v4.push(a.to_string()),
            IpAddr::V6(a) => v6.push(a.to_string()),
        }
    }
    let mut script = String::new();
    for (set, list) in [("pods4", v4), ("pods6", v6)] {
        if !list.is_empty() {
            script += &format!(
                "{verb} element inet {TABLE} {set} {{ {} }}\n",
                list.join(", ")
            );
        }
    }
    Ok(script)
}

/// Runs `nft -f -` with `script` (one atomic transaction) in the calling thread's netns.
fn nft(action: &'static str, script: &str) -> Result<(), ProbeSnatError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ProbeSnatError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(ProbeSnatError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(ProbeSnatError::Spawn)?;
    if !out.status.success() {
        return Err(ProbeSnatError::Nft {
            action,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_split_by_family_and_canonicalize_mapped() {
        let ips: Vec<IpAddr> = ["10.1.0.2", "fd00::2", "::ffff:10.1.0.3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            elements("add", &ips).unwrap(),
            format!(
                "add element inet {TABLE} pods4 {{ 10.1.0.2, 10.1.0.3 }}\n\
                 add element inet {TABLE} pods6 {{ fd00::2 }}\n"
            )
        );
    }

    #[test]
    fn addresses_that_are_not_pods_are_refused() {
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.7.127",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "fd16:9254:7127:1337:ffff:ffff:ffff:ffff",
            "::ffff:127.0.0.1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(
                matches!(elements("add", &[ip]), Err(ProbeSnatError::Unusable(_))),
                "{bad} accepted"
            );
        }
    }
}
