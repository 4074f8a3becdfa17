//! AuthorizationPolicy: validating the user's spec as Istio would, and compiling it to the L4
//! form ztunnel can enforce.
//!
//! Owns which fields exist, which are enforceable at L4, and what happens to rules that need HTTP
//! attributes (dropped from ALLOW/AUDIT — more restrictive; stripped from DENY — denies more).
//! Does not decide which policies apply to a workload or combine their decisions (see `mod.rs`).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::matcher::{L4Match, L4Rule, Peer, ServiceAccountMatch, StringMatch};
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

pub(crate) fn compile(p: &Policy, root_namespace: &str) -> (Option<L4Authorization>, PolicyReport) {
    let mut d = Diag::new(KIND, &p.namespace, &p.name);
    let compiled = parse_spec(&p.spec_json, &mut d)
        .and_then(|spec| compile_spec(&spec, p, root_namespace, &mut d));
    let (status, effective) = match compiled {
        _ if d.has_errors() => (PolicyStatus::Rejected, None),
        None => (PolicyStatus::Rejected, None),
        Some(Compiled::Enforced(a)) => (PolicyStatus::Enforced, Some(a)),
        Some(Compiled::NotEnforced) => (PolicyStatus::NotEnforced, None),
    };
    let report = d.into_report(
        &p.key,
        status,
        effective.clone().map(Effective::Authorization),
    );
    (effective, report)
}

enum Compiled {
    Enforced(L4Authorization),
    NotEnforced,
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
                    rules.push(parsed.rule);
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
        return Some(Compiled::NotEnforced);
    }
    if action == Action::Custom {
        d.warn(
            "spec.action",
            "CUSTOM (external authorization) is not supported at L4: this policy is NOT enforced",
        );
        return Some(Compiled::NotEnforced);
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
    rule: L4Rule,
    /// Names of the fields/condition keys the L4 form could not express.
    http: Vec<String>,
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
                if let Some(m) = parse_condition(cond, &cpath, d, &mut http) {
                    rule.clauses.push(vec![m]);
                }
            }
        }
    }

    (d.errors.len() == errors_before).then_some(ParsedRule { rule, http })
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
        if f.ends_with("IpBlocks") {
            // Still validated: Istio rejects bad CIDRs in every IP field.
            ip_blocks(get(f), &join(path, f), d);
        }
    }
    L4Match {
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
        match *f {
            "ports" => out.destination_ports = ports(&values, &join(path, f), d),
            "notPorts" => out.not_destination_ports = ports(&values, &join(path, f), d),
            _ if !values.is_empty() => push_unique(http, f),
            _ => {}
        }
    }
    if !any {
        d.error(path, "`to.operation` must not be empty");
    }
    out
}

/// `when: [{key, values, notValues}]`. Returns the L4 match, or `None` when the key is not
/// available at L4 (recorded in `http`) or invalid (recorded in `d`).
fn parse_condition(
    m: &Map<String, Value>,
    path: &str,
    d: &mut Diag,
    http: &mut Vec<String>,
) -> Option<L4Match> {
    check_known_fields(m, path, &["key", "values", "notValues"], d);
    let key = string_field(m, "key", path, d).unwrap_or_default();
    let kpath = join(path, "key");
    if key.is_empty() {
        d.error(&kpath, "`key` must not be empty");
        return None;
    }
    let values = string_list(m, "values", path, d);
    let not_values = string_list(m, "notValues", path, d);
    if values.is_empty() && not_values.is_empty() {
        d.error(
            path,
            format!("at least one of `values` or `notValues` must be set for key {key}"),
        );
        return None;
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
            ip_blocks(&values, &vpath, d);
            ip_blocks(&not_values, &npath, d);
            push_unique(http, &key);
            return None;
        }
        "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => {
            push_unique(http, &key);
            return None;
        }
        k if k.starts_with("request.headers")
            || k.starts_with("request.auth.claims")
            || k.starts_with("experimental.envoy.filters.") =>
        {
            if !valid_map_key(k) {
                d.error(&kpath, format!("bad key ({k}): should have format a[b]"));
            }
            push_unique(http, &key);
            return None;
        }
        "destination.namespace" => {
            d.error(
                &kpath,
                "attribute destination.namespace is replaced by the metadata.namespace",
            );
            return None;
        }
        k if k.starts_with("destination.labels") => {
            d.error(
                &kpath,
                format!("attribute {k} is replaced by the workload selector"),
            );
            return None;
        }
        "destination.name" | "destination.user" => {
            d.error(
                &kpath,
                format!("deprecated attribute {key}: only supported in v1alpha1"),
            );
            return None;
        }
        other => {
            d.error(&kpath, format!("unknown attribute: {other}"));
            return None;
        }
    }
    Some(out)
}

/// Istio's `a[b]` form for map-valued attributes.
fn valid_map_key(key: &str) -> bool {
    match key.find('[') {
        Some(open) => key.ends_with(']') && open > 0 && open + 2 < key.len(),
        None => false,
    }
}
