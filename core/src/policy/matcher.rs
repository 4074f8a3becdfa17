//! The effective form of authorization rules, and matching one connection (L4, ztunnel) or one
//! request on a connection (L7, the waypoint) against it: one engine for both.
//!
//! Owns the compiled matchers (strings, IP blocks, ports, service accounts, and the request's
//! host, method, path, headers and JWT claims) and the rule → clause → match evaluation (the
//! same shape ztunnel uses: a rule is an AND of clauses, a clause an OR of matches, a match an
//! AND of fields, each field "any of the positive list and none of the negative list"). At L4
//! there is no request: a request field then fails its positive list and passes its negative
//! one, like an absent identity. Knows nothing about JSON or about which policies apply where.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::jwt::Claims;
use super::path::PathMatch;
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

/// A map-valued attribute's condition: `request.headers[name]` or `request.auth.claims[a][b]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyedMatch {
    /// The header name (lower case), or the claim's path (nested claims).
    pub key: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<StringMatch>,
}

/// The L4 name of [`Match`] (kept for the L4 API).
pub type L4Match = Match;
/// The L4 name of [`Rule`].
pub type L4Rule = Rule;

/// One match: every non-empty field must hold. Empty lists do not constrain. The L7 fields
/// (request principals, remote IPs, hosts, methods, paths, headers, JWT claims, SNI) are never
/// set in the form ztunnel enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
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
    /// `iss/sub` of the request's verified JWT (`requestPrincipals`, `request.auth.principal`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<StringMatch>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_nets"
    )]
    pub remote_ips: Vec<IpNet>,
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_nets"
    )]
    pub not_remote_ips: Vec<IpNet>,
    /// Lower-cased patterns: hosts match case-insensitively.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<PathMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<KeyedMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<KeyedMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_audiences: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub presenters: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_presenters: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snis: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_snis: Vec<StringMatch>,
}

/// What a waypoint knows about one HTTP request, beyond its connection.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The `:authority` / `Host`.
    pub host: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    /// The original client: the connection's peer, since no proxy in front is trusted
    /// (Istio's default `numTrustedProxies: 0`).
    pub remote_ip: IpAddr,
    /// The TLS server name the client asked for, if the request came over TLS it terminated.
    pub sni: Option<&'a str>,
    /// The request's verified JWT, if it carried one.
    pub auth: Option<&'a Claims>,
}

/// The facts about a connection (and at L7 its request) that rules can look at, in canonical
/// form.
pub(crate) struct Peer<'a> {
    pub identity: Option<&'a Identity>,
    /// `<trust-domain>/ns/<ns>/sa/<sa>`: Istio's principal form, without `spiffe://`.
    pub principal: Option<String>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// `None` at L4.
    pub request: Option<&'a Request<'a>>,
}

impl<'a> Peer<'a> {
    /// The facts of `conn` (and of its `request`, at a waypoint), in canonical form.
    pub(crate) fn of(conn: &'a super::Connection, request: Option<&'a Request<'a>>) -> Peer<'a> {
        Peer {
            identity: conn.src_identity.as_deref(),
            principal: conn.src_identity.as_ref().map(|i| {
                format!(
                    "{}/ns/{}/sa/{}",
                    i.trust_domain, i.namespace, i.service_account
                )
            }),
            src_ip: crate::store::canonical(conn.src_ip),
            dst_ip: crate::store::canonical(conn.dst_ip),
            dst_port: conn.dst_port,
            request,
        }
    }
}

/// "Any of `positive` (when non-empty) and none of `negative`". A predicate that cannot be
/// evaluated (no peer identity) is false, so an absent identity fails positive lists and passes
/// negative ones — as in ztunnel and Envoy.
fn pos_neg<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred)) && !negative.iter().any(&pred)
}

impl Match {
    pub(crate) fn matches(&self, peer: &Peer<'_>) -> bool {
        self.matches_connection(peer) && self.matches_request(peer)
    }

    /// Whether any field needs the request (so ztunnel cannot evaluate this match).
    pub fn needs_request(&self) -> bool {
        *self != self.without_request()
    }

