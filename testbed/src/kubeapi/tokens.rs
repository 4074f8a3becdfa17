//! Service-account tokens the double mints (TokenRequest, [`super::ApiServer::issue_token`])
//! and reviews (TokenReview): opaque random strings in a table, each with what it proves.
//!
//! Owns the token table and the TokenReview `status` it answers; knows nothing of HTTP or the
//! object store. Tokens are secrets: nothing here logs them, and errors never echo them.
//!
//! A review reports what a real API server (1.30+) reports for a bound service-account token:
//! the user `system:serviceaccount:NS:SA` with the service account's uid, the three groups,
//! `extra` with the bound pod, its uid, the node and a credential id, and the audiences both
//! sides share. Every token also carries the API server's own audience ([`API_AUDIENCE`]), as a
//! TokenRequest without audiences gets; a review asking for no audience asks for that one.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::{Value, json};

use super::TokenSpec;

/// The API server's own audience (the default of `--api-audiences` on a kubeadm cluster).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Tokens start with this, so one in a log or a file is recognizable as the double's.
pub const TOKEN_PREFIX: &str = "kubeapi-double.";

/// Who a token authenticates as, for the double's own request handling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUser {
    /// `system:serviceaccount:NS:SA`.
    pub username: String,
    /// The bound pod's name, if any.
    pub pod: Option<String>,
}

struct Entry {
    spec: TokenSpec,
    /// A JWT's `jti` would be this; reviews report it as the credential id.
    id: String,
}

#[derive(Default)]
pub struct Tokens {
    table: HashMap<String, Entry>,
}

// Hand-written so a `{:?}` of the server never prints a token.
impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.table.len())
            .finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stable, UUID-shaped uid for a service account (the double has no ServiceAccount uid to
/// read here; the same account always reports the same uid, as a real one does).
fn account_uid(namespace: &str, name: &str) -> String {
    let mut words = [0u64; 2];
    for (i, w) in words.iter_mut().enumerate() {
        let mut h = DefaultHasher::new();
        (i, "serviceaccount", namespace, name).hash(&mut h);
        *w = h.finish();
    }
    let s = format!("{:016x}{:016x}", words[0], words[1]);
    format!(
        "{}-{}-{}-{}-{}",
        &s[0..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..32]
    )
}

fn quoted_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", inner.join(" "))
}

impl Tokens {
    /// Mints a new token: 32 random bytes, hex, after [`TOKEN_PREFIX`].
    pub fn issue(&mut self, spec: TokenSpec) -> String {
        let token = format!("{TOKEN_PREFIX}{}", hex(&rand::random::<[u8; 32]>()));
        let id = format!("JTI={}", hex(&rand::random::<[u8; 16]>()));
        self.table.insert(token.clone(), Entry { spec, id });
        token
    }

    fn live(&self, token: &str, now: u64) -> Result<&Entry, String> {
        let entry = self
            .table
            .get(token)
            .ok_or_else(|| "[invalid bearer token, token not found]".to_string())?;
        if now >= entry.spec.expires_at {
            return Err("[invalid bearer token, service account token has expired]".into());
        }
        Ok(entry)
    }

    /// The user a token authenticates as at `now` (unix seconds), for any audience.
    pub fn user(&self, token: &str, now: u64) -> Option<TokenUser> {
        let entry = self.live(token, now).ok()?;
        Some(TokenUser {
            username: username(&entry.spec),
            pod: entry.spec.pod.as_ref().map(|(name, _)| name.clone()),
        })
    }

    /// A TokenReview's `status` for `token`, asked for `audiences` (empty: the API server's
    /// own audience, which every token has) at `now`.
    pub fn review(&self, token: &str, audiences: &[String], now: u64) -> Value {
        let entry = match self.live(token, now) {
            Ok(e) => e,
            Err(error) => return json!({"authenticated": false, "error": error}),
        };
        let spec = &entry.spec;
        let wanted: Vec<String> = if audiences.is_empty() {
            vec![API_AUDIENCE.to_string()]
        } else {
            audiences.to_vec()
        };
        let has = |a: &String| a == API_AUDIENCE || spec.audiences.contains(a);
        let shared: Vec<String> = wanted.iter().filter(|a| has(a)).cloned().collect();
        if shared.is_empty() {
            let mut own = spec.audiences.clone();
            own.push(API_AUDIENCE.to_string());
            return json!({
                "authenticated": false,
                "error": format!(
                    "[invalid bearer token, token audiences {} is invalid for the target audiences {}]",
                    quoted_list(&own),
                    quoted_list(&wanted)
                ),
            });
        }
        let ns = &spec.namespace;
        let mut extra = serde_json::Map::new();
        extra.insert(
            "authentication.kubernetes.io/credential-id".into(),
            json!([entry.id]),
        );
        if let Some(node) = &spec.node {
            extra.insert(
                "authentication.kubernetes.io/node-name".into(),
                json!([node]),
            );
        }
        if let Some((name, uid)) = &spec.pod {
            extra.insert(
                "authentication.kubernetes.io/pod-name".into(),
                json!([name]),
            );
            extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
        }
        json!({
            "authenticated": true,
            "user": {
                "username": username(spec),
                "uid": account_uid(ns, &spec.service_account),
                "groups": [
                    "system:serviceaccounts",
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated",
                ],
                "extra": extra,
            },
            "audiences": shared,
        })
    }
}

