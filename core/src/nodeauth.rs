//! Node credentials: how a ztunnel proves to meshd which node it serves.
//!
//! Local mode has no Kubernetes service-account tokens, so meshd keeps a secret in its state
//! directory and derives one token per node: `node:<name>:<hex HMAC-SHA256(secret, name)>`.
//! `meshd node-token --node <name>` prints it; the node's ztunnel reads it from a file and sends
//! it as gRPC metadata `authorization: Bearer <token>`. A token proves the node name only; what
//! a node may ask for is meshd's decision. This module owns the token format, not its storage.

use ring::hmac;

/// The gRPC metadata key carrying the token.
pub const AUTH_METADATA: &str = "authorization";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeAuthError {
    #[error(
        "no node credentials: send `authorization: Bearer <node token>` (see `meshd node-token`)"
    )]
    Missing,
    #[error("malformed node token: expected `Bearer node:<node>:<hex mac>`")]
    Malformed,
    #[error("node token for {0:?} does not verify (issued by another meshd state dir?)")]
    BadMac(String),
}

/// Issues and verifies node tokens with one secret.
pub struct NodeAuthority {
    key: hmac::Key,
}

impl NodeAuthority {
    pub fn new(secret: &[u8]) -> Self {
        NodeAuthority {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The token for `node`.
    pub fn token(&self, node: &str) -> String {
        let tag = hmac::sign(&self.key, node.as_bytes());
        format!("node:{node}:{}", hex::encode(tag.as_ref()))
    }

    /// Checks an `authorization` metadata value and returns the node it proves.
    pub fn verify(&self, header: Option<&str>) -> Result<String, NodeAuthError> {
        let header = header.ok_or(NodeAuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or(NodeAuthError::Malformed)?;
        let rest = token
            .strip_prefix("node:")
            .ok_or(NodeAuthError::Malformed)?;
        let (node, mac) = rest.rsplit_once(':').ok_or(NodeAuthError::Malformed)?;
        let mac = hex::decode(mac).map_err(|_| NodeAuthError::Malformed)?;
        if node.is_empty() {
            return Err(NodeAuthError::Malformed);
        }
        hmac::verify(&self.key, node.as_bytes(), &mac)
            .map_err(|_| NodeAuthError::BadMac(node.to_string()))?;
        Ok(node.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_verifies_only_with_its_secret() {
        let a = NodeAuthority::new(b"secret-a");
        let b = NodeAuthority::new(b"secret-b");
        let t = format!("Bearer {}", a.token("node-1"));
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
}
