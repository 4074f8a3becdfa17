//! The local "kubelet": turns the YAML a user applies into what a cluster would report.
//!
//! A Pod gets scheduled (its `spec.nodeName`, or round-robin), a network namespace and IPs
//! from the testbed, its containers' commands started inside that namespace, and then
//! `status.podIP(s)` and the `mesh.local/netns` annotation written back. A Service without a
//! ClusterIP gets one. Everything else passes through untouched. Owns only this rewriting; the
//! processes and namespaces belong to the caller.

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

/// One Pod document a render found.
#[derive(Clone, Debug)]
pub struct PodDoc {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    /// One argv per container (command followed by args).
    pub containers: Vec<Vec<String>>,
}

/// Parses a multi-document YAML file into documents (empty ones dropped).
pub fn parse_docs(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let v = Value::deserialize(de).map_err(|e| anyhow::anyhow!("document {}: {e}", i + 1))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
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
    let mut containers = Vec::new();
    if let Some(Value::Sequence(cs)) = doc.get("spec").and_then(|s| s.get("containers")) {
        for c in cs {
            let mut argv: Vec<String> = Vec::new();
            for key in ["command", "args"] {
                if let Some(Value::Sequence(items)) = c.get(key) {
                    argv.extend(items.iter().filter_map(|v| v.as_str().map(str::to_string)));
                }
            }
            if !argv.is_empty() {
                containers.push(argv);
            }
        }
    }
    Ok(PodDoc {
        namespace: namespace.to_string(),
        name: name.to_string(),
        node,
        containers,
    })
}

fn mapping_at<'a>(doc: &'a mut Value, key: &str) -> &'a mut Mapping {
    let m = doc.as_mapping_mut().expect("documents are mappings");
    let entry = m
        .entry(Value::from(key))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if !entry.is_mapping() {
        *entry = Value::Mapping(Mapping::new());
    }
    entry.as_mapping_mut().expect("just made a mapping")
}

/// Writes a scheduled pod's node, IPs and netns back into its document.
pub fn set_pod_status(doc: &mut Value, node: &str, ips: &[String], netns: &str) {
    mapping_at(doc, "spec").insert("nodeName".into(), node.into());
    let meta = mapping_at(doc, "metadata");
    let ann = meta
        .entry("annotations".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if let Some(a) = ann.as_mapping_mut() {
        a.insert(meshcore::NETNS_ANNOTATION.into(), netns.into());
    }
    let status = mapping_at(doc, "status");
    status.insert("phase".into(), "Running".into());
    if let Some(first) = ips.first() {
        status.insert("podIP".into(), first.as_str().into());
    }
    let list: Vec<Value> = ips
        .iter()
        .map(|ip| {
            let mut m = Mapping::new();
            m.insert("ip".into(), ip.as_str().into());
            Value::Mapping(m)
        })
        .collect();
    status.insert("podIPs".into(), Value::Sequence(list));
}

/// Gives a Service without `spec.clusterIP` the VIPs supplied.
pub fn assign_cluster_ips(doc: &mut Value, vips: &[String]) {
    let spec = mapping_at(doc, "spec");
    if spec.get("clusterIP").and_then(Value::as_str).is_some() {
        return;
    }
    if let Some(first) = vips.first() {
        spec.insert("clusterIP".into(), first.as_str().into());
    }
    spec.insert(
        "clusterIPs".into(),
        Value::Sequence(vips.iter().map(|v| v.as_str().into()).collect()),
    );
}
