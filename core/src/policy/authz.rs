//! AuthorizationPolicy: validating the user's spec as Istio would, and compiling it to the L4
//! form ztunnel can enforce or, for policies attached with `targetRefs`, the L7 form a waypoint
//! enforces (the same rules, request fields included).
//!
//! Owns which fields exist, which are enforceable at L4, and what happens to rules that need HTTP
//! attributes at L4 (dropped from ALLOW/AUDIT — more restrictive; stripped from DENY — denies
//! more). Does not decide which policies apply or combine their decisions (`mod.rs`, `l7`).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::l7::{L7Authorization, parse_targets};
use super::matcher::{KeyedMatch, L4Match, L4Rule, Peer, ServiceAccountMatch, StringMatch};
use super::path::PathMatch;
use super::spec::{
    Diag, as_array, as_object, check_known_fields, field, index, join, labels_match,
    parse_ip_block, parse_port, parse_selector, parse_spec, string_field, string_list,
};
use super::{Effective, PolicyReport, PolicyStatus};
use crate::proto::config::{Policy, Workload};

pub(crate) const KIND: &str = "AuthorizationPolicy";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    /// Root namespace, no selector: every workload of the mesh.
    Mesh,
    /// No selector: every workload of the policy's namespace.
    Namespace,
    /// Workloads whose labels include all of these, in the policy's namespace — or in every
    /// namespace when the policy lives in the root namespace.
    WorkloadSelector(BTreeMap<String, String>),
}

/// The effective L4 form of one AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4Authorization {
    /// `ns/name`.
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub scope: Scope,
    pub action: Action,
    /// The rules enforced at L4 (an ALLOW/AUDIT policy's HTTP rules are absent from this list).
    pub rules: Vec<L4Rule>,
    /// Indexes in `spec.rules` of the rules dropped at L4 because they need HTTP attributes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped_rules: Vec<usize>,
}

impl L4Authorization {
    pub(crate) fn matches(&self, peer: &Peer<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(peer))
    }

    /// Whether this policy applies to `dst`, given the mesh root namespace. (The set's index
    /// already narrows candidates; this is the full check.)
    pub fn applies_to(&self, dst: &Workload, root_namespace: &str) -> bool {
        match &self.scope {
            Scope::Mesh => true,
            Scope::Namespace => dst.namespace == self.namespace,
            Scope::WorkloadSelector(sel) => {
                (self.namespace == root_namespace || dst.namespace == self.namespace)
                    && labels_match(sel, &dst.labels)
            }
        }
    }
}

/// How to refer to the HTTP/TLS attributes that ztunnel cannot see.
const HTTP_HINT: &str = "ztunnel cannot enforce these at L4 (they need a waypoint)";

/// The L4 form (ztunnel), or the L7 form (waypoints, `targetRefs`), and the report.
pub(crate) fn compile(
    p: &Policy,
    root_namespace: &str,
) -> (
    Option<L4Authorization>,
    Option<L7Authorization>,
    PolicyReport,
) {
    let mut d = Diag::new(KIND, &p.namespace, &p.name);
    let compiled = parse_spec(&p.spec_json, &mut d)
        .and_then(|spec| compile_spec(&spec, p, root_namespace, &mut d));
    let (status, effective, waypoint) = match compiled {
        _ if d.has_errors() => (PolicyStatus::Rejected, None, None),
        None => (PolicyStatus::Rejected, None, None),
        Some(Compiled::Enforced(a)) => (PolicyStatus::Enforced, Some(a), None),
        Some(Compiled::NotEnforced(w)) => (PolicyStatus::NotEnforced, None, w),
    };
    let report = d.into_report(
        &p.key,
        status,
        effective.clone().map(Effective::Authorization),
    );
    (effective, waypoint, report)
}

enum Compiled {
    Enforced(L4Authorization),
    /// Not enforced at L4; with the waypoint's form when attached with `targetRefs`.
    NotEnforced(Option<L7Authorization>),
}

