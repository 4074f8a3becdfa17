//! Manifest builders shared by the end-to-end tests: each returns one YAML document (starting
//! with `---`), so a test concatenates what it needs and applies it as one file.

/// A Namespace, in the mesh (`istio.io/dataplane-mode: ambient`) or not.
pub fn namespace(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    format!(
        "\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n"
    )
}

/// A Pod on node `node` with service account `sa` whose one container runs `command` (none:
/// a pod without a process).
pub fn pod(ns: &str, name: &str, node: usize, sa: &str, command: &[&str]) -> String {
    let containers = if command.is_empty() {
        "[]".to_string()
    } else {
        let argv: Vec<String> = command.iter().map(|a| format!("{a:?}")).collect();
        format!("[{{name: main, command: [{}]}}]", argv.join(", "))
    };
    pod_with(ns, name, node, sa, &containers)
}

/// A Pod running `mesh-echo serve` on `ports`, each declared as a container port (the first
/// named `http`, for Services' `targetPort: http`).
pub fn echo_pod(ns: &str, name: &str, node: usize, sa: &str, ports: &[u16]) -> String {
    let mut argv = vec!["\"mesh-echo\"".to_string(), "\"serve\"".to_string()];
    let mut declared = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        argv.extend(["\"--port\"".to_string(), format!("\"{p}\"")]);
        let port_name = if i == 0 {
            "http".to_string()
        } else {
            format!("port-{p}")
        };
        declared.push(format!("{{name: {port_name}, containerPort: {p}}}"));
    }
    let containers = format!(
        "[{{name: echo, command: [{}], ports: [{}]}}]",
        argv.join(", "),
        declared.join(", ")
    );
    pod_with(ns, name, node, sa, &containers)
}

fn pod_with(ns: &str, name: &str, node: usize, sa: &str, containers: &str) -> String {
    format!(
        "\n---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\n\
         spec:\n  nodeName: node-{node}\n  serviceAccountName: {sa}\n  containers: {containers}\n"
    )
}
