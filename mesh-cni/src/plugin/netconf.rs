//! What the runtime hands the plugin: the network configuration on stdin (our conflist entry
//! plus `prevResult`), and `CNI_ARGS`. Owns parsing both, bounded and strict about what it
//! uses, tolerant of what it does not (unknown netconf fields, unknown CNI_ARGS keys).
//! `prevResult` is kept as the exact bytes the runtime sent, so passing it on changes nothing.

use std::net::IpAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::event::{DEFAULT_PLUGIN_SOCKET, PLUGIN_TIMEOUT};

/// The most the plugin reads from stdin (a netconf with a prevResult is a few KiB).
pub const MAX_NETCONF: usize = 1 << 20;

/// The spec versions whose netconf and results this plugin reads: all carry `ips[].address`
/// in prevResult, which is all it reads; 1.1.0 adds GC and STATUS (no-ops here).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Bounds on the netconf's `agent_timeout_ms`.
const MIN_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_TIMEOUT: Duration = Duration::from_secs(120);

/// Our entry of the conflist, as the plugin uses it.
#[derive(Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub agent_socket: PathBuf,
    pub exclude_namespaces: Vec<String>,
    pub agent_timeout: Duration,
    /// The exact bytes of `prevResult`, if there was one.
    pub prev_result: Option<Vec<u8>>,
    /// `prevResult.ips[].address`, without their prefix lengths.
    pub ips: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    agent_socket: Option<String>,
    #[serde(default)]
    exclude_namespaces: Vec<String>,
    agent_timeout_ms: Option<u64>,
    #[serde(rename = "prevResult")]
    prev_result: Option<PrevResult>,
}

#[derive(Deserialize)]
struct PrevResult {
    #[serde(default)]
    ips: Vec<IpConfig>,
}

#[derive(Deserialize)]
struct IpConfig {
    address: String,
}

/// Why the netconf is unusable; each variant maps to a spec error code.
#[derive(Debug, thiserror::Error)]
pub enum NetConfError {
    #[error("the network configuration on stdin is not valid JSON for mesh-cni: {0}")]
    Decode(String),
    #[error(
        "cniVersion {0:?} is not supported by mesh-cni (supported: {versions})",
        versions = SUPPORTED_VERSIONS.join(", ")
    )]
    Version(String),
    #[error("invalid network configuration: {0}")]
    Invalid(String),
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<NetConf, NetConfError> {
        let wire: Wire =
            serde_json::from_slice(bytes).map_err(|e| NetConfError::Decode(e.to_string()))?;
        if !SUPPORTED_VERSIONS.contains(&wire.cni_version.as_str()) {
            return Err(NetConfError::Version(wire.cni_version));
        }
        let agent_timeout = match wire.agent_timeout_ms {
            None => PLUGIN_TIMEOUT,
            Some(ms) => {
                let t = Duration::from_millis(ms);
                if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&t) {
                    return Err(NetConfError::Invalid(format!(
                        "agent_timeout_ms {ms} is outside {}..={}",
                        MIN_TIMEOUT.as_millis(),
                        MAX_TIMEOUT.as_millis()
                    )));
                }
                t
            }
        };
        let agent_socket = match wire.agent_socket {
            Some(s) if s.is_empty() => {
                return Err(NetConfError::Invalid("agent_socket is empty".into()));
            }
            Some(s) => PathBuf::from(s),
            None => PathBuf::from(DEFAULT_PLUGIN_SOCKET),
        };
        let mut ips = Vec::new();
        let prev_result = match wire.prev_result {
            None => None,
            Some(prev) => {
                for (i, ip) in prev.ips.iter().enumerate() {
                    ips.push(parse_cidr_address(&ip.address).ok_or_else(|| {
                        NetConfError::Invalid(format!(
                            "prevResult.ips[{i}].address {:?} is not an address/prefix",
                            ip.address
                        ))
                    })?);
                }
                let span = top_level_member(bytes, "prevResult").ok_or_else(|| {
                    NetConfError::Decode("prevResult could not be located".into())
                })?;
                Some(bytes[span].to_vec())
            }
        };
        Ok(NetConf {
            cni_version: wire.cni_version,
            agent_socket,
            exclude_namespaces: wire.exclude_namespaces,
            agent_timeout,
            prev_result,
            ips,
        })
    }
}

