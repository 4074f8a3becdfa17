//! On-demand waypoints: what meshd renders for a waypoint Gateway, and `--write-dir` (objects
//! and status files) as local mode's controller sees them.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use meshd::daemon::RunOptions;
use meshd::parse::parse_file;
use meshd::resources::Resource;
use meshd::waypoints::{self, Waypoint};
use serde_json::Value;

fn waypoint(yaml: &str) -> Option<Waypoint> {
    let parsed = parse_file("gw.yaml", yaml).unwrap();
    match &parsed.resources[..] {
        [Resource::Gateway(g)] => Waypoint::from_gateway(g),
        other => panic!("{other:?}"),
    }
}

#[test]
fn rendered_objects_are_what_kubernetes_would_run() {
    let w = waypoint(&waypoint_gateway("wp", "")).expect("a waypoint");
    assert!(w.accepted(), "{:?}", w.refusal);
    let objs = waypoints::render(&w);
    let kinds: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ServiceAccount", "Deployment", "Service"]);
    for o in &objs {
        let m = &o["metadata"];
        assert_eq!(
            (m["name"].as_str(), m["namespace"].as_str()),
            (Some("wp"), Some("shop"))
        );
        assert_eq!(m["labels"]["gateway.networking.k8s.io/gateway-name"], "wp");
        let owner = &m["ownerReferences"][0];
        assert_eq!(owner["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(owner["kind"], "Gateway");
        assert_eq!(owner["name"], "wp");
        assert_eq!(owner["uid"], "uid-wp");
        assert_eq!(owner["controller"], true);
    }
    let d = &objs[1]["spec"];
    assert_eq!(d["replicas"], 1);
    assert_eq!(
        d["selector"]["matchLabels"],
        serde_json::json!({"gateway.networking.k8s.io/gateway-name": "wp"})
    );
    let pod_labels = &d["template"]["metadata"]["labels"];
    assert_eq!(pod_labels["gateway.networking.k8s.io/gateway-name"], "wp");
    assert_eq!(
        pod_labels["istio.io/dataplane-mode"], "none",
        "never captured"
    );
    let pod = &d["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "wp");
    let c = &pod["containers"][0];
    assert_eq!(c["name"], "waypoint");
    assert_eq!(c["command"], serde_json::json!(["mesh-waypoint"]));
    assert_eq!(c["args"], serde_json::json!(["--gateway", "shop/wp"]));
    let ports: Vec<(u64, &str)> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_u64().unwrap(),
                p["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [(15008, "mesh"), (15021, "status"), (15020, "metrics")]
    );
    let s = &objs[2]["spec"];
    assert_eq!(s["selector"], d["selector"]["matchLabels"]);
    let sports: Vec<(u64, &str, Option<&str>)> = s["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_u64().unwrap(),
                p["name"].as_str().unwrap(),
                p["appProtocol"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        sports,
        [(15008, "mesh", Some("hbone")), (15021, "status", None)]
    );

    // The YAML meshd writes reads back cleanly, as meshd reads local mode's copy of it.
    let yaml = waypoints::to_yaml(&objs);
    let back = parse_file("generated.shop.wp.yaml", &yaml).unwrap();
    assert!(back.warnings.is_empty(), "{:?}", back.warnings);
    assert_eq!(back.resources.len(), 3);
}

#[test]
fn only_a_proper_waypoint_gateway_is_accepted() {
    let no_mesh = "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HTTP}]
";
    let r = waypoint(no_mesh).unwrap().refusal.expect("refused");
    assert_eq!(r.reason, "ListenersNotValid");
    assert!(
        r.message.contains("15008") && r.message.contains("HBONE"),
        "{}",
        r.message
    );
    let r = waypoint(&waypoint_gateway("wp", "istio.io/waypoint-for: everything"))
        .unwrap()
        .refusal
        .expect("refused");
    assert_eq!(r.reason, "InvalidParameters");
    assert!(r.message.contains("istio.io/waypoint-for"), "{}", r.message);
    // Another class is not meshd's: no waypoint, and a warning says so.
    let ingress = waypoint_gateway("gw", "").replace("istio-waypoint", "istio");
    let parsed = parse_file("gw.yaml", &ingress).unwrap();
    assert!(
        parsed.warnings[0].contains("not handled by meshd"),
        "{:?}",
        parsed.warnings
    );
    assert!(waypoint(&ingress).is_none());
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// (status, reason, lastTransitionTime) of condition `kind`.
fn condition(status: &Value, kind: &str) -> (String, String, String) {
    let c = status["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {status}"));
    let s = |k: &str| c[k].as_str().unwrap().to_string();
    (s("status"), s("reason"), s("lastTransitionTime"))
}

/// Waits until condition `kind` has `status` and `reason`; returns the status document.
async fn wait_status(path: &Path, kind: &str, status: &str, reason: &str) -> Value {
    let p = path.to_path_buf();
    let what = format!("{} {kind}={status} ({reason})", path.display());
    let want = (kind.to_string(), status.to_string(), reason.to_string());
    wait_for(&what, move || {
        let (p, (k, s, r)) = (p.clone(), want.clone());
        async move {
            read_json(&p).is_some_and(|v| {
                let c = condition(&v, &k);
                c.0 == s && c.1 == r
            })
        }
    })
    .await;
    read_json(path).unwrap()
}

async fn wait_gone(path: PathBuf) {
    wait_for(&format!("{} to be removed", path.display()), move || {
        let p = path.clone();
        async move { !p.exists() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_dir_objects_and_status_follow_the_gateway() {
    // A status file left by an earlier run: transition times of conditions that still hold
    // are kept, those that flipped are new.
    const OLD: &str = "2000-01-01T00:00:00Z";
    let seed = |dir: &Path| {
        let status = dir.join("out/status");
        std::fs::create_dir_all(&status).unwrap();
        let c = |t: &str| serde_json::json!({"type": t, "status": "True", "reason": t, "message": "", "lastTransitionTime": OLD});
        let doc = serde_json::json!({"status": {"conditions": [c("Accepted"), c("Programmed")]}});
        std::fs::write(status.join("Gateway.shop.wp.json"), doc.to_string()).unwrap();
        // And a stale one of a Gateway that is gone.
        std::fs::write(status.join("Gateway.shop.old.json"), doc.to_string()).unwrap();
        RunOptions {
            write_dir: Some(dir.join("out")),
            ..Default::default()
        }
    };
    let meshd = Meshd::start_with(
        &[
            ("00-ns.yaml", NAMESPACES),
            ("10-gw.yaml", &waypoint_gateway("wp", "")),
        ],
        seed,
    )
    .await;
    let out = meshd.dir.path().join("out");
    let objects = out.join("objects/shop.wp.yaml");
    let status = out.join("status/Gateway.shop.wp.json");

    // Accepted at once; not programmed until a waypoint pod is ready.
    let s = wait_status(&status, "Programmed", "False", "Pending").await;
    let (accepted, reason, accepted_since) = condition(&s, "Accepted");
    assert_eq!((accepted.as_str(), reason.as_str()), ("True", "Accepted"));
    assert_eq!(
        accepted_since, OLD,
        "Accepted held: its transition time is kept"
    );
    assert_ne!(condition(&s, "Programmed").2, OLD, "Programmed flipped");
    wait_gone(out.join("status/Gateway.shop.old.json")).await;
    let text = std::fs::read_to_string(&objects).expect("objects written");
    let written_at = std::fs::metadata(&objects).unwrap().modified().unwrap();
    let docs = parse_file("objects", &text).unwrap().resources;
    assert_eq!(docs.len(), 3);

    // Local mode applies the objects and runs the Deployment's pod: Programmed.
    meshd.write("generated.shop.wp.yaml", &text);
    wait_status(&status, "Programmed", "False", "NoResources").await;
    meshd.write(
        "generated.pod.yaml",
        "apiVersion: v1
kind: Pod
metadata:
  name: wp-abc
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none}
spec: {nodeName: node-0, serviceAccountName: wp}
status: {podIP: 10.0.0.50}
",
    );
    let s = wait_status(&status, "Programmed", "True", "Programmed").await;
    assert_eq!(
        condition(&s, "Accepted").2,
        accepted_since,
        "Accepted did not change, so neither does its transition time"
    );
    assert_eq!(
        std::fs::metadata(&objects).unwrap().modified().unwrap(),
        written_at,
        "unchanged objects are not rewritten"
    );

    // A bad edit of a running waypoint: refused, its status says why, and the last accepted
    // version stays in force: the same objects, still programmed.
    meshd.write(
        "10-gw.yaml",
        &waypoint_gateway("wp", "").replace("protocol: HBONE", "protocol: HTTP"),
    );
    let s = wait_status(&status, "Accepted", "False", "ListenersNotValid").await;
    let message = s["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("10-gw.yaml")
            && message.contains("spec.listeners")
            && message.contains("last accepted version stays in force"),
        "{message}"
    );
    assert_eq!(condition(&s, "Programmed").1, "Programmed");
    assert_ne!(condition(&s, "Accepted").2, OLD, "Accepted flipped");
    assert_eq!(std::fs::read_to_string(&objects).unwrap(), text);
    // A bad waypoint-for label is refused the same way.
    meshd.write(
        "10-gw.yaml",
        &waypoint_gateway("wp", "istio.io/waypoint-for: everything"),
    );
    wait_status(&status, "Accepted", "False", "InvalidParameters").await;
    assert_eq!(std::fs::read_to_string(&objects).unwrap(), text);

    // Fixed: accepted again, the same objects.
    meshd.write("10-gw.yaml", &waypoint_gateway("wp", ""));
    let s = wait_status(&status, "Accepted", "True", "Accepted").await;
    assert_eq!(condition(&s, "Programmed").1, "Programmed");
    assert_eq!(std::fs::read_to_string(&objects).unwrap(), text);

    // A Gateway never accepted: status says why, nothing rendered for it.
    meshd.write(
        "20-bad.yaml",
        &waypoint_gateway("bad", "").replace("protocol: HBONE", "protocol: HTTP"),
    );
    let bad_status = out.join("status/Gateway.shop.bad.json");
    let s = wait_status(&bad_status, "Accepted", "False", "ListenersNotValid").await;
    assert_eq!(condition(&s, "Programmed").1, "Invalid");
    assert!(!out.join("objects/shop.bad.yaml").exists());
    std::fs::remove_file(meshd.config.join("20-bad.yaml")).unwrap();
    wait_gone(bad_status).await;

    // The Gateway goes: its objects and status go.
    std::fs::remove_file(meshd.config.join("10-gw.yaml")).unwrap();
    wait_gone(objects).await;
    wait_gone(status).await;
    meshd.stop().await.unwrap();
}
