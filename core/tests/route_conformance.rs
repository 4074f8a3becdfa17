//! Every route in the Gateway API mesh conformance suite (v1.6.1, its YAML inputs kept under
//! tests/conformance/) compiles against the suite's Services with no Error and no field we do
//! not implement: the engine accepts what the suite applies. Behaviour per case is in route.rs.

use std::path::PathBuf;

use meshcore::manifest::parse_docs;
use meshcore::route::{PortInfo, RouteResourceRef, ServiceInfo, Severity, compile};
use serde_json::Value;

fn suite_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance/gateway-api-v1.6.1")
}

fn docs(path: &PathBuf) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the suite's inputs live in tests/conformance/)",
            path.display()
        )
    });
    parse_docs(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter().fold(v, |v, k| &v[k]).as_str().unwrap_or("")
}

#[test]
fn every_mesh_conformance_route_compiles_cleanly() {
    let dir = suite_dir();
    let services: Vec<ServiceInfo> = docs(&dir.join("mesh/manifests.yaml"))
        .iter()
        .filter(|d| d["kind"] == "Service")
        .map(|d| {
            let (ns, name) = (
                str_at(d, &["metadata", "namespace"]),
                str_at(d, &["metadata", "name"]),
            );
            let ports = d["spec"]["ports"].as_array().cloned().unwrap_or_default();
            ServiceInfo {
                key: format!("{ns}/{name}"),
                name: name.into(),
                namespace: ns.into(),
                hostname: format!("{name}.{ns}.svc.cluster.local"),
                ports: ports
                    .iter()
                    .map(|p| PortInfo {
                        port: p["port"].as_u64().unwrap_or(0) as u16,
                        name: str_at(p, &["name"]).into(),
                        app_protocol: String::new(),
                    })
                    .collect(),
            }
        })
        .collect();
    assert!(services.len() >= 3, "the suite's Services: {services:?}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("tests/mesh"))
        .expect("tests/mesh")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "{files:?}");
    let mut routes = 0;
    for file in files {
        let docs = docs(&file);
        let refs: Vec<RouteResourceRef<'_>> = docs
            .iter()
            .enumerate()
            .filter(|(_, d)| matches!(d["kind"].as_str(), Some("HTTPRoute" | "GRPCRoute")))
            .map(|(i, d)| RouteResourceRef {
                kind: d["kind"].as_str().unwrap_or(""),
                namespace: d["metadata"]["namespace"].as_str().unwrap_or("default"),
                name: d["metadata"]["name"].as_str().unwrap_or(""),
                spec: &d["spec"],
                generation_order: i as i64,
            })
            .collect();
        routes += refs.len();
        let (_, diags) = compile(&refs, &services, "cluster.local");
        let bad: Vec<_> = diags
            .iter()
            .filter(|d| matches!(d.severity, Severity::Error | Severity::Unsupported))
            .collect();
        assert!(bad.is_empty(), "{}: {bad:#?}", file.display());
    }
    assert!(routes >= 15, "read {routes} routes");
}
