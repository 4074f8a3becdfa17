//! Waypoint binding end to end, in local mode with real clients (curl): traffic a pod sends to
//! a Service bound with `istio.io/use-waypoint` goes through the waypoint (its access log names
//! the request; the destination's ztunnel sees the waypoint's identity), an unbound service's
//! does not, nor a service labelled `use-waypoint: none`, nor traffic to the pod's own IP (a
//! service waypoint is not a workload waypoint); a workload waypoint takes traffic to its
//! pods' IPs and not to their Services. A binding whose waypoint is missing is
//! bypassed by default — counted in `mesh_waypoint_bypass_total`, logged, shown in
//! /config_dump — and refused under `ztunnel --missing-waypoint refuse`.
//!
//! Needs meshd's waypoint rendering and binding, local mode's Deployments and the waypoint
//! binary (`cargo build --bins`). Each test builds its own mesh, torn down even when an
//! assertion fails.

use std::net::SocketAddr;
use std::time::Duration;

use localmesh::client::field;
use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::privileged;
use serde_json::Value;

const WORKLOADS: &str = "10-workloads.yaml";
const GATEWAY: &str = "30-waypoint.yaml";
const DEADLINE: Duration = Duration::from_secs(30);

/// Namespace `client` (ambient, no waypoint) with pod `client` (also an HTTP echo behind the
/// unbound Service `client/echo`); namespace `shop` (ambient, `use-waypoint: <waypoint>`) with
/// pod `web` behind Service `shop/web` (bound through the namespace) and `shop/web-direct`
/// (labelled `use-waypoint: none`).
fn workloads(waypoint: &str) -> String {
    let mut s = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: client, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: {waypoint}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: client}}
spec:
  selector: {{app: client}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Service
metadata:
  name: web-direct
  namespace: shop
  labels: {{istio.io/use-waypoint: none}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"#
    );
    s += &http_pod("client", "client", 0);
    s += &http_pod("shop", "web", 1);
    s
}

/// A pod running `mesh-echo serve --http-port 8080` (port named `http`).
fn http_pod(ns: &str, name: &str, node: usize) -> String {
    format!(
        "\n---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\n\
         spec:\n  nodeName: node-{node}\n  serviceAccountName: {name}\n  containers:\n  \
         - name: echo\n    command: [mesh-echo, serve, --http-port, \"8080\"]\n    \
         ports: [{{name: http, containerPort: 8080}}]\n"
    )
}

const WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

/// The same waypoint for pod-IP traffic only.
const WORKLOAD_WAYPOINT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: workload}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

const WAYPOINT_IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
const CLIENT_IDENTITY: &str = "spiffe://cluster.local/ns/client/sa/client";

fn mesh_with(waypoint: &str, ztunnel_args: &[&str]) -> LocalMesh {
    let mesh = LocalMesh::start(MeshOptions {
        ztunnel_args: ztunnel_args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    })
    .expect("start local mesh");
    mesh.apply(WORKLOADS, &workloads(waypoint)).unwrap();
    for (ns, pod) in [("client", "client"), ("shop", "web")] {
        mesh.wait_listening(ns, pod, 8080).unwrap();
        mesh.wait_enrolled(ns, pod).unwrap();
    }
    mesh
}

/// Service `ns/name`'s IPv4 VIP with port 80, as local mode rendered it.
fn vip(mesh: &LocalMesh, ns: &str, name: &str) -> SocketAddr {
    let text = std::fs::read_to_string(mesh.config_dir.join(WORKLOADS)).unwrap();
    let docs = localmesh::render::parse_docs(WORKLOADS, &text).unwrap();
    let svc = docs
        .iter()
        .find(|d| {
            localmesh::render::kind(d) == "Service"
                && d["metadata"]["namespace"] == ns
                && d["metadata"]["name"] == name
        })
        .unwrap_or_else(|| panic!("no Service {ns}/{name} in {WORKLOADS}"));
    let ip = svc["spec"]["clusterIP"].as_str().unwrap();
    SocketAddr::new(ip.parse().unwrap(), 80)
}

