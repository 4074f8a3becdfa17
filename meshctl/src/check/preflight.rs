//! Pre-flight facts of the cluster, through the API: every node's kernel
//! (`status.nodeInfo.kernelVersion`), the CNI in use (its DaemonSets and ConfigMaps) and its
//! known conflicts with ambient capture (Cilium's socket load balancer outside the host
//! namespace, Cilium's exclusive CNI mode), and Istio already installed (istiod, istio-cni or
//! Istio's ztunnel; Istio's CRDs alone are fine: the mesh reads them). Owns only these
//! judgements; reads, never writes.

use serde_json::Value;

use super::host::{MIN_KERNEL, parse_kernel};
use crate::backend::str_at;
use crate::cluster::{Cluster, ClusterError};
use crate::manifests::{Manifests, is_ours};
use crate::report::Report;

/// DaemonSet name fragments of CNIs we recognise, and the name we report.
const CNIS: &[(&str, &str)] = &[
    ("cilium", "Cilium"),
    ("calico-node", "Calico"),
    ("canal", "Canal (Calico + Flannel)"),
    ("flannel", "Flannel"),
    ("weave-net", "Weave Net"),
    ("kube-router", "kube-router"),
    ("aws-node", "Amazon VPC CNI"),
    ("antrea-agent", "Antrea"),
    ("kindnet", "kindnet"),
    ("kube-ovn", "Kube-OVN"),
];

fn name(o: &Value) -> &str {
    str_at(o, &["metadata", "name"]).unwrap_or("")
}

fn namespace(o: &Value) -> &str {
    str_at(o, &["metadata", "namespace"]).unwrap_or("")
}

pub fn check(
    cluster: &Cluster,
    manifests: &Manifests,
    report: &mut Report,
) -> Result<(), ClusterError> {
    nodes(cluster, report)?;
    let daemonsets = cluster.list("apps/v1", "DaemonSet", None, None)?;
    cni(cluster, &daemonsets, report)?;
    istio(cluster, manifests, &daemonsets, report)
}

fn nodes(cluster: &Cluster, report: &mut Report) -> Result<(), ClusterError> {
    let nodes = cluster.list("v1", "Node", None, None)?;
    if nodes.is_empty() {
        report.warn("the cluster has no nodes yet", None);
        return Ok(());
    }
    let (major, minor) = MIN_KERNEL;
    let mut old = Vec::new();
    for n in &nodes {
        let release = str_at(n, &["status", "nodeInfo", "kernelVersion"]).unwrap_or("");
        match parse_kernel(release) {
            Some(v) if v >= MIN_KERNEL => {}
            _ => old.push(format!(
                "{} ({})",
                name(n),
                if release.is_empty() {
                    "unknown"
                } else {
                    release
                }
            )),
        }
    }
    if old.is_empty() {
        report.pass(format!(
            "kernel ≥ {major}.{minor} on all {} nodes",
            nodes.len()
        ));
    } else {
        report.fail(
            format!("nodes with a kernel older than {major}.{minor}: {}", old.join(", ")),
            format!("upgrade those nodes' kernels to {major}.{minor} or newer (eBPF capture), or run ztunnel with --capture nftables"),
        );
    }
    Ok(())
}

fn cni(cluster: &Cluster, daemonsets: &[Value], report: &mut Report) -> Result<(), ClusterError> {
    let mut found = Vec::new();
    for ds in daemonsets {
        if let Some((_, cni)) = CNIS.iter().find(|(frag, _)| name(ds).contains(frag)) {
            found.push((*cni, ds));
        }
    }
    if found.is_empty() {
        // kube-system ConfigMaps betray a CNI whose DaemonSet has another name.
        let cms = cluster.list("v1", "ConfigMap", Some("kube-system"), None)?;
        let hint = cms
            .iter()
            .map(name)
            .find(|n| ["cilium-config", "calico-config", "kube-flannel-cfg"].contains(n));
        match hint {
            Some(cm) => report.warn(
                format!("CNI not found among DaemonSets, but ConfigMap kube-system/{cm} exists"),
                Some("make sure the CNI's agents run on every node".into()),
            ),
            None => report.warn(
                "CNI not recognised (no DaemonSet of Cilium, Calico, Flannel, Weave, kube-router, Amazon VPC CNI, Antrea, kindnet, Kube-OVN)",
                Some("the mesh chains after any CNI 1.0 plugin, but coexistence with this one is untested".into()),
            ),
        }
    } else {
        let names: Vec<String> = found
            .iter()
            .map(|(cni, ds)| format!("{cni} (DaemonSet {}/{})", namespace(ds), name(ds)))
            .collect();
        report.pass(format!("CNI: {}", names.join(", ")));
    }
    for (cni, ds) in &found {
        if *cni == "Cilium" && name(ds) == "cilium" {
            cilium(cluster, namespace(ds), report)?;
        }
    }
    Ok(())
}

