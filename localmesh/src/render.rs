//! The local "kubelet": turns the YAML a user applies into what a cluster would report.
//!
//! A Pod gets scheduled (its `spec.nodeName`, or round-robin), a network namespace and IPs
//! from the testbed, its containers' commands started inside that namespace, and then
//! `status.podIP(s)` and the `mesh.local/netns` annotation written back. A Service without a
//! ClusterIP gets one. Everything else passes through untouched. Owns only this rewriting,
//! reading the user's YAML (under the same budgets as meshd, [`meshcore::manifest`]) and
//! writing the result back as YAML for meshd; the processes and namespaces belong to the caller.

use serde_json::{Map, Value};

/// One Pod document a render found.
#[derive(Clone, Debug)]
pub struct PodDoc {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    /// `spec.serviceAccountName` (Kubernetes' default: "default").
    pub service_account: String,
    /// One argv per container that runs ([`argv`]).
    pub containers: Vec<Vec<String>>,
}

/// Parses a multi-document YAML (or JSON) file into documents (empty ones dropped). `file`
/// names the file in errors. An alias bomb, deep nesting or an oversized file is an error here,
/// as it is in meshd, instead of costing unbounded memory.
pub fn parse_docs(file: &str, yaml: &str) -> anyhow::Result<Vec<Value>> {
    let size = u64::try_from(yaml.len()).unwrap_or(u64::MAX);
    if size > meshcore::manifest::MAX_FILE_BYTES {
        anyhow::bail!(
            "{file}: {size} bytes is over the {} MiB limit for a manifest file",
            meshcore::manifest::MAX_FILE_BYTES >> 20
        );
    }
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(yaml, meshcore::manifest::yaml_options())
            .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    Ok(docs.into_iter().filter(|v| !v.is_null()).collect())
}

/// Writes documents as one YAML stream, each after a `---`, for meshd to read. Strings that a
/// YAML reader could take for another type (`yes`, `0755`, `null`) are quoted.
pub fn to_yaml(docs: &[Value]) -> anyhow::Result<String> {
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(doc)?);
    }
    Ok(out)
}

pub fn kind(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or("")
}

pub fn str_at<'a>(doc: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = doc;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_str()
}

/// Reads what scheduling needs from a Pod document.
pub fn pod_doc(doc: &Value) -> anyhow::Result<PodDoc> {
    let name = str_at(doc, &["metadata", "name"])
        .ok_or_else(|| anyhow::anyhow!("Pod without metadata.name"))?;
    let namespace = str_at(doc, &["metadata", "namespace"]).unwrap_or("default");
    let node = str_at(doc, &["spec", "nodeName"]).map(str::to_string);
    let service_account = str_at(doc, &["spec", "serviceAccountName"])
        .or(str_at(doc, &["spec", "serviceAccount"]))
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let mut containers = Vec::new();
    if let Some(Value::Array(cs)) = doc.get("spec").and_then(|s| s.get("containers")) {
        for c in cs {
            match argv(c) {
                Some(argv) => containers.push(argv),
                None => {
                    let container = c.get("name").and_then(Value::as_str).unwrap_or("");
                    tracing::warn!(
                        "pod {namespace}/{name}: container {container:?} has no command and no known image: local mode has no images, so it runs nothing"
                    );
                }
            }
        }
    }
    Ok(PodDoc {
        namespace: namespace.to_string(),
        name: name.to_string(),
        node,
        service_account: service_account.to_string(),
        containers,
    })
}

/// What a container runs: its `command` and `args`, or for an image local mode knows (the
/// Gateway API conformance echo server), the local program and the `args`. `None`: nothing
/// runs (local mode has no images).
pub fn argv(container: &Value) -> Option<Vec<String>> {
    let strings = |key: &str| -> Vec<String> {
        container
            .get(key)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut argv = strings("command");
    if argv.is_empty() {
        let image = container.get("image").and_then(Value::as_str)?;
        argv = image_entrypoint(image)?
            .iter()
            .map(|s| s.to_string())
            .collect();
    }
    argv.extend(strings("args"));
    Some(argv)
}

/// The local stand-in for an image's entrypoint, by repository (tag and digest ignored).
fn image_entrypoint(image: &str) -> Option<&'static [&'static str]> {
    let repo = image.split('@').next().unwrap_or(image);
    let repo = match repo.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => repo,
    };
    repo.ends_with("gateway-api/echo-advanced")
        .then_some(&["mesh-echo", "echo-advanced"][..])
}

/// The mapping under `key` in document `doc`, made one if absent or not a mapping. `None` only
/// if the document itself is not a mapping (callers have matched its `kind`, so it is).
fn mapping_at<'a>(doc: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    let entry = doc
        .as_object_mut()?
        .entry(key)
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut()
}

/// Sets `metadata.uid` (the kubelet's pod UID, which the CNI chain is given as K8S_POD_UID).
pub fn set_pod_uid(doc: &mut Value, uid: &str) {
    if let Some(meta) = mapping_at(doc, "metadata") {
        meta.insert("uid".into(), uid.into());
    }
}

/// Writes a scheduled pod's node, IPs and netns back into its document.
pub fn set_pod_status(doc: &mut Value, node: &str, ips: &[String], netns: &str) {
    if let Some(spec) = mapping_at(doc, "spec") {
        spec.insert("nodeName".into(), node.into());
    }
    if let Some(meta) = mapping_at(doc, "metadata") {
        let ann = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(a) = ann.as_object_mut() {
            a.insert(meshcore::NETNS_ANNOTATION.into(), netns.into());
        }
    }
    let Some(status) = mapping_at(doc, "status") else {
        return;
    };
    status.insert("phase".into(), "Running".into());
    if let Some(first) = ips.first() {
        status.insert("podIP".into(), first.as_str().into());
    }
    let list: Vec<Value> = ips
        .iter()
        .map(|ip| serde_json::json!({ "ip": ip }))
        .collect();
    status.insert("podIPs".into(), Value::Array(list));
}