/// `curl` from the client pod: Ok(body) on a 2xx answer, Err(curl's complaint) otherwise.
fn get(mesh: &LocalMesh, to: SocketAddr, path: &str) -> Result<String, String> {
    let url = format!("http://{to}{path}");
    let out = mesh
        .exec(
            "client",
            "client",
            &["curl", "-sS", "-f", "--max-time", "5", &url],
        )
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "curl {url}: exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The client node's ztunnel's binding for Service `key` in /config_dump (null: unbound).
fn binding(mesh: &LocalMesh, key: &str) -> Value {
    binding_in(mesh, "services", "key", key)
}

/// The binding of the object whose `id_field` is `id` in /config_dump's `section`.
fn binding_in(mesh: &LocalMesh, section: &str, id_field: &str, id: &str) -> Value {
    let dump = mesh.config_dump(0).unwrap();
    dump[section]
        .as_array()
        .and_then(|ss| ss.iter().find(|s| s[id_field] == id))
        .map(|s| s["waypoint"].clone())
        .unwrap_or(Value::Null)
}

fn wait_binding_state(mesh: &LocalMesh, key: &str, state: &str) -> Value {
    wait_binding_state_in(mesh, "services", "key", key, state)
}

fn wait_binding_state_in(
    mesh: &LocalMesh,
    section: &str,
    id_field: &str,
    id: &str,
    state: &str,
) -> Value {
    let mut last = Value::Null;
    let waited = wait_for(
        DEADLINE,
        &format!("{id}'s waypoint binding {state}"),
        || {
            last = binding_in(mesh, section, id_field, id);
            Ok(last["state"] == state)
        },
    );
    waited.unwrap_or_else(|e| panic!("{e:#}; last seen: {last}"));
    last
}

/// The client node's outbound access-log entries for connections dialled to `dst`.
fn outbound_to(mesh: &LocalMesh, dst: SocketAddr) -> Vec<Value> {
    mesh.access_log(0)
        .into_iter()
        .filter(|e| field(e, "direction") == "outbound" && field(e, "dst") == dst.to_string())
        .collect()
}

/// Waits for the client node's ztunnel to log a completed connection to `dst` for which
/// `pick` holds, and returns it.
fn wait_outbound(mesh: &LocalMesh, dst: SocketAddr, pick: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    wait_for(
        Duration::from_secs(10),
        &format!("access log entry for {dst}"),
        || {
            found = outbound_to(mesh, dst).into_iter().find(|e| pick(e));
            Ok(found.is_some())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", outbound_to(mesh, dst)));
    found.unwrap()
}

/// Node `i`'s ztunnel metrics exposition.
fn metrics(mesh: &LocalMesh, i: usize) -> String {
    let node = mesh.cluster.nodes()[i].clone();
    let url = "http://127.0.0.1:15020/metrics";
    let out = mesh
        .cluster
        .run(&node.netns, &["curl", "-sf", "--max-time", "5", url])
        .unwrap();
    assert!(out.status.success(), "scrape of node-{i} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the first sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The log of the waypoint pod `pod` (namespace shop).
fn waypoint_log(mesh: &LocalMesh, pod: &str) -> String {
    let path = mesh.cluster.dir().join(format!("shop-{pod}-0.log"));
    std::fs::read_to_string(&path).unwrap_or_default()
}

#[test]
fn bound_service_goes_through_its_waypoint_and_a_deleted_one_is_bypassed() {
    if !privileged() {
        return;
    }
    let mesh = mesh_with("waypoint", &[]);
    let run = mesh.cluster.run_id().to_string();
    mesh.apply(GATEWAY, WAYPOINT).unwrap();
    let pods = mesh.wait_for_pods("shop", "waypoint", 1).unwrap();
    let waypoint_pod = pods[0].clone();
    mesh.wait_listening("shop", &waypoint_pod, 15008).unwrap();
    let ready = wait_binding_state(&mesh, "shop/web", "ready");
    assert_eq!(ready["gateway"], "shop/waypoint", "{ready}");
    let web = vip(&mesh, "shop", "web");

    // Bound: the waypoint handles the request (its log names the path), the client's ztunnel
    // sent it to the waypoint asking for the VIP, and the server's ztunnel saw the waypoint.
    let path = format!("/through-waypoint-{run}");
    let body = get(&mesh, web, &path).unwrap();
    assert!(body.contains("\"web\""), "not answered by web: {body}");
    wait_for(DEADLINE, "the waypoint to log the request", || {
        Ok(waypoint_log(&mesh, &waypoint_pod).contains(&path))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", waypoint_log(&mesh, &waypoint_pod)));
    let out = wait_outbound(&mesh, web, |e| field(e, "waypoint") == "shop/waypoint");
    assert_eq!(field(&out, "dst.identity"), WAYPOINT_IDENTITY, "{out}");
    assert_eq!(field(&out, "endpoint"), web.to_string(), "{out}");
    // The waypoint keeps its upstream connection open (pooled), so the destination's access
    // log has no line yet: its metrics count the connection when it opens.
    let server_node = mesh.pod("shop", "web").unwrap().node;
    let mut text = String::new();
    wait_for(
        DEADLINE,
        "web's ztunnel to count a connection from the waypoint",
        || {
            text = metrics(&mesh, server_node);
            Ok(sample(
                &text,
                "istio_tcp_connections_opened_total",
                &[
                    ("reporter", "destination"),
                    ("source_principal", WAYPOINT_IDENTITY),
                    ("destination_workload", "web"),
                ],
            )
            .is_some_and(|n| n >= 1.0))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{text}"));

    // Not bound: `use-waypoint: none`, a namespace without the label, the pod's own IP.
    let web_pod = mesh.pod("shop", "web").unwrap();
    let direct = [
        (vip(&mesh, "shop", "web-direct"), "shop/web"),
        (vip(&mesh, "client", "echo"), "client/client"),
        (SocketAddr::new(web_pod.ip4.into(), 8080), "shop/web"),
    ];
    assert_eq!(binding(&mesh, "shop/web-direct"), Value::Null);
    for (i, (to, workload)) in direct.iter().enumerate() {
        let path = format!("/direct-{i}-{run}");
        get(&mesh, *to, &path).unwrap();
        let e = wait_outbound(&mesh, *to, |_| true);
        assert_eq!(
            field(&e, "waypoint"),
            "",
            "{to} went through a waypoint: {e}"
        );
        assert_eq!(field(&e, "dst.workload"), *workload, "{e}");
        assert!(
            !waypoint_log(&mesh, &waypoint_pod).contains(&path),
            "the waypoint saw {path} (sent to {to})"
        );
    }

    // Gateway deleted: the binding stays, unusable; traffic goes direct, counted and logged.
    mesh.remove(GATEWAY).unwrap();
    let gone = wait_binding_state(&mesh, "shop/web", "bypassed");
    assert!(!gone["reason"].as_str().unwrap_or("").is_empty(), "{gone}");
    get(&mesh, web, &format!("/bypassed-{run}")).unwrap();
    // Every connection to the VIP so far went through the waypoint: this one did not.
    let e = wait_outbound(&mesh, web, |e| field(e, "waypoint").is_empty());
    assert_eq!(
        field(&e, "dst.identity"),
        "spiffe://cluster.local/ns/shop/sa/web",
        "{e}"
    );
    let bypassed = sample(
        &metrics(&mesh, 0),
        "mesh_waypoint_bypass_total",
        &[
            ("destination_service", "web.shop.svc.cluster.local"),
            ("waypoint", "shop/waypoint"),
        ],
    );
    assert!(
        bypassed.is_some_and(|n| n >= 1.0),
        "bypass not counted: {bypassed:?}"
    );
    assert!(
        mesh.ztunnel_log(0)
            .contains("waypoint unavailable: sending direct"),
        "no bypass warning in the client ztunnel's log"
    );
}

#[test]
fn a_missing_waypoint_is_bypassed_by_default_and_counted() {
    if !privileged() {
        return;
    }
    let mesh = mesh_with("nowhere", &[]);
    let state = wait_binding_state(&mesh, "shop/web", "bypassed");
    assert_eq!(state["gateway"], "shop/nowhere", "{state}");
    let reason = state["reason"].as_str().unwrap_or_default().to_string();
    assert!(!reason.is_empty(), "{state}");
    let web = vip(&mesh, "shop", "web");
    for i in 0..3 {
        get(&mesh, web, &format!("/bypass-{i}")).unwrap();
    }
    let e = wait_outbound(&mesh, web, |_| true);
    assert_eq!(field(&e, "dst.workload"), "shop/web", "{e}");
    assert_eq!(field(&e, "src.identity"), CLIENT_IDENTITY, "{e}");
    let mut text = String::new();
    wait_for(DEADLINE, "three bypassed connections counted", || {
        text = metrics(&mesh, 0);
        let n = sample(
            &text,
            "mesh_waypoint_bypass_total",
            &[
                ("destination_service", "web.shop.svc.cluster.local"),
                ("waypoint", "shop/nowhere"),
                ("reason", &reason),
            ],
        );
        Ok(n == Some(3.0))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    assert!(
        mesh.ztunnel_log(0)
            .contains("waypoint unavailable: sending direct"),
        "no bypass warning in the client ztunnel's log"
    );
    // The opted-out service is not counted.
    get(&mesh, vip(&mesh, "shop", "web-direct"), "/x").unwrap();
    wait_outbound(&mesh, vip(&mesh, "shop", "web-direct"), |_| true);
    let opted_out = sample(
        &metrics(&mesh, 0),
        "mesh_waypoint_bypass_total",
        &[("destination_service", "web-direct.shop.svc.cluster.local")],
    );
    assert_eq!(opted_out, None);
}

#[test]
fn missing_waypoint_refuse_closes_bound_connections() {
    if !privileged() {
        return;
    }
    let mesh = mesh_with("nowhere", &["--missing-waypoint", "refuse"]);
    let state = wait_binding_state(&mesh, "shop/web", "refused");
    assert_eq!(state["gateway"], "shop/nowhere", "{state}");
    assert_eq!(mesh.config_dump(0).unwrap()["missingWaypoint"], "refuse");
    let web = vip(&mesh, "shop", "web");
    let refused = get(&mesh, web, "/refused");
    assert!(refused.is_err(), "bound traffic got through: {refused:?}");
    let mut failed = None;
    wait_for(
        Duration::from_secs(10),
        "the refusal in the access log",
        || {
            failed = mesh.access_log(0).into_iter().find(|e| {
                field(e, "message") == "connection failed" && field(e, "dst") == web.to_string()
            });
            Ok(failed.is_some())
        },
    )
    .unwrap();
    let failed = failed.unwrap();
    assert!(
        field(&failed, "error").starts_with("waypoint unavailable"),
        "{failed}"
    );
    let text = metrics(&mesh, 0);
    let denied = sample(
        &text,
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "source"),
            ("destination_service", "web.shop.svc.cluster.local"),
            ("response_flags", "DENY"),
        ],
    );
    assert_eq!(denied, Some(1.0), "{text}");
    assert!(
        !text.contains("mesh_waypoint_bypass_total{"),
        "a refused connection counted as bypassed"
    );
    // Traffic that is not bound still flows.
    let body = get(&mesh, vip(&mesh, "shop", "web-direct"), "/ok").unwrap();
    assert!(body.contains("\"web\""), "{body}");
}

#[test]
fn a_workload_waypoint_takes_pod_ip_traffic_and_not_service_traffic() {
    if !privileged() {
        return;
    }
    // The namespace label binds shop's pods to a waypoint for workloads only: its Services
    // are not bound (Istio: an inherited label naming a waypoint not for services is ignored).
    let mesh = mesh_with("waypoint", &[]);
    let run = mesh.cluster.run_id().to_string();
    mesh.apply(GATEWAY, WORKLOAD_WAYPOINT).unwrap();
    let waypoint_pod = mesh.wait_for_pods("shop", "waypoint", 1).unwrap()[0].clone();
    mesh.wait_listening("shop", &waypoint_pod, 15008).unwrap();
    let ready = wait_binding_state_in(&mesh, "workloads", "uid", "shop/web", "ready");
    assert_eq!(ready["gateway"], "shop/waypoint", "{ready}");
    let web_pod = mesh.pod("shop", "web").unwrap();
    let pod_ip = SocketAddr::new(web_pod.ip4.into(), 8080);

    let path = format!("/pod-ip-{run}");
    let body = get(&mesh, pod_ip, &path).unwrap();
    assert!(body.contains("\"web\""), "not answered by web: {body}");
    wait_for(DEADLINE, "the waypoint to log the request", || {
        Ok(waypoint_log(&mesh, &waypoint_pod).contains(&path))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", waypoint_log(&mesh, &waypoint_pod)));
    let out = wait_outbound(&mesh, pod_ip, |e| field(e, "waypoint") == "shop/waypoint");
    assert_eq!(field(&out, "endpoint"), pod_ip.to_string(), "{out}");
    assert_eq!(field(&out, "dst.identity"), WAYPOINT_IDENTITY, "{out}");

    // The Service in front of the same pod is not bound.
    assert_eq!(binding(&mesh, "shop/web"), Value::Null);
    let web = vip(&mesh, "shop", "web");
    let path = format!("/vip-{run}");
    get(&mesh, web, &path).unwrap();
    let e = wait_outbound(&mesh, web, |_| true);
    assert_eq!(field(&e, "waypoint"), "", "{e}");
    assert_eq!(field(&e, "dst.workload"), "shop/web", "{e}");
    assert!(!waypoint_log(&mesh, &waypoint_pod).contains(&path));
}
