//! RBAC for service-account tokens, as the real API server's RBAC authorizer decides it:
//! ClusterRoleBindings grant their ClusterRole everywhere, RoleBindings grant a Role (or a
//! ClusterRole) in their own namespace; a rule matches on verb, API group, resource (with
//! `res/sub`, `*/sub`, `*`) and, if it lists any, resourceNames. No match is 403 Forbidden
//! with the real server's message. Reads the RBAC objects from the store; owns no state.
//! Enforced only when a test asks ([`super::ApiServer::enforce_rbac`]); the admin token is
//! never restricted. Non-resource URLs (discovery, /version) are always allowed.

use serde_json::{Value, json};

use super::errors::ApiErr;
use super::store::State;

const GROUP: &str = "rbac.authorization.k8s.io";

/// What one resource request asks to do (the authorizer's attributes).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Attrs<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    /// Empty for cluster scope.
    pub namespace: &'a str,
    /// Empty for collection requests.
    pub name: &'a str,
}

/// The verb the real server derives from the method and path.
pub(crate) fn verb(method: &http::Method, is_collection: bool, watch: bool) -> &'static str {
    match (method.as_str(), is_collection) {
        ("GET" | "HEAD", true) if watch => "watch",
        ("GET" | "HEAD", true) => "list",
        ("GET" | "HEAD", false) if watch => "watch",
        ("GET" | "HEAD", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "deletecollection",
        ("DELETE", false) => "delete",
        _ => "unknown",
    }
}

/// The one name a list or watch selects with `metadata.name=X` (or `==`), if that is its
/// field selector's only term.
pub(crate) fn selected_name<'q>(verb: &str, field_selector: Option<&'q str>) -> Option<&'q str> {
    if !matches!(verb, "list" | "watch") {
        return None;
    }
    let sel = field_selector?;
    if sel.contains(',') {
        return None;
    }
    let v = sel
        .strip_prefix("metadata.name==")
        .or_else(|| sel.strip_prefix("metadata.name="))?;
    (!v.is_empty()).then_some(v)
}

/// A user's groups, as TokenReview reports them for a service account (`admin` is not
/// authorized through here).
fn groups(user: &str) -> Vec<String> {
    let mut g = vec!["system:authenticated".to_string()];
    if let Some(rest) = user.strip_prefix("system:serviceaccount:")
        && let Some((ns, _)) = rest.split_once(':')
    {
        g.push("system:serviceaccounts".into());
        g.push(format!("system:serviceaccounts:{ns}"));
    }
    g
}

fn names_user(subject: &Value, user: &str, groups: &[String]) -> bool {
    let s = |k: &str| subject[k].as_str().unwrap_or_default();
    match s("kind") {
        "ServiceAccount" => {
            format!("system:serviceaccount:{}:{}", s("namespace"), s("name")) == user
        }
        "User" => s("name") == user,
        "Group" => groups.iter().any(|g| g == s("name")),
        _ => false,
    }
}

fn strs(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

fn rule_allows(rule: &Value, a: &Attrs) -> bool {
    let verb_ok = strs(&rule["verbs"]).any(|v| v == "*" || v == a.verb);
    let group_ok = strs(&rule["apiGroups"]).any(|g| g == "*" || g == a.group);
    let combined = match a.subresource {
        Some(sub) => format!("{}/{sub}", a.resource),
        None => a.resource.to_string(),
    };
    let resource_ok = strs(&rule["resources"]).any(|r| {
        r == "*"
            || r == combined
            || a.subresource
                .is_some_and(|sub| r.strip_prefix("*/") == Some(sub))
    });
    let mut names = strs(&rule["resourceNames"]).peekable();
    let name_ok = names.peek().is_none() || (!a.name.is_empty() && names.any(|n| n == a.name));
    verb_ok && group_ok && resource_ok && name_ok
}

/// The rules of the role a binding refers to (none if it does not exist).
fn role_rules<'s>(st: &'s State, binding: &Value, binding_ns: &str) -> Vec<&'s Value> {
    let role_ref = &binding["roleRef"];
    let name = role_ref["name"].as_str().unwrap_or_default();
    if role_ref["apiGroup"].as_str() != Some(GROUP) {
        return Vec::new();
    }
    let (plural, ns) = match role_ref["kind"].as_str() {
        Some("ClusterRole") => ("clusterroles", ""),
        Some("Role") if !binding_ns.is_empty() => ("roles", binding_ns),
        _ => return Vec::new(),
    };
    let Some(kind) = st.kinds.by_url(GROUP, "v1", plural) else {
        return Vec::new();
    };
    st.get(kind, ns, name)
        .map(|r| r["rules"].as_array().into_iter().flatten().collect())
        .unwrap_or_default()
}