/// "10.1.2.3/24" → 10.1.2.3 (the prefix must be there and fit the address family).
fn parse_cidr_address(s: &str) -> Option<IpAddr> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(addr)
}

/// The Kubernetes facts in `CNI_ARGS` (`K=V;K=V`); other keys (IgnoreUnknown,
/// K8S_POD_INFRA_CONTAINER_ID, ...) are ignored. Empty values count as absent.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct K8sArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

pub fn parse_cni_args(args: &str) -> Result<K8sArgs, String> {
    let mut out = K8sArgs::default();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("CNI_ARGS: {pair:?} is not KEY=VALUE"));
        };
        let value = (!value.is_empty()).then(|| value.to_string());
        match key {
            "K8S_POD_NAMESPACE" => out.namespace = value,
            "K8S_POD_NAME" => out.name = value,
            "K8S_POD_UID" => out.uid = value,
            _ => {}
        }
    }
    Ok(out)
}

/// The byte range of the value of `key` in the top-level object of `json`, which serde has
/// already accepted as valid JSON (so this only needs to find boundaries, not validate).
fn top_level_member(json: &[u8], key: &str) -> Option<Range<usize>> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(json, i + 1);
    let mut found = None;
    while json.get(i) == Some(&b'"') {
        let key_end = end_of_string(json, i)?;
        let this: String = serde_json::from_slice(&json[i..key_end]).ok()?;
        i = skip_ws(json, key_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(json, i + 1);
        let end = end_of_value(json, start)?;
        if this == key {
            // serde rejects a duplicated field, so there is one; the last would be the one.
            found = Some(start..end);
        }
        i = skip_ws(json, end);
        match json.get(i) {
            Some(b',') => i = skip_ws(json, i + 1),
            _ => break,
        }
    }
    found
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// `b[i]` is an opening quote; returns the index after the closing one.
fn end_of_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        match b.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

fn end_of_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => end_of_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = end_of_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while !matches!(
                b.get(j),
                None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            ) {
                j += 1;
            }
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prev_result_is_found_exactly_whatever_the_layout() {
        let prev = "{ \"cniVersion\":\"1.0.0\",\n  \"ips\" : [ {\"address\":\"10.0.0.5/24\", \"gateway\":\"10.0.0.1\"}],\"x\":\"}]\\\"{\" , \"n\": 1.50e1 }";
        let conf = format!(
            "{{\"name\":\"k\",\"prevResult\"  :  {prev} ,\"cniVersion\":\"1.0.0\",\"type\":\"mesh-cni\",\"after\":[1,{{\"prevResult\":2}}]}}"
        );
        let nc = NetConf::parse(conf.as_bytes()).expect("parse");
        assert_eq!(nc.prev_result.as_deref(), Some(prev.as_bytes()));
        assert_eq!(nc.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn addresses_need_a_prefix_that_fits() {
        assert_eq!(
            parse_cidr_address("fd00::5/64"),
            Some("fd00::5".parse().unwrap())
        );
        assert_eq!(parse_cidr_address("10.0.0.5"), None);
        assert_eq!(parse_cidr_address("10.0.0.5/33"), None);
        assert_eq!(parse_cidr_address("pod/24"), None);
    }

    #[test]
    fn cni_args_keep_the_k8s_keys_and_ignore_the_rest() {
        let a = parse_cni_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
        )
        .expect("parse");
        assert_eq!(
            a,
            K8sArgs {
                namespace: Some("shop".into()),
                name: Some("web-0".into()),
                uid: Some("u-1".into())
            }
        );
        assert_eq!(parse_cni_args("").expect("empty"), K8sArgs::default());
        assert!(parse_cni_args("K8S_POD_NAME").is_err());
    }

    #[test]
    fn defaults_and_bounds() {
        let nc = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"mesh-cni"}"#)
            .expect("parse");
        assert_eq!(nc.agent_timeout, PLUGIN_TIMEOUT);
        assert_eq!(nc.agent_socket, PathBuf::from(DEFAULT_PLUGIN_SOCKET));
        assert!(nc.prev_result.is_none());
        assert!(matches!(
            NetConf::parse(br#"{"cniVersion":"0.2.0"}"#),
            Err(NetConfError::Version(_))
        ));
        assert!(matches!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","agent_timeout_ms":0}"#),
            Err(NetConfError::Invalid(_))
        ));
    }
}
