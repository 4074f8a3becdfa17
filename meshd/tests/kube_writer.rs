//! What the leader writes to the API server double: a waypoint Gateway's ServiceAccount,
//! Deployment and Service (owned by the Gateway, gone with it), its Accepted/Programmed status,
//! HTTPRoute status.parents next to another controller's entry, AuthorizationPolicy
//! ZtunnelAccepted/WaypointAccepted — each only on change, and only by the leader.

#[path = "common/kube_h4.rs"]
mod kube_h4;

use std::time::Duration;

use kube_h4::{Replica, cluster, quick, settings, view_of, wait_until, writes};
use serde_json::{Value, json};
use testbed::kubeapi::ApiServer;

const GW: &str = "gateway.networking.k8s.io/v1";
const WAIT: Duration = Duration::from_secs(15);

fn waypoint(generation_marker: &str) -> Value {
    json!({
        "apiVersion": GW, "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "app",
                     "labels": {"istio.io/waypoint-for": "service"},
                     "annotations": {"marker": generation_marker}},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

fn get(api: &ApiServer, api_version: &str, kind: &str, name: &str) -> Option<Value> {
    api.get(api_version, kind, Some("app"), name)
}

fn condition(obj: &Value, pointer: &str, kind: &str) -> Value {
    obj.pointer(pointer)
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == kind).cloned())
        .unwrap_or(Value::Null)
}

/// Keeps showing the leader what the API holds until `cond` holds.
fn converge(api: &ApiServer, r: &mut Replica, what: &str, mut cond: impl FnMut() -> bool) {
    wait_until(what, WAIT, || {
        r.show(view_of(api));
        std::thread::sleep(Duration::from_millis(100));
        cond()
    });
}

fn leader(api: &ApiServer) -> Replica {
    let r = Replica::start(settings(api, "meshd-0", quick()), true);
    wait_until("meshd-0 to lead", WAIT, || r.leading());
    r
}

