//! Node credentials: how a ztunnel proves to meshd which node it serves, until when.
//!
//! Local mode has no Kubernetes service-account tokens, so meshd keeps a secret in its state
//! directory and mints tokens per node: `node:<name>:<expiry, unix seconds>:<hex MAC>`, the MAC
//! being HMAC-SHA256 under the secret of everything before it (`node:<name>:<expiry>`), so
//! neither the node nor the expiry can be changed. `meshd node-token --node <name> [--ttl 30d]`
//! prints one; the node's ztunnel reads it from a file and sends it as gRPC metadata
//! `authorization: Bearer <token>`. A token proves the node name until it expires; what a node
//! may ask for is meshd's decision.
//!
//! Tokens of the first format (`node:<name>:<mac>`, no expiry) are refused with a message
//! saying to mint a new one: a token that never expires cannot be revoked short of changing the
//! secret for every node. This module owns the token format, not its storage.
//!
//! Waypoints authenticate as their pod's service account instead, with the same secret and MAC
//! scheme: `sa:<namespace>:<service account>:<expiry>:<hex MAC>` (`meshd workload-token`), which
//! [`NodeAuthority::verify_principal`] tells apart from a node token ([`Principal`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

/// The gRPC metadata key carrying the token.
pub const AUTH_METADATA: &str = "authorization";

/// Lifetime of a token minted without an explicit one.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeAuthError {
    #[error(
        "no node credentials: send `authorization: Bearer <node token>` (see `meshd node-token`)"
    )]
    Missing,
    #[error("malformed node token: expected `Bearer node:<node>:<expiry>:<hex mac>`")]
    Malformed,
    #[error(
        "node token for {0:?} has the old format without an expiry, which is no longer accepted: mint a new one with `meshd node-token --node {0}`"
    )]
    Legacy(String),
    #[error("node token for {0:?} does not verify (issued by another meshd state dir?)")]
    BadMac(String),
    #[error(
        "node token for {node:?} expired at {expired_at} (unix time): mint a new one with `meshd node-token --node {node}`"
    )]
    Expired { node: String, expired_at: u64 },
    #[error(
        "malformed service-account token: expected `Bearer sa:<namespace>:<service account>:<expiry>:<hex mac>`"
    )]
    SaMalformed,
    #[error(
        "service-account token for {namespace}/{service_account} does not verify (issued by another meshd state dir?)"
    )]
    SaBadMac {
        namespace: String,
        service_account: String,
    },
    #[error(
        "service-account token for {namespace}/{service_account} expired at {expired_at} (unix time): mint a new one with `meshd workload-token --namespace {namespace} --service-account {service_account}`"
    )]
    SaExpired {
        namespace: String,
        service_account: String,
        expired_at: u64,
    },
}

/// Who a valid token proves the caller is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A node's ztunnel (`node:` token).
    Node(String),
    /// A workload running as (namespace, service account): a waypoint (`sa:` token).
    ServiceAccount(String, String),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Node(n) => write!(f, "node {n}"),
            Principal::ServiceAccount(ns, sa) => write!(f, "service account {ns}/{sa}"),
        }
    }
}

