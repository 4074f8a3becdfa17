//! Waypoint binding (`istio.io/use-waypoint`): which Services and pods are bound to which
//! waypoint, translated from manifests as a user writes them.

use meshcore::proto::config::{TrustBundle, WaypointBinding};
use meshd::parse::parse_file;
use meshd::resources::ResourceSet;
use meshd::translate::{MeshView, Settings, translate};

fn view(yaml: &str) -> MeshView {
    let mut set = ResourceSet::default();
    for r in parse_file("t.yaml", yaml).unwrap().resources {
        set.insert(r);
    }
    let settings = Settings {
        trust_domain: "td".into(),
        cluster_domain: "cluster.local".into(),
    };
    translate(&set, &settings, &TrustBundle::default())
}

fn gateway(ns: &str, name: &str, waypoint_for: &str, extra: &str) -> String {
    format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {ns}, labels: {{istio.io/waypoint-for: {waypoint_for}}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE{extra}}}]
"
    )
}

/// The waypoint's own Service and a ready pod behind it (what local mode runs).
fn running(ns: &str, name: &str, ip: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}, labels: {{gateway.networking.k8s.io/gateway-name: {name}}}}}
spec:
  clusterIP: 10.96.9.{ip}
  selector: {{gateway.networking.k8s.io/gateway-name: {name}}}
  ports: [{{name: mesh, port: 15008, appProtocol: hbone}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}-pod
  namespace: {ns}
  labels: {{gateway.networking.k8s.io/gateway-name: {name}, istio.io/dataplane-mode: none}}
spec: {{serviceAccountName: {name}}}
status: {{podIP: 10.0.9.{ip}}}
"
    )
}

fn service(ns: &str, name: &str, labels: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}
spec:
  clusterIP: 10.96.1.1
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: 8080, appProtocol: http}}]
"
    )
}

fn pod(ns: &str, name: &str, labels: &str, ip: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}
status: {{podIP: {ip}}}
"
    )
}

fn namespace(name: &str, labels: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Namespace
metadata: {{name: {name}, labels: {{istio.io/dataplane-mode: ambient, {labels}}}}}
"
    )
}

fn usable(gw: &str) -> Option<WaypointBinding> {
    Some(WaypointBinding {
        gateway: gw.into(),
        service: gw.into(),
        unavailable: String::new(),
    })
}

/// The binding's Gateway, or what makes it unusable.
fn svc_binding(v: &MeshView, key: &str) -> Option<(String, String)> {
    let b = v.services[key].waypoint.clone()?;
    Some((b.gateway, b.unavailable))
}

fn wl_binding(v: &MeshView, key: &str) -> Option<(String, String)> {
    let b = v.workloads[key].waypoint.clone()?;
    Some((b.gateway, b.unavailable))
}

#[test]
fn object_label_beats_namespace_label_and_none_opts_out() {
    let yaml = [
        namespace("shop", "istio.io/use-waypoint: ns-wp"),
        gateway("shop", "ns-wp", "all", ""),
        running("shop", "ns-wp", "1"),
        gateway("shop", "svc-wp", "all", ""),
        running("shop", "svc-wp", "2"),
        service("shop", "inherits", ""),
        service("shop", "own", "istio.io/use-waypoint: svc-wp"),
        service("shop", "optout", "istio.io/use-waypoint: none"),
        pod("shop", "p-inherits", "app: x", "10.0.0.1"),
        pod("shop", "p-own", "istio.io/use-waypoint: svc-wp", "10.0.0.2"),
        pod(
            "shop",
            "p-optout",
            "istio.io/use-waypoint: none",
            "10.0.0.3",
        ),
    ]
    .concat();
    let v = view(&yaml);
    assert_eq!(v.services["shop/inherits"].waypoint, usable("shop/ns-wp"));
    assert_eq!(v.services["shop/own"].waypoint, usable("shop/svc-wp"));
    assert_eq!(v.services["shop/optout"].waypoint, None);
    assert_eq!(
        v.workloads["shop/p-inherits"].waypoint,
        usable("shop/ns-wp")
    );
    assert_eq!(v.workloads["shop/p-own"].waypoint, usable("shop/svc-wp"));
    assert_eq!(v.workloads["shop/p-optout"].waypoint, None);
    // The waypoints' own pods and Services never bind, though their namespace says so.
    assert_eq!(v.workloads["shop/ns-wp-pod"].waypoint, None);
    assert_eq!(v.services["shop/ns-wp"].waypoint, None);
    assert!(!v.workloads["shop/ns-wp-pod"].captured);
    // appProtocol reaches the data plane.
    assert_eq!(v.services["shop/own"].ports[0].app_protocol, "http");
}

