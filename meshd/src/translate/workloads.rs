//! Pods and Services as the data plane sees them: a pod's Workload (enrollment by labels,
//! addresses, identity) and a Service's ports and endpoints (selected pods, named target ports
//! resolved per pod). Owns those meanings; waypoint bindings are filled in later by
//! [`super::translate_ordered`].

use meshcore::proto::config::{Endpoint, Service, ServicePort, Workload};

use super::{DATAPLANE_MODE_LABEL, Settings};
use crate::resources::{self, IntOrString, Pod, ResourceSet};

/// Ambient enrollment: namespace opted in, pod not opted out, and not sharing the node's
/// network (a hostNetwork pod's traffic is the node's, which the mesh must not capture).
pub fn is_captured(res: &ResourceSet, pod: &Pod) -> bool {
    let ns_label = res
        .namespaces
        .get(pod.metadata.ns())
        .and_then(|n| n.metadata.labels.get(DATAPLANE_MODE_LABEL));
    meshcore::enrollment::is_ambient(
        ns_label.map(String::as_str),
        pod.metadata
            .labels
            .get(DATAPLANE_MODE_LABEL)
            .map(String::as_str),
        pod.spec.host_network,
    )
}

pub(super) fn workload(res: &ResourceSet, pod: &Pod, settings: &Settings) -> Option<Workload> {
    let ips = pod.ips();
    if ips.is_empty() {
        return None; // not running yet: nothing can address it
    }
    let m = &pod.metadata;
    Some(Workload {
        uid: format!("{}/{}", m.ns(), m.name),
        name: m.name.clone(),
        namespace: m.ns().to_string(),
        service_account: pod.service_account().to_string(),
        node: pod.spec.node_name.clone().unwrap_or_default(),
        ips,
        labels: m.labels.clone().into_iter().collect(),
        captured: is_captured(res, pod),
        netns: m
            .annotations
            .get(meshcore::NETNS_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
        trust_domain: settings.trust_domain.clone(),
        annotations: m.annotations.clone().into_iter().collect(),
        waypoint: None,
        workload_name: pod.workload_name(),
    })
}

pub(super) fn service(res: &ResourceSet, svc: &resources::Service, settings: &Settings) -> Service {
    let m = &svc.metadata;
    let ports: Vec<&resources::ServicePort> = svc
        .spec
        .ports
        .iter()
        .filter(|p| resources::is_tcp(p.protocol.as_deref()))
        .collect();
    let proto_ports = ports
        .iter()
        .map(|p| ServicePort {
            port: u32::from(p.port),
            target_port: match p.target() {
                IntOrString::Int(t) => u32::from(t),
                IntOrString::Str(_) => 0,
            },
            name: p.name.clone().unwrap_or_default(),
            app_protocol: p.app_protocol.clone().unwrap_or_default(),
        })
        .collect();
    let endpoints = selected_pods(res, svc)
        .map(|pod| Endpoint {
            workload_uid: format!("{}/{}", pod.metadata.ns(), pod.metadata.name),
            ports: ports
                .iter()
                .filter_map(|p| {
                    let target = match p.target() {
                        IntOrString::Int(t) => Some(t),
                        IntOrString::Str(name) => resolve_named(pod, &name),
                    };
                    target.map(|t| (u32::from(p.port), u32::from(t)))
                })
                .collect(),
        })
        .collect();
    Service {
        key: format!("{}/{}", m.ns(), m.name),
        name: m.name.clone(),
        namespace: m.ns().to_string(),
        hostname: format!("{}.{}.svc.{}", m.name, m.ns(), settings.cluster_domain),
        vips: svc.vips(),
        ports: proto_ports,
        endpoints,
        waypoint: None,
    }
}

/// A numeric string is accepted as a number; anything else names a container port.
fn resolve_named(pod: &Pod, name: &str) -> Option<u16> {
    name.parse::<u16>().ok().or_else(|| pod.named_port(name))
}

/// Running pods with addresses in the Service's namespace carrying every selector label. No or
/// an empty selector selects nothing, as in Kubernetes (such endpoints are managed by hand).
fn selected_pods<'a>(
    res: &'a ResourceSet,
    svc: &'a resources::Service,
) -> impl Iterator<Item = &'a Pod> + 'a {
    let selector = svc.spec.selector.as_ref().filter(|s| !s.is_empty());
    res.pods.values().filter(move |pod| {
        let Some(sel) = selector else { return false };
        pod.metadata.ns() == svc.metadata.ns()
            && !pod.is_terminal()
            && !pod.ips().is_empty()
            && sel
                .iter()
                .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::tests::view;

    const PODS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: in, namespace: amb, labels: {app: a}, annotations: {mesh.local/netns: /run/netns/in}}
spec: {nodeName: n1, serviceAccountName: sa1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: out, namespace: amb, labels: {app: a, istio.io/dataplane-mode: none}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: amb}
spec: {nodeName: n1, hostNetwork: true}
status: {podIP: 192.168.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: plain}
spec: {nodeName: n2}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: amb}
spec: {nodeName: n2, serviceAccountName: late}
---
apiVersion: v1
kind: Pod
metadata: {name: v6, namespace: amb}
spec: {nodeName: n2}
status: {podIP: 10.0.0.4, podIPs: [{ip: 10.0.0.4}, {ip: 'fd00::4'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: v6only, namespace: amb}
status: {podIPs: [{ip: 'fd00::5'}]}
";

    #[test]
    fn workload_names_follow_istio() {
        let v = view(
            "
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f8c6b5d-x2v4k
  labels: {pod-template-hash: 7d9f8c6b5d}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f8c6b5d, controller: true}]
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, controller: true}]
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: odd-abc
  labels: {pod-template-hash: other}
  ownerReferences: [{kind: ReplicaSet, name: odd-rs, controller: true}]
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: bare}
status: {podIP: 10.0.0.4}
",
        );
        let name = |k: &str| v.workloads[k].workload_name.clone();
        assert_eq!(name("default/web-7d9f8c6b5d-x2v4k"), "web");
        assert_eq!(name("default/db-0"), "db");
        // A ReplicaSet not named after the hash is not a Deployment's: its own name.
        assert_eq!(name("default/odd-abc"), "odd-rs");
        assert_eq!(name("default/bare"), "bare");
    }

    #[test]
    fn enrollment() {
        let v = view(PODS);
        let w = &v.workloads["amb/in"];
        assert!(w.captured);
        assert_eq!(
            (
                w.service_account.as_str(),
                w.node.as_str(),
                w.netns.as_str()
            ),
            ("sa1", "n1", "/run/netns/in")
        );
        assert_eq!(w.trust_domain, "td.example");
        assert_eq!(w.ips, vec!["10.0.0.1"]);
        assert!(!v.workloads["amb/out"].captured, "pod opt-out");
        assert!(!v.workloads["amb/host"].captured, "hostNetwork");
        assert!(
            !v.workloads["plain/legacy"].captured,
            "namespace not ambient"
        );
        assert!(!v.workloads.contains_key("amb/pending"), "no IP yet");
        assert!(v.identities_by_node["n2"].contains(&("amb".to_string(), "late".to_string())));
    }

    #[test]
    fn ipv6_pod_ips() {
        let v = view(PODS);
        assert_eq!(v.workloads["amb/v6"].ips, vec!["10.0.0.4", "fd00::4"]);
        assert_eq!(v.workloads["amb/v6only"].ips, vec!["fd00::5"]);
        assert_eq!(v.workloads["amb/v6only"].node, "");
    }

    #[test]
    fn service_endpoints_numeric_and_named_ports() {
        let yaml = "
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: s, labels: {app: web, tier: x}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: p2, namespace: s, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: other, containerPort: 9000}]}]}
status: {podIPs: [{ip: 'fd00::2'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: noip, namespace: s, labels: {app: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: t, labels: {app: web}}
status: {podIP: 10.1.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: s}
spec:
  clusterIPs: [10.96.0.1, 'fd00:96::1']
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: admin, port: 81, targetPort: 9090}
  - {name: same, port: 82}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: s}
spec: {clusterIP: None, ports: [{port: 1}]}
";
        let v = view(yaml);
        let s = &v.services["s/web"];
        assert_eq!(s.hostname, "web.s.svc.cluster.local");
        assert_eq!(s.vips, vec!["10.96.0.1", "fd00:96::1"]);
        let ports: Vec<(u32, u32, &str)> = s
            .ports
            .iter()
            .map(|p| (p.port, p.target_port, p.name.as_str()))
            .collect();
        assert_eq!(
            ports,
            vec![(80, 0, "http"), (81, 9090, "admin"), (82, 82, "same")]
        );
        let eps: BTreeMap<&str, BTreeMap<u32, u32>> = s
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.workload_uid.as_str(),
                    e.ports.clone().into_iter().collect(),
                )
            })
            .collect();
        assert_eq!(eps.len(), 2, "{eps:?}");
        assert_eq!(
            eps["s/p1"],
            BTreeMap::from([(80, 8080), (81, 9090), (82, 82)])
        );
        assert_eq!(
            eps["s/p2"],
            BTreeMap::from([(81, 9090), (82, 82)]),
            "no entry for a named port it lacks"
        );
        let headless = &v.services["s/headless"];
        assert!(headless.vips.is_empty() && headless.endpoints.is_empty());
    }
}