/// Allowed, or the 403 the real server answers.
pub(crate) fn authorize(st: &State, user: &str, a: &Attrs) -> Result<(), ApiErr> {
    let groups = groups(user);
    let bindings = |plural: &str| -> Vec<&Value> {
        st.kinds
            .by_url(GROUP, "v1", plural)
            .map(|k| st.list(k, None))
            .unwrap_or_default()
    };
    let applies = |b: &Value| strs_objs(&b["subjects"]).any(|s| names_user(s, user, &groups));
    let cluster = bindings("clusterrolebindings")
        .into_iter()
        .filter(|b| applies(b))
        .any(|b| role_rules(st, b, "").into_iter().any(|r| rule_allows(r, a)));
    let namespaced = || {
        !a.namespace.is_empty()
            && bindings("rolebindings")
                .into_iter()
                .filter(|b| b["metadata"]["namespace"].as_str() == Some(a.namespace))
                .filter(|b| applies(b))
                .any(|b| {
                    role_rules(st, b, a.namespace)
                        .into_iter()
                        .any(|r| rule_allows(r, a))
                })
    };
    if cluster || namespaced() {
        return Ok(());
    }
    Err(forbidden(user, a))
}

fn strs_objs(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// The real server's Forbidden: `<resource>[.group] ["name"] is forbidden: User "u" cannot
/// <verb> resource "<res[/sub]>" in API group "<g>" (in the namespace "ns"|at the cluster scope)`.
pub(crate) fn forbidden(user: &str, a: &Attrs) -> ApiErr {
    let qualified = if a.group.is_empty() {
        a.resource.to_string()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    let combined = match a.subresource {
        Some(sub) => format!("{}/{sub}", a.resource),
        None => a.resource.to_string(),
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    let why = format!(
        "User \"{user}\" cannot {} resource \"{combined}\" in API group \"{}\" {scope}",
        a.verb, a.group
    );
    let message = if a.name.is_empty() {
        format!("{qualified} is forbidden: {why}")
    } else {
        format!("{qualified} \"{}\" is forbidden: {why}", a.name)
    };
    let mut e = ApiErr::new(403, "Forbidden", message);
    let mut details = json!({"group": a.group, "kind": a.resource});
    if !a.name.is_empty() {
        details["name"] = json!(a.name);
    }
    e.details = Some(details);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs<'a>(
        verb: &'a str,
        resource: &'a str,
        sub: Option<&'a str>,
        name: &'a str,
    ) -> Attrs<'a> {
        Attrs {
            verb,
            group: "",
            resource,
            subresource: sub,
            namespace: "mesh-system",
            name,
        }
    }

    #[test]
    fn rules_match_like_the_real_authorizer() {
        let rule = json!({"apiGroups": [""], "resources": ["pods/status", "configmaps"],
            "verbs": ["get", "patch"], "resourceNames": ["mesh-uninstall", "p1"]});
        assert!(rule_allows(
            &rule,
            &attrs("get", "configmaps", None, "mesh-uninstall")
        ));
        assert!(rule_allows(
            &rule,
            &attrs("patch", "pods", Some("status"), "p1")
        ));
        assert!(
            !rule_allows(&rule, &attrs("patch", "pods", None, "p1")),
            "not the main resource"
        );
        assert!(!rule_allows(
            &rule,
            &attrs("get", "configmaps", None, "other")
        ));
        assert!(
            !rule_allows(&rule, &attrs("get", "configmaps", None, "")),
            "a list is not named"
        );
        assert!(!rule_allows(
            &rule,
            &attrs("delete", "configmaps", None, "p1")
        ));
        let star = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]});
        assert!(rule_allows(
            &star,
            &attrs("update", "pods", Some("status"), "x")
        ));
        assert!(!rule_allows(&star, &attrs("update", "pods", None, "x")));
        let other_group = json!({"apiGroups": ["apps"], "resources": ["*"], "verbs": ["*"]});
        assert!(!rule_allows(&other_group, &attrs("get", "pods", None, "x")));
    }

    #[test]
    fn forbidden_reads_like_the_real_server() {
        let e = forbidden(
            "system:serviceaccount:mesh-system:ztunnel",
            &Attrs {
                verb: "list",
                group: "",
                resource: "pods",
                subresource: None,
                namespace: "",
                name: "",
            },
        );
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "pods is forbidden: User \"system:serviceaccount:mesh-system:ztunnel\" cannot list resource \"pods\" in API group \"\" at the cluster scope"
        );
        let e = forbidden(
            "u",
            &Attrs {
                verb: "get",
                group: "coordination.k8s.io",
                resource: "leases",
                subresource: None,
                namespace: "ns",
                name: "l",
            },
        );
        assert_eq!(
            e.message,
            "leases.coordination.k8s.io \"l\" is forbidden: User \"u\" cannot get resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"ns\""
        );
    }
}