#[test]
fn a_waypoint_gateway_yields_its_three_objects_and_status_and_they_go_with_it() {
    let api = cluster();
    let mut r = leader(&api);
    let gw = api.create(waypoint("1")).expect("gateway");
    let uid = gw["metadata"]["uid"].as_str().expect("uid").to_string();
    let kinds = [
        ("v1", "ServiceAccount"),
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
    ];
    converge(&api, &mut r, "the waypoint objects", || {
        kinds
            .iter()
            .all(|(v, k)| get(&api, v, k, "waypoint").is_some())
    });
    for (v, k) in kinds {
        let o = get(&api, v, k, "waypoint").expect("object");
        let owner = &o["metadata"]["ownerReferences"][0];
        assert_eq!(owner["apiVersion"], GW, "{k}");
        assert_eq!(owner["kind"], "Gateway", "{k}");
        assert_eq!(owner["name"], "waypoint", "{k}");
        assert_eq!(owner["uid"], uid.as_str(), "{k}");
        assert_eq!(owner["controller"], true, "{k}");
        assert_eq!(owner["blockOwnerDeletion"], true, "{k}");
        let labels = &o["metadata"]["labels"];
        assert_eq!(labels["gateway.networking.k8s.io/gateway-name"], "waypoint");
        assert_eq!(
            labels["gateway.istio.io/managed"],
            "istio.io-mesh-controller"
        );
        let managers: Vec<&str> = o["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["manager"].as_str())
            .collect();
        assert!(
            managers.contains(&"meshd"),
            "{k} applied by meshd: {managers:?}"
        );
    }
    let class = api
        .get(GW, "GatewayClass", None, "istio-waypoint")
        .expect("GatewayClass installed");
    assert_eq!(class["spec"]["controllerName"], "istio.io/mesh-controller");

    let generation = |api: &ApiServer| {
        get(api, GW, "Gateway", "waypoint").expect("gateway")["metadata"]["generation"].clone()
    };
    converge(&api, &mut r, "Accepted=True", || {
        let g = get(&api, GW, "Gateway", "waypoint").expect("gateway");
        condition(&g, "/status/conditions", "Accepted")["status"] == "True"
    });
    let g = get(&api, GW, "Gateway", "waypoint").expect("gateway");
    let programmed = condition(&g, "/status/conditions", "Programmed");
    assert_eq!(
        programmed["status"], "False",
        "no waypoint pod yet: {programmed}"
    );
    assert_eq!(programmed["observedGeneration"], generation(&api));

    // A ready pod behind the waypoint's Service.
    api.create(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "waypoint-abc", "namespace": "app",
                     "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint",
                                "istio.io/dataplane-mode": "none"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "waypoint",
                 "containers": [{"name": "waypoint", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.244.0.9", "podIPs": [{"ip": "10.244.0.9"}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .expect("pod");
    converge(&api, &mut r, "Programmed=True", || {
        let g = get(&api, GW, "Gateway", "waypoint").expect("gateway");
        condition(&g, "/status/conditions", "Programmed")["status"] == "True"
    });
    let g = get(&api, GW, "Gateway", "waypoint").expect("gateway");
    let accepted_since =
        condition(&g, "/status/conditions", "Accepted")["lastTransitionTime"].clone();
    assert_eq!(
        condition(&g, "/status/conditions", "Programmed")["observedGeneration"],
        generation(&api)
    );

    // An edit of the spec bumps the generation; the status follows it.
    let mut edited = get(&api, GW, "Gateway", "waypoint").expect("gateway");
    edited["spec"]["listeners"]
        .as_array_mut()
        .expect("listeners")
        .push(json!({"name": "extra", "port": 8080, "protocol": "HTTP"}));
    let before = generation(&api);
    api.put(edited).expect("edit");
    let after = generation(&api);
    assert_ne!(before, after, "a spec edit bumps metadata.generation");
    converge(
        &api,
        &mut r,
        "observedGeneration to follow the edit",
        || {
            let g = get(&api, GW, "Gateway", "waypoint").expect("gateway");
            condition(&g, "/status/conditions", "Accepted")["observedGeneration"] == after
        },
    );
    let g = get(&api, GW, "Gateway", "waypoint").expect("gateway");
    assert_eq!(
        condition(&g, "/status/conditions", "Accepted")["lastTransitionTime"],
        accepted_since,
        "Accepted stayed True: its transition time is kept"
    );

    // Deleting the Gateway takes its objects with it.
    api.delete(GW, "Gateway", Some("app"), "waypoint")
        .expect("delete");
    converge(&api, &mut r, "the waypoint objects to go", || {
        kinds
            .iter()
            .all(|(v, k)| get(&api, v, k, "waypoint").is_none())
    });
}

#[test]
fn route_parents_and_policy_conditions_are_written_once_and_never_flap() {
    let api = cluster();
    let mut r = leader(&api);
    api.create(waypoint("1")).expect("gateway");
    api.create(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "app",
                     "labels": {"istio.io/use-waypoint": "waypoint"}},
        "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]},
    }))
    .expect("service");
    // A route attached to the Service (ours) and to another implementation's Gateway, whose
    // controller already reported on it.
    let foreign = json!({
        "parentRef": {"name": "edge"},
        "controllerName": "example.com/edge-controller",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "theirs", "lastTransitionTime": "2026-01-01T00:00:00Z",
                        "observedGeneration": 1}],
    });
    let route = api
        .create(json!({
            "apiVersion": GW, "kind": "HTTPRoute",
            "metadata": {"name": "reviews", "namespace": "app"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"},
                                    {"name": "edge"}],
                     "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}]},
        }))
        .expect("route");
    let mut with_status = route.clone();
    with_status["status"] = json!({"parents": [foreign.clone()]});
    api.put(with_status).expect("foreign status");
    let policy = |name: &str, spec: Value| {
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": "app"}, "spec": spec})
    };
    api.create(policy(
        "http-by-selector",
        json!({"selector": {"matchLabels": {"app": "reviews"}}, "action": "ALLOW",
               "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    ))
    .expect("policy");
    api.create(policy(
        "l4-by-selector",
        json!({"selector": {"matchLabels": {"app": "reviews"}}, "action": "ALLOW",
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/app/sa/web"]}}]}]}),
    ))
    .expect("policy");
    api.create(policy(
        "on-waypoint",
        json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
               "action": "ALLOW", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    ))
    .expect("policy");

    let ap = |name: &str| get(&api, "security.istio.io/v1", "AuthorizationPolicy", name);
    converge(&api, &mut r, "route and policy status", || {
        let parents = get(&api, GW, "HTTPRoute", "reviews")
            .and_then(|r| r.pointer("/status/parents").cloned())
            .and_then(|p| p.as_array().cloned())
            .unwrap_or_default();
        // The waypoint's Service exists (no pod yet) and has its address.
        let g = get(&api, GW, "Gateway", "waypoint").expect("gateway");
        let settled = condition(&g, "/status/conditions", "Programmed")["reason"] == "NoResources"
            && g["status"]["addresses"]
                .as_array()
                .is_some_and(|a| !a.is_empty());
        settled
            && parents.len() == 2
            && ["http-by-selector", "l4-by-selector", "on-waypoint"]
                .iter()
                .all(|n| ap(n).is_some_and(|p| p.pointer("/status/conditions").is_some()))
    });
    let route = get(&api, GW, "HTTPRoute", "reviews").expect("route");
    let parents = route["status"]["parents"]
        .as_array()
        .expect("parents")
        .clone();
    assert!(
        parents.contains(&foreign),
        "the other controller's entry is kept: {parents:?}"
    );
    let ours = parents
        .iter()
        .find(|p| p["controllerName"] == "istio.io/mesh-controller")
        .expect("our entry");
    assert_eq!(
        ours["parentRef"],
        json!({"group": "", "kind": "Service", "name": "reviews"})
    );
    let accepted = condition(ours, "/conditions", "Accepted");
    assert_eq!(accepted["status"], "True");
    assert_eq!(
        accepted["observedGeneration"],
        route["metadata"]["generation"]
    );
    assert_eq!(
        condition(ours, "/conditions", "ResolvedRefs")["status"],
        "True"
    );

    let http = condition(
        &ap("http-by-selector").expect("p"),
        "/status/conditions",
        "ZtunnelAccepted",
    );
    assert_eq!(http["status"], "False", "{http}");
    assert_eq!(http["reason"], "UnsupportedValue");
    assert!(
        http["message"]
            .as_str()
            .is_some_and(|m| m.contains("methods")),
        "{http}"
    );
    let l4 = condition(
        &ap("l4-by-selector").expect("p"),
        "/status/conditions",
        "ZtunnelAccepted",
    );
    assert_eq!(
        (l4["status"].clone(), l4["reason"].clone()),
        (json!("True"), json!("Accepted"))
    );
    let on_wp = ap("on-waypoint").expect("p");
    let wp = condition(&on_wp, "/status/conditions", "WaypointAccepted");
    assert_eq!(
        (wp["status"].clone(), wp["reason"].clone()),
        (json!("True"), json!("Accepted"))
    );
    assert_eq!(wp["observedGeneration"], on_wp["metadata"]["generation"]);
    assert!(condition(&on_wp, "/status/conditions", "ZtunnelAccepted").is_null());

    // Converged: more identical views make no write at all. A last change (a policy edit)
    // marks when the writer has seen them all; it must be the only write.
    let mark = writes(&api).len();
    for _ in 0..5 {
        r.show(view_of(&api));
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut edit = ap("l4-by-selector").expect("p");
    edit["spec"]["rules"][0]["from"][0]["source"]["principals"] =
        json!(["cluster.local/ns/app/sa/other"]);
    api.put(edit).expect("edit");
    let new_generation = ap("l4-by-selector").expect("p")["metadata"]["generation"].clone();
    converge(&api, &mut r, "the edit's observedGeneration", || {
        condition(
            &ap("l4-by-selector").expect("p"),
            "/status/conditions",
            "ZtunnelAccepted",
        )["observedGeneration"]
            == new_generation
    });
    let since: Vec<String> = writes(&api)[mark..]
        .iter()
        .filter(|w| w.pod.as_deref() == Some("meshd-0"))
        .map(|w| format!("{} {}", w.method, w.path))
        .collect();
    assert_eq!(
        since,
        [
            "PUT /apis/security.istio.io/v1/namespaces/app/authorizationpolicies/l4-by-selector/status"
        ],
        "only the edited policy's status was written"
    );
}

#[test]
fn only_the_leader_writes_and_never_two_at_once() {
    let api = cluster();
    let t = quick();
    let mut a = Replica::start(settings(&api, "meshd-0", t), true);
    let mut b = Replica::start(settings(&api, "meshd-1", t), true);
    wait_until("a leader", WAIT, || a.leading() || b.leading());
    api.create(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                      "metadata": {"name": "p", "namespace": "app"},
                      "spec": {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["1"]}}]}]}}))
        .expect("policy");
    // Each step edits the policy: its status must follow, written by whoever leads.
    let step = |api: &ApiServer, rs: &mut [&mut Replica], n: usize| {
        let ap = |api: &ApiServer| {
            api.get(
                "security.istio.io/v1",
                "AuthorizationPolicy",
                Some("app"),
                "p",
            )
            .expect("p")
        };
        let mut p = ap(api);
        p["spec"]["rules"][0]["to"][0]["operation"]["ports"] = json!([n.to_string()]);
        api.put(p).expect("edit");
        let want = ap(api)["metadata"]["generation"].clone();
        wait_until("the status to follow", WAIT, || {
            let v = view_of(api);
            for r in rs.iter_mut() {
                r.show(v.clone());
            }
            std::thread::sleep(Duration::from_millis(50));
            condition(&ap(api), "/status/conditions", "ZtunnelAccepted")["observedGeneration"]
                == want
        });
    };
    for n in 2..5 {
        step(&api, &mut [&mut a, &mut b], n);
    }
    let (dying, mut survivor) = if a.leading() { (a, b) } else { (b, a) };
    let dead = dying.name.clone();
    let killed_at = api.requests().len();
    dying.kill();
    // The survivor takes over and keeps the status following the edits.
    for n in 5..8 {
        step(&api, &mut [&mut survivor], n);
    }
    let writers: Vec<(usize, String)> = api
        .requests()
        .iter()
        .enumerate()
        .filter(|(_, r)| r.method != "GET" && !r.path.contains("/leases"))
        .filter_map(|(i, r)| r.pod.clone().map(|p| (i, p)))
        .collect();
    assert!(
        writers.iter().any(|(_, p)| *p == dead),
        "the first leader wrote"
    );
    assert!(
        writers.iter().any(|(_, p)| *p == survivor.name),
        "the second leader wrote"
    );
    for (i, p) in &writers {
        if *p == dead {
            assert!(*i < killed_at, "{dead} wrote after it was killed");
        } else {
            assert!(*i >= killed_at, "{p} wrote while {dead} led");
        }
    }
}