#[test]
fn waypoint_for_decides_which_traffic_binds() {
    let yaml = [
        namespace("shop", ""),
        gateway("shop", "svc-only", "service", ""),
        running("shop", "svc-only", "1"),
        gateway("shop", "wl-only", "workload", ""),
        running("shop", "wl-only", "2"),
        gateway("shop", "nothing", "none", ""),
        running("shop", "nothing", "3"),
        service("shop", "s-svc", "istio.io/use-waypoint: svc-only"),
        service("shop", "s-wl", "istio.io/use-waypoint: wl-only"),
        service("shop", "s-none", "istio.io/use-waypoint: nothing"),
        pod(
            "shop",
            "p-svc",
            "istio.io/use-waypoint: svc-only",
            "10.0.0.1",
        ),
        pod("shop", "p-wl", "istio.io/use-waypoint: wl-only", "10.0.0.2"),
    ]
    .concat();
    let v = view(&yaml);
    assert_eq!(v.services["shop/s-svc"].waypoint, usable("shop/svc-only"));
    assert_eq!(v.workloads["shop/p-wl"].waypoint, usable("shop/wl-only"));
    // Asked for on the object itself but not for this traffic: unavailable, saying why.
    let (gw, why) = svc_binding(&v, "shop/s-wl").unwrap();
    assert_eq!(gw, "shop/wl-only");
    assert!(
        why.contains("workload traffic") && why.contains("waypoint-for"),
        "{why}"
    );
    let (_, why) = wl_binding(&v, "shop/p-svc").unwrap();
    assert!(why.contains("service traffic"), "{why}");
    let (_, why) = svc_binding(&v, "shop/s-none").unwrap();
    assert!(why.contains("none traffic"), "{why}");

    // Inherited from the namespace, a waypoint for services leaves pods alone (default
    // waypoint-for is service).
    let yaml = [
        namespace("shop", "istio.io/use-waypoint: svc-only"),
        gateway("shop", "svc-only", "service", ""),
        running("shop", "svc-only", "1"),
        service("shop", "s", ""),
        pod("shop", "p", "app: s", "10.0.0.1"),
    ]
    .concat();
    let v = view(&yaml);
    assert_eq!(v.services["shop/s"].waypoint, usable("shop/svc-only"));
    assert_eq!(v.workloads["shop/p"].waypoint, None);
}

#[test]
fn unusable_bindings_say_why() {
    let yaml = [
        namespace("shop", ""),
        namespace("other", ""),
        service("shop", "missing", "istio.io/use-waypoint: ghost"),
        // Exists but nothing runs it yet.
        gateway("shop", "idle", "service", ""),
        service("shop", "s-idle", "istio.io/use-waypoint: idle"),
        // Another namespace's waypoint, which only allows its own namespace (the default).
        gateway("other", "private", "service", ""),
        running("other", "private", "4"),
        service(
            "shop",
            "s-private",
            "istio.io/use-waypoint: private, istio.io/use-waypoint-namespace: other",
        ),
        // And one that allows all namespaces.
        gateway(
            "other",
            "shared",
            "service",
            ", allowedRoutes: {namespaces: {from: All}}",
        ),
        running("other", "shared", "5"),
        service(
            "shop",
            "s-shared",
            "istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: other",
        ),
        // A pod asking for a missing waypoint explicitly.
        pod(
            "shop",
            "p-missing",
            "istio.io/use-waypoint: ghost",
            "10.0.0.1",
        ),
    ]
    .concat();
    let v = view(&yaml);
    let (gw, why) = svc_binding(&v, "shop/missing").unwrap();
    assert_eq!(gw, "shop/ghost");
    assert!(why.contains("no waypoint Gateway shop/ghost"), "{why}");
    let (_, why) = svc_binding(&v, "shop/s-idle").unwrap();
    assert!(why.contains("not running yet"), "{why}");
    let (gw, why) = svc_binding(&v, "shop/s-private").unwrap();
    assert_eq!(gw, "other/private");
    assert!(
        why.contains("does not allow use from namespace shop"),
        "{why}"
    );
    assert_eq!(v.services["shop/s-shared"].waypoint, usable("other/shared"));
    let (_, why) = wl_binding(&v, "shop/p-missing").unwrap();
    assert!(why.contains("no waypoint Gateway"), "{why}");
}