    /// This match with its request fields removed: the part ztunnel can enforce.
    pub fn without_request(&self) -> Match {
        Match {
            principals: self.principals.clone(),
            not_principals: self.not_principals.clone(),
            namespaces: self.namespaces.clone(),
            not_namespaces: self.not_namespaces.clone(),
            service_accounts: self.service_accounts.clone(),
            not_service_accounts: self.not_service_accounts.clone(),
            source_ips: self.source_ips.clone(),
            not_source_ips: self.not_source_ips.clone(),
            destination_ips: self.destination_ips.clone(),
            not_destination_ips: self.not_destination_ips.clone(),
            destination_ports: self.destination_ports.clone(),
            not_destination_ports: self.not_destination_ports.clone(),
            ..Match::default()
        }
    }

    fn matches_request(&self, peer: &Peer<'_>) -> bool {
        let req = peer.request;
        let auth = req.and_then(|r| r.auth);
        // Lower-cased once, and only when a host list needs it.
        let host = req
            .filter(|_| !self.hosts.is_empty() || !self.not_hosts.is_empty())
            .map(|r| r.host.to_ascii_lowercase());
        pos_neg(
            &self.request_principals,
            &self.not_request_principals,
            |m| auth.is_some_and(|a| m.matches(&a.principal)),
        ) && pos_neg(&self.remote_ips, &self.not_remote_ips, |n| {
            req.is_some_and(|r| n.contains(&crate::store::canonical(r.remote_ip)))
        }) && pos_neg(&self.hosts, &self.not_hosts, |m| {
            host.as_deref().is_some_and(|h| host_matches(m, h))
        }) && pos_neg(&self.methods, &self.not_methods, |m| {
            req.is_some_and(|r| m.matches(r.method))
        }) && pos_neg(&self.paths, &self.not_paths, |m| {
            req.is_some_and(|r| m.matches(r.path))
        }) && self.headers.iter().all(|h| {
            let value = req.and_then(|r| header_value(r.headers, &h.key[0]));
            pos_neg(&h.values, &h.not_values, |m| {
                value.as_deref().is_some_and(|v| m.matches(v))
            })
        }) && self.claims.iter().all(|c| {
            let values = auth.map(|a| a.claim_strings(&c.key)).unwrap_or_default();
            pos_neg(&c.values, &c.not_values, |m| {
                values.iter().any(|v| m.matches(v))
            })
        }) && pos_neg(&self.audiences, &self.not_audiences, |m| {
            auth.is_some_and(|a| a.audiences.iter().any(|v| m.matches(v)))
        }) && pos_neg(&self.presenters, &self.not_presenters, |m| {
            auth.and_then(|a| a.presenter.as_deref())
                .is_some_and(|v| m.matches(v))
        }) && pos_neg(&self.snis, &self.not_snis, |m| {
            req.and_then(|r| r.sni).is_some_and(|v| m.matches(v))
        })
    }

    fn matches_connection(&self, peer: &Peer<'_>) -> bool {
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

/// Istio's hosts: case-insensitive; a pattern without a port also matches the host with any
/// port (`Host: web:8080` is host `web`).
fn host_matches(m: &StringMatch, host: &str) -> bool {
    if m.matches(host) {
        return true;
    }
    let pattern_has_port = match m {
        StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) => s.contains(':'),
        StringMatch::Presence => true,
    };
    // Strip a `:port` (not an IPv6 address's colons: those end in `]` before the port).
    match host.rsplit_once(':') {
        Some((h, port))
            if !pattern_has_port
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']')) =>
        {
            m.matches(h)
        }
        _ => false,
    }
}

/// A header's value as Envoy's header matchers see it: repeated headers joined with `,`.
fn header_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    Some(
        values
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// One rule: every clause must hold; a clause holds when any of its matches does. A rule with no
/// clauses (`{}`) matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub clauses: Vec<Vec<Match>>,
}

impl Rule {
    pub(crate) fn matches(&self, peer: &Peer<'_>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(peer)))
    }

    /// Whether any of its matches needs an HTTP request.
    pub fn needs_request(&self) -> bool {
        self.clauses.iter().flatten().any(Match::needs_request)
    }

    /// Whether it matches a connection with no HTTP request to look at, for `action`: an ALLOW
    /// (or AUDIT) rule that needs the request never matches, a DENY rule matches on its
    /// connection fields alone — Istio's rule for TCP traffic, which errs towards refusing.
    pub(crate) fn matches_without_request(&self, peer: &Peer<'_>, deny: bool) -> bool {
        if !deny {
            return !self.needs_request() && self.matches(peer);
        }
        self.clauses.iter().all(|clause| {
            clause.is_empty() || clause.iter().any(|m| m.without_request().matches(peer))
        })
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