/// Gives a Service without `spec.clusterIP` the VIPs supplied.
pub fn assign_cluster_ips(doc: &mut Value, vips: &[String]) {
    let Some(spec) = mapping_at(doc, "spec") else {
        return;
    };
    if spec.get("clusterIP").and_then(Value::as_str).is_some() {
        return;
    }
    if let Some(first) = vips.first() {
        spec.insert("clusterIP".into(), first.as_str().into());
    }
    spec.insert(
        "clusterIPs".into(),
        Value::Array(vips.iter().map(|v| v.as_str().into()).collect()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbed::child::{limit_address_space, peak_rss_kib, run_child_test, yaml_alias_bomb};

    #[test]
    fn rendered_docs_read_back_unchanged_with_ambiguous_strings_quoted() {
        let user = "\
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {on: yes, mode: 0755, n: 1_000, e: '1e3', nul: 'null', t: '~', d: '---', c: 'a: b', h: '# x', empty: ''}
spec:
  containers: [{name: c, command: [mesh-echo, serve], args: ['--port', '8080', \"multi\\nline\"]}]
---
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: pa}
spec: {portLevelMtls: {8080: {mode: DISABLE}}}
";
        let mut docs = parse_docs("u.yaml", user).unwrap();
        assert_eq!(docs.len(), 3, "the empty document is dropped");
        set_pod_status(
            &mut docs[0],
            "node-1",
            &["10.0.0.5".into(), "fd00::5".into()],
            "/run/netns/x",
        );
        assign_cluster_ips(&mut docs[1], &["10.96.0.1".into(), "fd00:96::1".into()]);
        let text = to_yaml(&docs).unwrap();
        assert!(text.starts_with("---\n"), "{text}");
        let back = parse_docs("rendered.yaml", &text).unwrap();
        assert_eq!(back, docs, "{text}");
        assert_eq!(str_at(&back[0], &["metadata", "labels", "on"]), Some("yes"));
        assert_eq!(
            str_at(&back[0], &["metadata", "labels", "mode"]),
            Some("0755")
        );
        assert_eq!(str_at(&back[0], &["status", "podIP"]), Some("10.0.0.5"));
        assert_eq!(str_at(&back[1], &["spec", "clusterIP"]), Some("10.96.0.1"));
        assert_eq!(
            str_at(&back[2], &["spec", "portLevelMtls", "8080", "mode"]),
            Some("DISABLE"),
            "a port number key reads as the string meshd looks up"
        );
        let pod = pod_doc(&back[0]).unwrap();
        assert_eq!(pod.node.as_deref(), Some("node-1"));
        assert_eq!(
            pod.containers,
            vec![vec!["mesh-echo", "serve", "--port", "8080", "multi\nline"]]
        );
    }

    #[test]
    fn containers_run_their_command_or_a_known_image() {
        let c = |v: serde_json::Value| argv(&v);
        assert_eq!(
            c(serde_json::json!({"command": ["mesh-echo", "serve"], "args": ["--port", "1"]})),
            Some(vec![
                "mesh-echo".into(),
                "serve".into(),
                "--port".into(),
                "1".into()
            ])
        );
        assert_eq!(
            c(
                serde_json::json!({"image": "registry.k8s.io/gateway-api/echo-advanced:v1.5.1", "args": ["--port=8080"]})
            ),
            Some(vec![
                "mesh-echo".into(),
                "echo-advanced".into(),
                "--port=8080".into()
            ])
        );
        assert_eq!(
            c(serde_json::json!({"image": "localhost:5000/gateway-api/echo-advanced"}))
                .map(|a| a.len()),
            Some(2)
        );
        assert_eq!(
            c(serde_json::json!({"image": "nginx:1.27", "args": ["-g"]})),
            None
        );
        assert_eq!(c(serde_json::json!({"args": ["x"]})), None);
    }

    /// Run by the test below, alone in a child process whose address space is capped at 1 GiB,
    /// so that a regression fails the test instead of exhausting the shared machine's memory.
    #[test]
    #[ignore = "run by alias_bomb_is_an_error_naming_the_file in a memory-limited child"]
    fn alias_bomb_child() {
        limit_address_space(1 << 30);
        let text = yaml_alias_bomb("Pod");
        assert!(text.len() < 6000, "{}", text.len());
        let before = peak_rss_kib();
        let started = std::time::Instant::now();
        let result = parse_docs("bomb.yaml", &text);
        let took = started.elapsed();
        let grew_kib = peak_rss_kib().saturating_sub(before);
        println!("alias bomb: {took:?}, peak RSS +{grew_kib} KiB");
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.starts_with("bomb.yaml: ") && err.contains("alias"),
            "{err}"
        );
        assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
        assert!(grew_kib < 100 * 1024, "peak RSS grew {grew_kib} KiB");
    }

    #[test]
    fn alias_bomb_is_an_error_naming_the_file() {
        run_child_test("render::tests::alias_bomb_child");
    }

    #[test]
    fn oversized_file_is_an_error_naming_the_file() {
        let mut huge = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n");
        while huge.len() as u64 <= meshcore::manifest::MAX_FILE_BYTES {
            huge.push_str("# padding padding padding padding padding padding padding padding\n");
        }
        let err = parse_docs("huge.yaml", &huge).unwrap_err().to_string();
        assert!(
            err.starts_with("huge.yaml: ") && err.contains("4 MiB"),
            "{err}"
        );
    }
}