/// Cilium's settings that break ambient capture (Istio's "Platform prerequisites"; Cilium's
/// "Integration with Istio").
fn cilium(cluster: &Cluster, ns: &str, report: &mut Report) -> Result<(), ClusterError> {
    let Some(cm) = cluster.get("v1", "ConfigMap", Some(ns), "cilium-config")? else {
        report.warn(
            format!("Cilium runs but ConfigMap {ns}/cilium-config was not found: its socket load balancer and exclusive mode could not be checked"),
            Some("check by hand: cilium-config bpf-lb-sock-hostns-only must be \"true\" and cni-exclusive \"false\"".into()),
        );
        return Ok(());
    };
    let key = |k: &str| {
        cm.pointer(&format!("/data/{k}"))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    // The socket LB is on with kube-proxy replacement or bpf-lb-sock; in pods it translates
    // Service addresses in connect() before the mesh sees the original destination.
    let sock_lb =
        key("bpf-lb-sock") == "true" || matches!(key("kube-proxy-replacement"), "true" | "strict");
    if sock_lb && key("bpf-lb-sock-hostns-only") != "true" {
        report.fail(
            "Cilium's socket load balancer runs in pods' namespaces (cilium-config bpf-lb-sock-hostns-only is not \"true\"): it rewrites Service addresses before the mesh captures them",
            "helm upgrade cilium cilium/cilium -n ".to_string() + ns + " --reuse-values --set socketLB.hostNamespaceOnly=true, then kubectl -n " + ns + " rollout restart ds/cilium",
        );
    } else {
        report.pass("Cilium's socket load balancer stays in the host namespace (or is off)");
    }
    if key("cni-exclusive") == "true" {
        report.fail(
            "Cilium runs as the exclusive CNI (cilium-config cni-exclusive: \"true\"): it removes other CNI configurations, mesh-cni's included",
            format!("helm upgrade cilium cilium/cilium -n {ns} --reuse-values --set cni.exclusive=false, then kubectl -n {ns} rollout restart ds/cilium"),
        );
    } else {
        report.pass("Cilium leaves other CNI plugins in the chain (cni-exclusive is not \"true\")");
    }
    Ok(())
}

fn istio(
    cluster: &Cluster,
    manifests: &Manifests,
    daemonsets: &[Value],
    report: &mut Report,
) -> Result<(), ClusterError> {
    let ours = |o: &Value| namespace(o) == manifests.namespace;
    let deployments = cluster.list("apps/v1", "Deployment", None, None)?;
    let mut found: Vec<String> = deployments
        .iter()
        .filter(|d| !ours(d) && name(d).starts_with("istiod"))
        .map(|d| format!("Deployment {}/{}", namespace(d), name(d)))
        .collect();
    found.extend(
        daemonsets
            .iter()
            .filter(|d| !ours(d) && matches!(name(d), "istio-cni-node" | "ztunnel"))
            .map(|d| format!("DaemonSet {}/{}", namespace(d), name(d))),
    );
    if found.is_empty() {
        report.pass("Istio's control plane, CNI agent and ztunnel are not installed");
    } else {
        report.fail(
            format!("Istio is installed: {}", found.join(", ")),
            "two meshes must not capture the same pods: uninstall Istio's ambient components first (istioctl uninstall --purge, or helm uninstall ztunnel istio-cni istiod), keeping its CRDs if you like",
        );
    }
    let crds = cluster.list(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        None,
        None,
    )?;
    let istio_crds = crds
        .iter()
        .filter(|c| name(c).ends_with(".istio.io"))
        .filter(|c| {
            !manifests
                .crds()
                .any(|r| name(r) == name(c) && is_ours(c, r))
        })
        .count();
    if istio_crds > 0 {
        report.warn(
            format!("Istio's CRDs are installed ({istio_crds}): the mesh uses them and meshctl install leaves them as they are"),
            None,
        );
    }
    Ok(())
}