fn compile_spec(
    spec: &Map<String, Value>,
    p: &Policy,
    root_namespace: &str,
    d: &mut Diag,
) -> Option<Compiled> {
    check_known_fields(
        spec,
        "spec",
        &[
            "selector",
            "targetRef",
            "targetRefs",
            "action",
            "provider",
            "rules",
        ],
        d,
    );

    let action = match string_field(spec, "action", "spec", d).as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => Action::Custom,
        Some(other) => {
            d.error(
                "spec.action",
                format!("unknown action {other:?} (expected ALLOW, DENY, AUDIT or CUSTOM)"),
            );
            return None;
        }
    };

    let has_selector = field(spec, "selector").is_some();
    let selector = parse_selector(spec, d);
    let has_target_ref = field(spec, "targetRef").is_some();
    let has_target_refs = match field(spec, "targetRefs") {
        None => false,
        Some(v) => as_array(v, "spec.targetRefs", d).is_some_and(|a| !a.is_empty()),
    };
    let targets = parse_targets(spec, d);
    if [has_selector, has_target_ref, has_target_refs]
        .iter()
        .filter(|b| **b)
        .count()
        > 1
    {
        d.error(
            "spec.targetRefs",
            "only one of targetRefs or workloadSelector can be set",
        );
    }

    let provider = field(spec, "provider");
    if provider.is_some() && action != Action::Custom {
        d.error(
            "spec.provider",
            format!("`provider` must not be set with action {action:?}"),
        );
    }

    let rules_value = field(spec, "rules");
    if rules_value.is_none() {
        match action {
            Action::Deny => d.error(
                "spec.rules",
                "DENY action without `rules` is meaningless as it will never be triggered, add an \
                 empty rule `{}` if you want it to be triggered for every connection",
            ),
            Action::Custom => d.error(
                "spec.rules",
                "CUSTOM action without `rules` is meaningless as it will never be triggered",
            ),
            Action::Allow | Action::Audit => {}
        }
    }
    if action == Action::Custom && rules_value.is_some() {
        let name = provider
            .and_then(|v| v.as_object())
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if name.is_empty() {
            d.error("spec.provider.name", "`provider.name` must not be empty");
        }
    }

    let mut rules = Vec::new();
    let mut dropped_rules = Vec::new();
    // The waypoint's form: every rule as written, but for what even a waypoint cannot read.
    let mut l7_rules = Vec::new();
    if let Some(v) = rules_value
        && let Some(items) = as_array(v, "spec.rules", d)
    {
        if items.is_empty() && action == Action::Deny {
            d.warn(
                "spec.rules",
                "DENY policy with an empty rule list never matches",
            );
        }
        for (i, item) in items.iter().enumerate() {
            let path = index("spec.rules", i);
            let Some(parsed) = parse_rule(item, &path, &p.namespace, d) else {
                continue;
            };
            match (parsed.unsupported.is_empty(), action) {
                (true, _) | (false, Action::Deny) => l7_rules.push(parsed.rule.clone()),
                (false, _) => {}
            }
            if !parsed.unsupported.is_empty() && (has_target_ref || has_target_refs) {
                let what = parsed.unsupported.join(", ");
                let effect = if action == Action::Deny {
                    "the DENY rule is enforced without them, so it denies more than requested"
                } else {
                    "the rule is dropped, making the policy more restrictive"
                };
                d.warn(
                    &path,
                    format!("the waypoint does not support {what}: {effect}"),
                );
            }
            if parsed.http.is_empty() {
                rules.push(parsed.rule);
                continue;
            }
            let used = parsed.http.join(", ");
            match action {
                Action::Allow | Action::Audit => {
                    d.warn(
                        &path,
                        format!(
                            "rule {i} of {}/{} uses {used} ({HTTP_HINT}): the rule is dropped at \
                             L4, making the {action:?} policy more restrictive",
                            p.namespace, p.name
                        ),
                    );
                    dropped_rules.push(i);
                }
                Action::Deny => {
                    d.warn(
                        &path,
                        format!(
                            "rule {i} of {}/{} uses {used} ({HTTP_HINT}): the DENY rule is \
                             enforced at L4 without them, so it denies more than requested",
                            p.namespace, p.name
                        ),
                    );
                    rules.push(parsed.rule.for_l4(&parsed.http_only));
                }
                Action::Custom => {}
            }
        }
    }

    if d.has_errors() {
        return None;
    }
    if has_target_ref || has_target_refs {
        let f = if has_target_refs {
            "spec.targetRefs"
        } else {
            "spec.targetRef"
        };
        d.warn(
            f,
            "policy attached to a waypoint (targetRefs): enforced by waypoint, not at L4",
        );
        if action == Action::Custom {
            d.warn(
                "spec.action",
                "CUSTOM (external authorization) is not supported by the waypoint: this policy \
                 is NOT enforced",
            );
            return Some(Compiled::NotEnforced(None));
        }
        return Some(Compiled::NotEnforced(Some(L7Authorization {
            key: format!("{}/{}", p.namespace, p.name),
            namespace: p.namespace.clone(),
            targets,
            action,
            rules: l7_rules,
        })));
    }
    if action == Action::Custom {
        d.warn(
            "spec.action",
            "CUSTOM (external authorization) is not supported at L4: this policy is NOT enforced",
        );
        return Some(Compiled::NotEnforced(None));
    }
    let scope = match selector {
        Some(labels) => Scope::WorkloadSelector(labels),
        None if p.namespace == root_namespace => Scope::Mesh,
        None => Scope::Namespace,
    };
    Some(Compiled::Enforced(L4Authorization {
        key: format!("{}/{}", p.namespace, p.name),
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        scope,
        action,
        rules,
        dropped_rules,
    }))
}

