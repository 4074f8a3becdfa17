//! Discovery in the legacy JSON forms kubectl falls back to (APIVersions, APIGroupList,
//! APIGroup, APIResourceList), `/version`, and the root path list. Reads the kind registry;
//! answers nothing else (no aggregated discovery, no OpenAPI).

use serde_json::{Value, json};

use super::kinds::Registry;

pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0",
        "gitCommit": "testbed-kubeapi",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub(crate) fn root_paths() -> Value {
    json!({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]})
}

pub(crate) fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
    })
}

fn group_entry(reg: &Registry, group: &str) -> Option<Value> {
    let gvs = reg.group_versions();
    let versions = gvs.get(group)?;
    let preferred = reg.preferred_version(group)?;
    let gv = |v: &str| json!({"groupVersion": format!("{group}/{v}"), "version": v});
    // Preferred first, as the real server lists them.
    let mut list = vec![gv(&preferred)];
    list.extend(versions.keys().filter(|v| **v != preferred).map(|v| gv(v)));
    Some(json!({
        "name": group,
        "versions": list,
        "preferredVersion": gv(&preferred),
    }))
}

pub(crate) fn groups(reg: &Registry) -> Value {
    let groups: Vec<Value> = reg
        .group_versions()
        .keys()
        .filter(|g| !g.is_empty())
        .filter_map(|g| group_entry(reg, g))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub(crate) fn group(reg: &Registry, group: &str) -> Option<Value> {
    let mut g = group_entry(reg, group)?;
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

pub(crate) fn resources(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let gvs = reg.group_versions();
    let kinds = gvs.get(group)?.get(version)?;
    let mut resources = Vec::new();
    for k in kinds {
        let mut r = json!({
            "name": k.plural,
            "singularName": k.singular,
            "namespaced": k.namespaced,
            "kind": k.kind,
            "verbs": k.verbs(),
        });
        if !k.short_names.is_empty() {
            r["shortNames"] = json!(k.short_names);
        }
        resources.push(r);
        if k.status {
            resources.push(json!({
                "name": format!("{}/status", k.plural),
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if k.group.is_empty() && k.plural == "serviceaccounts" {
            resources.push(json!({
                "name": "serviceaccounts/token",
                "singularName": "",
                "namespaced": true,
                "group": "authentication.k8s.io",
                "version": "v1",
                "kind": "TokenRequest",
                "verbs": ["create"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}
