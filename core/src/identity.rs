//! SPIFFE workload identities, the names every certificate and policy speaks.
//!
//! Owns parsing and printing `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`;
//! nothing about certificates themselves.

use std::fmt;
use std::str::FromStr;

/// A workload identity: who a pod is, independent of where it runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    NotSpiffe(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    BadPath(String),
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// The URI SAN form.
    pub fn to_uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(IdentityError::BadPath(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo"
            .parse()
            .unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "bookinfo"));
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo"
        );
    }

    #[test]
    fn rejects_other_shapes() {
        assert!(matches!(
            "https://x/ns/a/sa/b".parse::<Identity>(),
            Err(IdentityError::NotSpiffe(_))
        ));
        for bad in [
            "spiffe://td/ns/a",
            "spiffe://td/ns//sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/c",
        ] {
            assert!(
                matches!(bad.parse::<Identity>(), Err(IdentityError::BadPath(_))),
                "{bad}"
            );
        }
    }
}