struct ParsedRule {
    /// The whole rule (request fields included).
    rule: L4Rule,
    /// Names of the fields/condition keys the L4 form could not express.
    http: Vec<String>,
    /// Clauses (`when` conditions) made only of request fields: absent from the L4 form.
    http_only: Vec<usize>,
    /// Condition keys not even the waypoint evaluates (left out of the rule).
    unsupported: Vec<String>,
}

impl L4Rule {
    /// The L4 form of a DENY rule: request fields stripped, request-only conditions gone.
    fn for_l4(&self, http_only: &[usize]) -> L4Rule {
        L4Rule {
            clauses: self
                .clauses
                .iter()
                .enumerate()
                .filter(|(i, _)| !http_only.contains(i))
                .map(|(_, c)| c.iter().map(|m| m.without_request()).collect())
                .collect(),
        }
    }
}

fn push_unique(v: &mut Vec<String>, s: &str) {
    if !v.iter().any(|x| x == s) {
        v.push(s.to_string());
    }
}

fn parse_rule(v: &Value, path: &str, policy_ns: &str, d: &mut Diag) -> Option<ParsedRule> {
    let Value::Object(m) = v else {
        d.error(path, "`rule` must not be null and must be an object");
        return None;
    };
    check_known_fields(m, path, &["from", "to", "when"], d);
    let errors_before = d.errors.len();
    let mut http = Vec::new();
    let mut http_only = Vec::new();
    let mut unsupported = Vec::new();
    let mut rule = L4Rule::default();

    if let Some(from) = field(m, "from") {
        let fpath = join(path, "from");
        if let Some(items) = as_array(from, &fpath, d) {
            if items.is_empty() {
                d.error(&fpath, "`from` must not be empty");
            }
            let mut clause = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let ipath = index(&fpath, i);
                let Some(obj) = as_object(item, &ipath, d) else {
                    continue;
                };
                check_known_fields(obj, &ipath, &["source"], d);
                let spath = join(&ipath, "source");
                let Some(src) = field(obj, "source") else {
                    d.error(&spath, "`from.source` must not be null");
                    continue;
                };
                let Some(src) = as_object(src, &spath, d) else {
                    continue;
                };
                clause.push(parse_source(src, &spath, policy_ns, d, &mut http));
            }
            rule.clauses.push(clause);
        }
    }

    if let Some(to) = field(m, "to") {
        let tpath = join(path, "to");
        if let Some(items) = as_array(to, &tpath, d) {
            if items.is_empty() {
                d.error(&tpath, "`to` must not be empty");
            }
            let mut clause = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let ipath = index(&tpath, i);
                let Some(obj) = as_object(item, &ipath, d) else {
                    continue;
                };
                check_known_fields(obj, &ipath, &["operation"], d);
                let opath = join(&ipath, "operation");
                let Some(op) = field(obj, "operation") else {
                    d.error(&opath, "`to.operation` must not be null");
                    continue;
                };
                let Some(op) = as_object(op, &opath, d) else {
                    continue;
                };
                clause.push(parse_operation(op, &opath, d, &mut http));
            }
            rule.clauses.push(clause);
        }
    }

    if let Some(when) = field(m, "when") {
        let wpath = join(path, "when");
        if let Some(items) = as_array(when, &wpath, d) {
            for (i, item) in items.iter().enumerate() {
                let cpath = index(&wpath, i);
                let Some(cond) = as_object(item, &cpath, d) else {
                    continue;
                };
                match parse_condition(cond, &cpath, d, &mut http) {
                    Condition::Match(m) => {
                        if m.needs_request() {
                            http_only.push(rule.clauses.len());
                        }
                        rule.clauses.push(vec![*m]);
                    }
                    Condition::Unsupported(key) => push_unique(&mut unsupported, &key),
                    Condition::Invalid => {}
                }
            }
        }
    }

    (d.errors.len() == errors_before).then_some(ParsedRule {
        rule,
        http,
        http_only,
        unsupported,
    })
}