/// Issues and verifies node tokens with one secret.
pub struct NodeAuthority {
    key: hmac::Key,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl NodeAuthority {
    pub fn new(secret: &[u8]) -> Self {
        NodeAuthority {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// A token for `node`, valid for `ttl` from now.
    pub fn token(&self, node: &str, ttl: Duration) -> String {
        self.token_expiring_at(node, unix_now().saturating_add(ttl.as_secs()))
    }

    /// A token for `node` that expires at `expires_at` (unix seconds).
    pub fn token_expiring_at(&self, node: &str, expires_at: u64) -> String {
        let signed = format!("node:{node}:{expires_at}");
        let tag = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}:{}", hex::encode(tag.as_ref()))
    }

    /// A service-account token for `namespace`/`service_account`, valid for `ttl` from now.
    pub fn sa_token(&self, namespace: &str, service_account: &str, ttl: Duration) -> String {
        let at = unix_now().saturating_add(ttl.as_secs());
        self.sa_token_expiring_at(namespace, service_account, at)
    }

    /// A service-account token that expires at `expires_at` (unix seconds).
    pub fn sa_token_expiring_at(
        &self,
        namespace: &str,
        service_account: &str,
        expires_at: u64,
    ) -> String {
        let signed = format!("sa:{namespace}:{service_account}:{expires_at}");
        let tag = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}:{}", hex::encode(tag.as_ref()))
    }

    /// Checks an `authorization` metadata value holding a node or a service-account token and
    /// returns who it proves. Node tokens are checked exactly as [`NodeAuthority::verify`] does.
    pub fn verify_principal(&self, header: Option<&str>) -> Result<Principal, NodeAuthError> {
        self.verify_principal_at(header, unix_now())
    }

    /// [`NodeAuthority::verify_principal`] as of `now` (unix seconds).
    pub fn verify_principal_at(
        &self,
        header: Option<&str>,
        now: u64,
    ) -> Result<Principal, NodeAuthError> {
        match header.and_then(|h| h.strip_prefix("Bearer sa:")) {
            Some(rest) => self.verify_sa(rest, now),
            None => self.verify_at(header, now).map(Principal::Node),
        }
    }

    /// `rest` is what follows `sa:`: `<ns>:<sa>:<expiry>:<mac>`.
    fn verify_sa(&self, rest: &str, now: u64) -> Result<Principal, NodeAuthError> {
        let parts: Vec<&str> = rest.split(':').collect();
        let [namespace, service_account, expiry, mac] = parts.as_slice() else {
            return Err(NodeAuthError::SaMalformed);
        };
        if namespace.is_empty() || service_account.is_empty() {
            return Err(NodeAuthError::SaMalformed);
        }
        let expires_at: u64 = expiry.parse().map_err(|_| NodeAuthError::SaMalformed)?;
        let mac = hex::decode(mac).map_err(|_| NodeAuthError::SaMalformed)?;
        let signed = format!("sa:{namespace}:{service_account}:{expiry}");
        // The MAC first (constant time), as for node tokens.
        hmac::verify(&self.key, signed.as_bytes(), &mac).map_err(|_| NodeAuthError::SaBadMac {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })?;
        if now >= expires_at {
            return Err(NodeAuthError::SaExpired {
                namespace: namespace.to_string(),
                service_account: service_account.to_string(),
                expired_at: expires_at,
            });
        }
        Ok(Principal::ServiceAccount(
            namespace.to_string(),
            service_account.to_string(),
        ))
    }

    /// Checks an `authorization` metadata value and returns the node it proves.
    pub fn verify(&self, header: Option<&str>) -> Result<String, NodeAuthError> {
        self.verify_at(header, unix_now())
    }

    /// [`NodeAuthority::verify`] as of `now` (unix seconds).
    pub fn verify_at(&self, header: Option<&str>, now: u64) -> Result<String, NodeAuthError> {
        let header = header.ok_or(NodeAuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or(NodeAuthError::Malformed)?;
        let (signed, mac) = token.rsplit_once(':').ok_or(NodeAuthError::Malformed)?;
        let rest = signed
            .strip_prefix("node:")
            .ok_or(NodeAuthError::Malformed)?;
        let mac = hex::decode(mac).map_err(|_| NodeAuthError::Malformed)?;
        let Some((node, expiry)) = rest.rsplit_once(':') else {
            // `node:<name>:<mac>`: the first format, which had no expiry.
            if rest.is_empty() {
                return Err(NodeAuthError::Malformed);
            }
            return Err(NodeAuthError::Legacy(rest.to_string()));
        };
        let expires_at: u64 = expiry.parse().map_err(|_| NodeAuthError::Malformed)?;
        if node.is_empty() {
            return Err(NodeAuthError::Malformed);
        }
        // The MAC first (constant time): an expiry is only meaningful once it is known to be ours.
        hmac::verify(&self.key, signed.as_bytes(), &mac)
            .map_err(|_| NodeAuthError::BadMac(node.to_string()))?;
        if now >= expires_at {
            return Err(NodeAuthError::Expired {
                node: node.to_string(),
                expired_at: expires_at,
            });
        }
        Ok(node.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn token_verifies_only_with_its_secret() {
        let a = NodeAuthority::new(b"secret-a");
        let b = NodeAuthority::new(b"secret-b");
        let t = format!("Bearer {}", a.token("node-1", HOUR));
        assert_eq!(a.verify(Some(&t)), Ok("node-1".to_string()));
        assert_eq!(
            b.verify(Some(&t)),
            Err(NodeAuthError::BadMac("node-1".into()))
        );
        assert_eq!(a.verify(None), Err(NodeAuthError::Missing));
        assert_eq!(
            a.verify(Some("Bearer node:x")),
            Err(NodeAuthError::Malformed)
        );
        // A token's node name cannot be swapped for another.
        let forged = t.replace("node-1", "node-2");
        assert!(a.verify(Some(&forged)).is_err());
    }

    #[test]
    fn expiry_is_signed_and_enforced() {
        let a = NodeAuthority::new(b"secret-a");
        let t = format!("Bearer {}", a.token_expiring_at("node-1", 1000));
        assert_eq!(a.verify_at(Some(&t), 999), Ok("node-1".to_string()));
        let expired = a.verify_at(Some(&t), 1000).unwrap_err();
        assert_eq!(
            expired,
            NodeAuthError::Expired {
                node: "node-1".into(),
                expired_at: 1000
            }
        );
        assert!(
            expired.to_string().contains("meshd node-token"),
            "{expired}"
        );
        // Pushing the expiry out breaks the MAC.
        let extended = t.replace(":1000:", ":9999999999:");
        assert_eq!(
            a.verify_at(Some(&extended), 999),
            Err(NodeAuthError::BadMac("node-1".into()))
        );
    }

    #[test]
    fn service_account_tokens_are_their_own_principal() {
        let a = NodeAuthority::new(b"secret-a");
        let t = format!(
            "Bearer {}",
            a.sa_token_expiring_at("shop", "waypoint", 1000)
        );
        assert_eq!(
            a.verify_principal_at(Some(&t), 999),
            Ok(Principal::ServiceAccount("shop".into(), "waypoint".into()))
        );
        // Node tokens still verify as nodes; an sa token is never a node token.
        let n = format!("Bearer {}", a.token_expiring_at("node-1", 1000));
        assert_eq!(
            a.verify_principal_at(Some(&n), 999),
            Ok(Principal::Node("node-1".into()))
        );
        assert_eq!(a.verify_at(Some(&t), 999), Err(NodeAuthError::Malformed));
        // Namespace, account and expiry are all under the MAC.
        for forged in [
            t.replace("sa:shop:", "sa:bank:"),
            t.replace(":waypoint:", ":other:"),
            t.replace(":1000:", ":9999999999:"),
        ] {
            assert!(
                matches!(
                    a.verify_principal_at(Some(&forged), 999),
                    Err(NodeAuthError::SaBadMac { .. })
                ),
                "{forged}"
            );
        }
        let b = NodeAuthority::new(b"secret-b");
        assert!(b.verify_principal_at(Some(&t), 999).is_err());
        let expired = a.verify_principal_at(Some(&t), 1000).unwrap_err();
        assert!(
            expired.to_string().contains("meshd workload-token"),
            "{expired}"
        );
        assert_eq!(
            a.verify_principal_at(Some("Bearer sa:shop:x:1"), 0),
            Err(NodeAuthError::SaMalformed)
        );
    }

    #[test]
    fn first_format_tokens_are_refused_with_a_way_out() {
        let a = NodeAuthority::new(b"secret-a");
        // What the first format minted: the MAC of the node name alone.
        let tag = hmac::sign(&a.key, b"node-1");
        let old = format!("Bearer node:node-1:{}", hex::encode(tag.as_ref()));
        let err = a.verify(Some(&old)).unwrap_err();
        assert_eq!(err, NodeAuthError::Legacy("node-1".into()));
        assert!(err.to_string().contains("mint a new one"), "{err}");
    }
}