fn username(spec: &TokenSpec) -> String {
    format!(
        "system:serviceaccount:{}:{}",
        spec.namespace, spec.service_account
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(expires_at: u64) -> TokenSpec {
        TokenSpec {
            namespace: "mesh-system".into(),
            service_account: "ztunnel".into(),
            audiences: vec!["mesh-ca".into()],
            pod: Some(("ztunnel-n1".into(), "pod-uid-1".into())),
            node: Some("n1".into()),
            expires_at,
        }
    }

    #[test]
    fn issued_tokens_are_opaque_distinct_and_prefixed() {
        let mut t = Tokens::default();
        let a = t.issue(spec(100));
        let b = t.issue(spec(100));
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 64);
        assert!(
            !format!("{t:?}").contains(&a),
            "Debug must not print tokens"
        );
    }

    #[test]
    fn review_reports_a_bound_service_account_token() {
        let mut t = Tokens::default();
        let tok = t.issue(spec(100));
        let s = t.review(&tok, &["mesh-ca".into(), "other".into()], 50);
        assert_eq!(s["authenticated"], true);
        assert_eq!(
            s["user"]["username"],
            "system:serviceaccount:mesh-system:ztunnel"
        );
        assert_eq!(
            s["user"]["groups"],
            json!([
                "system:serviceaccounts",
                "system:serviceaccounts:mesh-system",
                "system:authenticated"
            ])
        );
        let extra = &s["user"]["extra"];
        assert_eq!(
            extra["authentication.kubernetes.io/pod-name"],
            json!(["ztunnel-n1"])
        );
        assert_eq!(
            extra["authentication.kubernetes.io/pod-uid"],
            json!(["pod-uid-1"])
        );
        assert_eq!(
            extra["authentication.kubernetes.io/node-name"],
            json!(["n1"])
        );
        assert!(
            extra["authentication.kubernetes.io/credential-id"][0]
                .as_str()
                .is_some_and(|c| c.starts_with("JTI="))
        );
        assert_eq!(s["audiences"], json!(["mesh-ca"]));
        // The same account reports the same uid for every token.
        let other = t.issue(spec(100));
        assert_eq!(t.review(&other, &[], 50)["user"]["uid"], s["user"]["uid"]);
        assert!(s["user"]["uid"].as_str().is_some_and(|u| u.len() == 36));
    }

    #[test]
    fn empty_audiences_mean_the_api_servers_own() {
        let mut t = Tokens::default();
        let tok = t.issue(spec(100));
        let s = t.review(&tok, &[], 50);
        assert_eq!(s["authenticated"], true);
        assert_eq!(s["audiences"], json!([API_AUDIENCE]));
    }

    #[test]
    fn unknown_expired_and_wrong_audience_are_refused_with_a_reason() {
        let mut t = Tokens::default();
        let tok = t.issue(spec(100));
        let unknown = t.review("kubeapi-double.nope", &[], 50);
        assert_eq!(unknown["authenticated"], false);
        assert!(unknown["error"].as_str().is_some_and(|e| !e.is_empty()));
        assert!(unknown.get("user").is_none());

        let expired = t.review(&tok, &["mesh-ca".into()], 100);
        assert_eq!(expired["authenticated"], false);
        assert!(expired["error"].as_str().unwrap_or("").contains("expired"));
        assert_eq!(t.user(&tok, 100), None);

        let wrong = t.review(&tok, &["istio-ca".into()], 50);
        assert_eq!(wrong["authenticated"], false);
        let e = wrong["error"].as_str().unwrap_or("");
        assert!(e.contains("token audiences [\"mesh-ca\""), "{e}");
        assert!(
            e.contains("is invalid for the target audiences [\"istio-ca\"]"),
            "{e}"
        );
        assert!(!e.contains(&tok));
    }

    #[test]
    fn user_is_the_service_account_and_its_pod() {
        let mut t = Tokens::default();
        let tok = t.issue(spec(100));
        assert_eq!(
            t.user(&tok, 10),
            Some(TokenUser {
                username: "system:serviceaccount:mesh-system:ztunnel".into(),
                pod: Some("ztunnel-n1".into()),
            })
        );
        assert_eq!(t.user("x", 10), None);
    }
}