fn string_matches(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| StringMatch::parse(v)).collect()
}

/// Principals are `<td>/ns/<ns>/sa/<sa>` without scheme. A `spiffe://` prefix would never match
/// in Istio; we accept it (stripping the scheme) and say so.
fn principal_matches(values: &[String], path: &str, d: &mut Diag) -> Vec<StringMatch> {
    values
        .iter()
        .map(|v| match v.strip_prefix("spiffe://") {
            Some(rest) => {
                d.warn(
                    path,
                    format!(
                        "principal {v:?} has a spiffe:// prefix, which Istio principals do not \
                         carry (Istio would never match it); matching it as {rest:?}"
                    ),
                );
                StringMatch::parse(rest)
            }
            None => StringMatch::parse(v),
        })
        .collect()
}

fn ip_blocks(values: &[String], path: &str, d: &mut Diag) -> Vec<ipnet::IpNet> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        match parse_ip_block(v) {
            Ok(n) => out.push(n),
            Err(e) => d.error(&index(path, i), e),
        }
    }
    out
}

fn ports(values: &[String], path: &str, d: &mut Diag) -> Vec<u16> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        match parse_port(v) {
            Ok(p) => out.push(p),
            Err(e) => d.error(&index(path, i), e),
        }
    }
    out
}

fn service_accounts(
    values: &[String],
    path: &str,
    policy_ns: &str,
    d: &mut Diag,
) -> Vec<ServiceAccountMatch> {
    if values.len() > 16 {
        d.error(path, "may not have more than 16 values");
    }
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let ipath = index(path, i);
        if v.contains('*') {
            d.error(&ipath, "wildcard not allowed in serviceAccounts");
            continue;
        }
        if v.len() > 320 {
            d.error(&ipath, "value cannot exceed 320 characters");
            continue;
        }
        let parts: Vec<&str> = v.split('/').collect();
        match parts.as_slice() {
            [sa] => out.push(ServiceAccountMatch {
                namespace: policy_ns.to_string(),
                service_account: sa.to_string(),
            }),
            [ns, sa] if !ns.is_empty() && !sa.is_empty() => out.push(ServiceAccountMatch {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            _ => d.error(
                &ipath,
                format!(
                    "expected format 'serviceAccount' or 'namespace/serviceAccount', found {v:?}"
                ),
            ),
        }
    }
    out
}

const SOURCE_FIELDS: &[&str] = &[
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];

/// Source fields ztunnel cannot evaluate: request principals come from JWTs; remote IPs are the
/// original client from X-Forwarded-For / PROXY protocol, not the L4 peer (istiod's ambient
/// conversion treats both as HTTP attributes).
const SOURCE_HTTP_FIELDS: &[&str] = &[
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];

fn parse_source(
    m: &Map<String, Value>,
    path: &str,
    policy_ns: &str,
    d: &mut Diag,
    http: &mut Vec<String>,
) -> L4Match {
    check_known_fields(m, path, SOURCE_FIELDS, d);
    let lists: BTreeMap<&str, Vec<String>> = SOURCE_FIELDS
        .iter()
        .map(|f| (*f, string_list(m, f, path, d)))
        .collect();
    let get = |f: &str| lists.get(f).map(Vec::as_slice).unwrap_or(&[]);
    if lists.values().all(Vec::is_empty) {
        d.error(path, "`from.source` must not be empty");
    }
    let identity_lists = ["principals", "notPrincipals", "namespaces", "notNamespaces"];
    if identity_lists.iter().any(|f| !get(f).is_empty())
        && (!get("serviceAccounts").is_empty() || !get("notServiceAccounts").is_empty())
    {
        d.error(
            path,
            "cannot set serviceAccounts with namespaces or principals",
        );
    }
    for f in SOURCE_HTTP_FIELDS {
        if !get(f).is_empty() {
            push_unique(http, f);
        }
    }
    L4Match {
        request_principals: string_matches(get("requestPrincipals")),
        not_request_principals: string_matches(get("notRequestPrincipals")),
        remote_ips: ip_blocks(get("remoteIpBlocks"), &join(path, "remoteIpBlocks"), d),
        not_remote_ips: ip_blocks(
            get("notRemoteIpBlocks"),
            &join(path, "notRemoteIpBlocks"),
            d,
        ),
        principals: principal_matches(get("principals"), &join(path, "principals"), d),
        not_principals: principal_matches(get("notPrincipals"), &join(path, "notPrincipals"), d),
        namespaces: string_matches(get("namespaces")),
        not_namespaces: string_matches(get("notNamespaces")),
        service_accounts: service_accounts(
            get("serviceAccounts"),
            &join(path, "serviceAccounts"),
            policy_ns,
            d,
        ),
        not_service_accounts: service_accounts(
            get("notServiceAccounts"),
            &join(path, "notServiceAccounts"),
            policy_ns,
            d,
        ),
        source_ips: ip_blocks(get("ipBlocks"), &join(path, "ipBlocks"), d),
        not_source_ips: ip_blocks(get("notIpBlocks"), &join(path, "notIpBlocks"), d),
        ..L4Match::default()
    }
}

const OPERATION_FIELDS: &[&str] = &[
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];

fn parse_operation(
    m: &Map<String, Value>,
    path: &str,
    d: &mut Diag,
    http: &mut Vec<String>,
) -> L4Match {
    check_known_fields(m, path, OPERATION_FIELDS, d);
    let mut any = false;
    let mut out = L4Match::default();
    for f in OPERATION_FIELDS {
        let values = string_list(m, f, path, d);
        any |= !values.is_empty();
        if !values.is_empty() && !f.ends_with("orts") {
            push_unique(http, f);
        }
        let fpath = join(path, f);
        match *f {
            "ports" => out.destination_ports = ports(&values, &fpath, d),
            "notPorts" => out.not_destination_ports = ports(&values, &fpath, d),
            "hosts" => out.hosts = host_matches(&values),
            "notHosts" => out.not_hosts = host_matches(&values),
            "methods" => out.methods = string_matches(&values),
            "notMethods" => out.not_methods = string_matches(&values),
            "paths" => out.paths = paths(&values, &fpath, d),
            _ => out.not_paths = paths(&values, &fpath, d),
        }
    }
    if !any {
        d.error(path, "`to.operation` must not be empty");
    }
    out
}

enum Condition {
    /// Request keys are recorded in `http` too (ztunnel cannot evaluate them).
    Match(Box<L4Match>),
    /// A valid key no one here evaluates (`experimental.envoy.filters.*`).
    Unsupported(String),
    /// Recorded in the diagnostics.
    Invalid,
}

/// `when: [{key, values, notValues}]`.
fn parse_condition(
    m: &Map<String, Value>,
    path: &str,
    d: &mut Diag,
    http: &mut Vec<String>,
) -> Condition {
    match parse_condition_inner(m, path, d, http) {
        Ok(m) => Condition::Match(Box::new(m)),
        Err(Some(key)) => Condition::Unsupported(key),
        Err(None) => Condition::Invalid,
    }
}

fn parse_condition_inner(
    m: &Map<String, Value>,
    path: &str,
    d: &mut Diag,
    http: &mut Vec<String>,
) -> Result<L4Match, Option<String>> {
    check_known_fields(m, path, &["key", "values", "notValues"], d);
    let key = string_field(m, "key", path, d).unwrap_or_default();
    let kpath = join(path, "key");
    if key.is_empty() {
        d.error(&kpath, "`key` must not be empty");
        return Err(None);
    }
    let values = string_list(m, "values", path, d);
    let not_values = string_list(m, "notValues", path, d);
    if values.is_empty() && not_values.is_empty() {
        d.error(
            path,
            format!("at least one of `values` or `notValues` must be set for key {key}"),
        );
        return Err(None);
    }
    let vpath = join(path, "values");
    let npath = join(path, "notValues");
    let mut out = L4Match::default();
    match key.as_str() {
        "source.ip" => {
            out.source_ips = ip_blocks(&values, &vpath, d);
            out.not_source_ips = ip_blocks(&not_values, &npath, d);
        }
        "source.namespace" => {
            out.namespaces = string_matches(&values);
            out.not_namespaces = string_matches(&not_values);
        }
        "source.principal" => {
            out.principals = principal_matches(&values, &vpath, d);
            out.not_principals = principal_matches(&not_values, &npath, d);
        }
        "destination.ip" => {
            out.destination_ips = ip_blocks(&values, &vpath, d);
            out.not_destination_ips = ip_blocks(&not_values, &npath, d);
        }
        "destination.port" => {
            out.destination_ports = ports(&values, &vpath, d);
            out.not_destination_ports = ports(&not_values, &npath, d);
        }
        "remote.ip" => {
            out.remote_ips = ip_blocks(&values, &vpath, d);
            out.not_remote_ips = ip_blocks(&not_values, &npath, d);
            push_unique(http, &key);
        }
        "request.auth.principal" => {
            out.request_principals = string_matches(&values);
            out.not_request_principals = string_matches(&not_values);
            push_unique(http, &key);
        }
        "request.auth.audiences" => {
            out.audiences = string_matches(&values);
            out.not_audiences = string_matches(&not_values);
            push_unique(http, &key);
        }
        "request.auth.presenter" => {
            out.presenters = string_matches(&values);
            out.not_presenters = string_matches(&not_values);
            push_unique(http, &key);
        }
        "connection.sni" => {
            out.snis = string_matches(&values);
            out.not_snis = string_matches(&not_values);
            push_unique(http, &key);
        }
        k if k.starts_with("request.headers")
            || k.starts_with("request.auth.claims")
            || k.starts_with("experimental.envoy.filters.") =>
        {
            push_unique(http, &key);
            let Some(parts) = map_key(k) else {
                d.error(&kpath, format!("bad key ({k}): should have format a[b]"));
                return Err(None);
            };
            let keyed = KeyedMatch {
                key: parts,
                values: string_matches(&values),
                not_values: string_matches(&not_values),
            };
            if k.starts_with("request.headers[") && keyed.key.len() == 1 {
                let mut keyed = keyed;
                keyed.key[0] = keyed.key[0].to_ascii_lowercase();
                out.headers.push(keyed);
            } else if k.starts_with("request.auth.claims[") {
                out.claims.push(keyed);
            } else {
                return Err(Some(key));
            }
        }
        "destination.namespace" => {
            d.error(
                &kpath,
                "attribute destination.namespace is replaced by the metadata.namespace",
            );
            return Err(None);
        }
        k if k.starts_with("destination.labels") => {
            d.error(
                &kpath,
                format!("attribute {k} is replaced by the workload selector"),
            );
            return Err(None);
        }
        "destination.name" | "destination.user" => {
            d.error(
                &kpath,
                format!("deprecated attribute {key}: only supported in v1alpha1"),
            );
            return Err(None);
        }
        other => {
            d.error(&kpath, format!("unknown attribute: {other}"));
            return Err(None);
        }
    }
    Ok(out)
}

/// Istio's `a[b]` form for map-valued attributes (`request.auth.claims[a][b]` for nested
/// claims): the bracketed names, or `None` when malformed.
fn map_key(key: &str) -> Option<Vec<String>> {
    let open = key.find('[').filter(|o| *o > 0)?;
    let rest = key[open..].strip_prefix('[')?.strip_suffix(']')?;
    let parts: Vec<String> = rest.split("][").map(str::to_string).collect();
    if parts.iter().any(|p| p.is_empty() || p.contains(['[', ']'])) {
        return None;
    }
    Some(parts)
}

/// Hosts match case-insensitively: patterns are kept in lower case.
fn host_matches(values: &[String]) -> Vec<StringMatch> {
    values
        .iter()
        .map(|v| StringMatch::parse(&v.to_ascii_lowercase()))
        .collect()
}

fn paths(values: &[String], path: &str, d: &mut Diag) -> Vec<PathMatch> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        match PathMatch::parse(v) {
            Ok(m) => out.push(m),
            Err(e) => d.error(&index(path, i), e),
        }
    }
    out
}
