//! The effective L4 form of authorization rules, and matching one connection against it.
//!
//! Owns the compiled matchers (strings, IP blocks, ports, service accounts) and the
//! rule → clause → match evaluation (the same shape ztunnel uses: a rule is an AND of clauses, a
//! clause an OR of matches, a match an AND of fields, each field "any of the positive list and
//! none of the negative list"). Knows nothing about JSON or about which policies apply where.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::Identity;

/// Istio's string forms: exact, `prefix*`, `*suffix`, and `*` (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub fn parse(v: &str) -> StringMatch {
        if v == "*" {
            StringMatch::Presence
        } else if let Some(suffix) = v.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_string())
        } else if let Some(prefix) = v.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_string())
        } else {
            StringMatch::Exact(v.to_string())
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(e) => s == e,
            StringMatch::Prefix(p) => s.starts_with(p.as_str()),
            StringMatch::Suffix(x) => s.ends_with(x.as_str()),
            StringMatch::Presence => !s.is_empty(),
        }
    }
}

/// `serviceAccounts: ["ns/sa"]` (or `"sa"`, meaning the policy's namespace). Exact, no wildcards;
/// the trust domain is not compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

fn serialize_nets<S: serde::Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(nets.iter().map(|n| n.to_string()))
}

/// One match: every non-empty field must hold. Empty lists do not constrain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_nets"
    )]
    pub source_ips: Vec<IpNet>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_nets"
    )]
    pub not_source_ips: Vec<IpNet>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_nets"
    )]
    pub destination_ips: Vec<IpNet>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_nets"
    )]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// The facts about a connection that L4 rules can look at, in canonical form.
pub(crate) struct Peer<'a> {
    pub identity: Option<&'a Identity>,
    /// `<trust-domain>/ns/<ns>/sa/<sa>`: Istio's principal form, without `spiffe://`.
    pub principal: Option<String>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// "Any of `positive` (when non-empty) and none of `negative`". A predicate that cannot be
/// evaluated (no peer identity) is false, so an absent identity fails positive lists and passes
/// negative ones — as in ztunnel and Envoy.
fn pos_neg<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred)) && !negative.iter().any(&pred)
}

impl L4Match {
    pub(crate) fn matches(&self, peer: &Peer<'_>) -> bool {
        let principal = peer.principal.as_deref();
        let namespace = peer.identity.map(|i| i.namespace.as_str());
        pos_neg(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == peer.dst_port
        }) && pos_neg(&self.source_ips, &self.not_source_ips, |n| {
            n.contains(&peer.src_ip)
        }) && pos_neg(&self.destination_ips, &self.not_destination_ips, |n| {
            n.contains(&peer.dst_ip)
        }) && pos_neg(&self.principals, &self.not_principals, |m| {
            principal.is_some_and(|p| m.matches(p))
        }) && pos_neg(&self.namespaces, &self.not_namespaces, |m| {
            namespace.is_some_and(|ns| m.matches(ns))
        }) && pos_neg(&self.service_accounts, &self.not_service_accounts, |m| {
            peer.identity.is_some_and(|id| {
                id.namespace == m.namespace && id.service_account == m.service_account
            })
        })
    }
}

/// One rule: every clause must hold; a clause holds when any of its matches does. A rule with no
/// clauses (`{}`) matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct L4Rule {
    pub clauses: Vec<Vec<L4Match>>,
}

impl L4Rule {
    pub(crate) fn matches(&self, peer: &Peer<'_>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(peer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_forms() {
        let cases = [
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("ab*", "ab", true),
            ("ab*", "abc", true),
            ("ab*", "xab", false),
            ("*bc", "bc", true),
            ("*bc", "abc", true),
            ("*bc", "bcd", false),
            ("*", "x", true),
            ("*", "", false),
        ];
        for (pattern, value, want) in cases {
            assert_eq!(
                StringMatch::parse(pattern).matches(value),
                want,
                "{pattern} vs {value:?}"
            );
        }
    }
}
