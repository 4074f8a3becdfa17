//! Issue 8's L7 behaviour end to end, as a user sees it: a waypoint made with `meshctl waypoint
//! apply --enroll-namespace --wait`, three Deployments of mesh-echo (version v1 ×3, v2, v3),
//! and real requests from a client pod through Service VIPs. Weighted splits land within a
//! binomial tolerance and only on the subset's pods; a header rule beats the split; a live
//! weight change drops nothing; DestinationRule load balancers (consistent hash, round robin,
//! least request) behave as named; gRPC (all four shapes) keeps status and trailers, WebSocket
//! and a plain TCP port pass; identities are seen on both sides of the waypoint; an invalid
//! VirtualService edit is refused naming the field while the old routes keep working; an
//! HTTPRoute beats a VirtualService on the same Service and the conflict is reported.
//!
//! One mesh for every case (they share the pods and the waypoint); torn down even when an
//! assertion fails. Binomial tolerances are 5σ (σ = √(n·p·(1−p))): a correct split fails one
//! in ~1.7 million checks, and every wrong split the cases guard against is ≥ 10σ away.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{WhoConn, manifests, privileged, served_by};

const NS_FILE: &str = "00-namespaces.yaml";
const APPS: &str = "10-apps.yaml";
const DR: &str = "20-destination-rules.yaml";
const VS_WEB: &str = "30-vs-web.yaml";
const VS_OTHERS: &str = "31-vs-others.yaml";
const HTTP_ROUTE: &str = "40-httproute.yaml";
const DEADLINE: Duration = Duration::from_secs(30);
const HOST: &str = "web.shop.svc.cluster.local";
const WAYPOINT_IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";
const CLIENT_IDENTITY: &str = "spiffe://cluster.local/ns/client/sa/client";

/// A Deployment of mesh-echo labelled `version`: WHO line protocol on 9000, HTTP (and
/// WebSocket) on 8080, gRPC on 9090.
fn deployment(version: &str, replicas: u32) -> String {
    format!(
        r#"
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-{version}, namespace: shop}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web, version: {version}}}}}
  template:
    metadata: {{labels: {{app: web, version: {version}}}}}
    spec:
      serviceAccountName: web
      containers:
      - name: echo
        command: [mesh-echo, serve]
        args: ["--port", "9000", "--http-port", "8080", "--grpc-port", "9090"]
        ports: [{{name: http, containerPort: 8080}}, {{name: grpc, containerPort: 9090}}, {{name: tcp, containerPort: 9000}}]
"#
    )
}

/// A Service `name` in shop over `selector`, HTTP on port 80.
fn service(name: &str, selector: &str, extra_ports: &str) -> String {
    format!(
        "\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  selector: {selector}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n{extra_ports}"
    )
}

fn apps() -> String {
    let mut s = deployment("v1", 3) + &deployment("v2", 1) + &deployment("v3", 1);
    let all = "{app: web}";
    let v1 = "{app: web, version: v1}";
    s += &service(
        "web",
        all,
        "  - {name: grpc, port: 9090, targetPort: 9090, appProtocol: grpc}\n  \
         - {name: tcp, port: 9000, targetPort: 9000}\n",
    );
    s += &service("three", all, "");
    s += &service("hash", v1, "");
    s += &service("rr", v1, "");
    s += &service("lr", all, "");
    s += &service("web-v3", "{app: web, version: v3}", "");
    s
}

/// Subsets v1..v3 on `web`, `three` and `lr`; the load balancers of `hash`, `rr` and `lr`.
fn destination_rules() -> String {
    let subsets = "[{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}, \
                   {name: v3, labels: {version: v3}}]";
    let dr = |name: &str, policy: &str| {
        format!(
            "\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: {name}, namespace: shop}}\nspec:\n  host: {name}.shop.svc.cluster.local\n  \
             subsets: {subsets}\n{policy}"
        )
    };
    dr("web", "")
        + &dr("three", "")
        + &dr(
            "hash",
            "  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n",
        )
        + &dr(
            "rr",
            "  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n",
        )
        + &dr(
            "lr",
            "  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}\n",
        )
}

/// VirtualService `web`: `x-user-group: beta` → v3, else v1/v2 by weight; every response
/// carries `x-routes: <generation>` so a client can tell which version of the routes served it.
/// `bad_match` goes into the first rule's match (for the refused edit).
fn vs_web(v1: u32, v2: u32, generation: &str, bad_match: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [{HOST}]
  http:
  - name: beta
    match: [{{headers: {{x-user-group: {{exact: beta}}}}{bad_match}}}]
    route: [{{destination: {{host: {HOST}, subset: v3}}}}]
    headers: {{response: {{set: {{x-routes: {generation}}}}}}}
  - name: split
    route:
    - {{destination: {{host: {HOST}, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: {HOST}, subset: v2}}, weight: {v2}}}
    headers: {{response: {{set: {{x-routes: {generation}}}}}}}
"#
    )
}

/// `three`: 60/30/10 over v1/v2/v3; `lr`: `x-hold: yes` → v2, else every pod.
const VS_OTHERS_YAML: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: three, namespace: shop}
spec:
  hosts: [three.shop.svc.cluster.local]
  http:
  - route:
    - {destination: {host: three.shop.svc.cluster.local, subset: v1}, weight: 60}
    - {destination: {host: three.shop.svc.cluster.local, subset: v2}, weight: 30}
    - {destination: {host: three.shop.svc.cluster.local, subset: v3}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: lr, namespace: shop}
spec:
  hosts: [lr.shop.svc.cluster.local]
  http:
  - match: [{headers: {x-hold: {exact: "yes"}}}]
    route: [{destination: {host: lr.shop.svc.cluster.local, subset: v2}}]
  - route: [{destination: {host: lr.shop.svc.cluster.local}}]
"#;

/// An HTTPRoute on Service `web` sending everything to `web-v3`.
const HTTP_ROUTE_YAML: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-canary, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web-v3, port: 80}]
"#;

/// One response as `mesh-echo client` printed it.
#[derive(Debug, Default, Clone)]
struct Resp {
    status: u16,
    pod: String,
    routes: String,
}

/// Parses `mesh-echo client` output: `[i] StatusCode=…`, `[i] ResponseHeader=X-Routes:…`,
/// `[i body] Hostname=…`. Only responses whose last line (Hostname) arrived are returned.
fn parse_client(out: &str) -> Vec<Resp> {
    let mut by_index: BTreeMap<usize, Resp> = BTreeMap::new();
    let mut done = BTreeSet::new();
    for line in out.lines() {
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((tag, kv)) = rest.split_once("] ") else {
            continue;
        };
        let Some(i) = tag.split(' ').next().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let r = by_index.entry(i).or_default();
        if let Some(v) = kv.strip_prefix("StatusCode=") {
            r.status = v.parse().unwrap_or(0);
        } else if let Some(v) = kv.strip_prefix("ResponseHeader=X-Routes:") {
            r.routes = v.to_string();
        } else if let Some(v) = kv.strip_prefix("Hostname=") {
            r.pod = v.to_string();
            done.insert(i);
        }
    }
    by_index
        .into_iter()
        .filter(|(i, _)| done.contains(i))
        .map(|(_, r)| r)
        .collect()
}

struct Env<'a> {
    mesh: &'a LocalMesh,
    /// Pod name → version label, for every web pod.
    version_of: BTreeMap<String, String>,
}

impl Env<'_> {
    fn vip(&self, name: &str, port: u16) -> SocketAddr {
        let text = std::fs::read_to_string(self.mesh.config_dir.join(APPS)).unwrap();
        let docs = localmesh::render::parse_docs(APPS, &text).unwrap();
        let svc = docs
            .iter()
            .find(|d| localmesh::render::kind(d) == "Service" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Service {name}"));
        let ip = svc["spec"]["clusterIP"].as_str().unwrap();
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    fn echo(&self) -> String {
        self.mesh.bins.echo.display().to_string()
    }

    /// `count` HTTP/1.1 requests on one keep-alive connection from the client pod to
    /// `service`:80, each with `headers`; every one must get 200.
    fn requests(&self, service: &str, count: u32, headers: &[&str]) -> Vec<Resp> {
        let url = format!("http://{}/l7", self.vip(service, 80));
        let echo = self.echo();
        let count_s = count.to_string();
        let mut argv = vec![echo.as_str(), "client", &url, "--count", &count_s];
        for h in headers {
            argv.extend(["-H", h]);
        }
        let out = self.mesh.exec("client", "client", &argv).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "mesh-echo client {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let resps = parse_client(&text);
        assert_eq!(resps.len(), count as usize, "{url}: responses missing");
        let bad: Vec<&Resp> = resps.iter().filter(|r| r.status != 200).collect();
        assert!(
            bad.is_empty(),
            "{url}: non-200 answers: {:?}",
            &bad[..bad.len().min(5)]
        );
        resps
    }

    /// `n` requests split over `par` parallel keep-alive connections (the waypoint decides
    /// per request, so the split is the same; parallel only saves wall-clock time).
    fn requests_par(&self, service: &str, n: u32, par: u32, headers: &[&str]) -> Vec<Resp> {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..par)
                .map(|_| s.spawn(|| self.requests(service, n / par, headers)))
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        })
    }

    /// Responses per version label; panics on a pod that is not a web pod.
    fn by_version(&self, resps: &[Resp]) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for r in resps {
            let v = self
                .version_of
                .get(&r.pod)
                .unwrap_or_else(|| panic!("answered by {:?}, not a web pod", r.pod));
            *m.entry(v.clone()).or_insert(0) += 1;
        }
        m
    }

    fn by_pod(resps: &[Resp]) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for r in resps {
            *m.entry(r.pod.clone()).or_insert(0) += 1;
        }
        m
    }

    fn pods(&self, version: &str) -> Vec<String> {
        self.version_of
            .iter()
            .filter(|(_, v)| *v == version)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// The waypoint pod's log, without terminal colours.
    fn waypoint_log(&self, pod: &str) -> String {
        let path = self.mesh.cluster.dir().join(format!("shop-{pod}-0.log"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(i) = rest.find('\x1b') {
            out.push_str(&rest[..i]);
            rest = rest[i..].find('m').map_or("", |j| &rest[i + j + 1..]);
        }
        out + rest
    }

    /// meshd's status document for route resource `kind shop/name`.
    fn route_status(&self, kind: &str, name: &str) -> String {
        let path = self
            .mesh
            .meshd_out
            .join("status")
            .join(format!("{kind}.shop.{name}.json"));
        std::fs::read_to_string(path).unwrap_or_default()
    }
}

/// Asserts `got` of `n` is within 5σ of `n·p` (see the module doc for why 5σ).
fn within_binomial(what: &str, got: u64, n: u64, p: f64) {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    let dev = (got as f64 - mean).abs();
    assert!(
        dev <= 5.0 * sigma,
        "{what}: {got} of {n}, expected {mean:.0} ± {:.0} (5σ)",
        5.0 * sigma
    );
}

#[test]
fn waypoint_l7_end_to_end() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions::default()).expect("start local mesh");
    mesh.apply(
        NS_FILE,
        &(manifests::namespace("client", true) + &manifests::namespace("shop", true)),
    )
    .unwrap();
    mesh.apply(
        "05-client.yaml",
        &manifests::pod("client", "client", 0, "client", &[]),
    )
    .unwrap();
    mesh.apply(APPS, &apps()).unwrap();
    mesh.apply(DR, &destination_rules()).unwrap();
    mesh.apply(VS_WEB, &vs_web(90, 10, "gen1", "")).unwrap();
    mesh.apply(VS_OTHERS, VS_OTHERS_YAML).unwrap();
    mesh.wait_enrolled("client", "client").unwrap();

    // The CLI path: meshctl writes the Gateway and labels the namespace; --wait returns once
    // meshd reports it Programmed.
    let out = mesh
        .meshctl(&[
            "waypoint",
            "apply",
            "-n",
            "shop",
            "--enroll-namespace",
            "--wait",
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "meshctl waypoint apply: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let waypoint_pod = mesh.wait_for_pods("shop", "waypoint", 1).unwrap()[0].clone();
    mesh.wait_listening("shop", &waypoint_pod, 15008).unwrap();
    let mut version_of = BTreeMap::new();
    for (v, n) in [("v1", 3), ("v2", 1), ("v3", 1)] {
        for p in mesh.wait_for_pods("shop", &format!("web-{v}"), n).unwrap() {
            version_of.insert(p, v.to_string());
        }
    }
    let env = Env {
        mesh: &mesh,
        version_of,
    };
    for svc in ["web", "three", "hash", "rr", "lr"] {
        wait_for(
            DEADLINE,
            &format!("shop/{svc} bound to the waypoint"),
            || {
                let dump = mesh.config_dump(0)?;
                Ok(dump["services"].as_array().is_some_and(|ss| {
                    ss.iter().any(|s| {
                        s["key"] == format!("shop/{svc}") && s["waypoint"]["state"] == "ready"
                    })
                }))
            },
        )
        .unwrap();
    }
    // The first request through the waypoint must already carry the routes.
    wait_for(DEADLINE, "the waypoint to serve gen1 routes", || {
        Ok(env.requests("web", 1, &[])[0].routes == "gen1")
    })
    .unwrap();

    splits(&env);
    header_rule_beats_split(&env);
    load_balancers(&env);
    protocols(&env, &waypoint_pod);
    identities(&env, &waypoint_pod);
    live_weight_change(&env);
    invalid_edit_keeps_routes(&env);
    httproute_beats_virtualservice(&env);
}

/// 90/10 and 60/30/10 splits within 5σ over 2,000 requests each, only on the subsets' pods.
fn splits(env: &Env) {
    let resps = env.requests_par("web", 2000, 4, &[]);
    let v = env.by_version(&resps);
    eprintln!("90/10 over 2000: {v:?}");
    assert_eq!(
        v.get("v3"),
        None,
        "canary answered without the header: {v:?}"
    );
    within_binomial("web v2 (10%)", v.get("v2").copied().unwrap_or(0), 2000, 0.1);
    // Subset v1 spans 3 pods: each must have served some (the subset is the whole label set).
    let pods = Env::by_pod(&resps);
    for p in env.pods("v1") {
        assert!(pods.contains_key(&p), "v1 pod {p} never answered: {pods:?}");
    }

    let resps = env.requests_par("three", 2000, 4, &[]);
    let v = env.by_version(&resps);
    eprintln!("60/30/10 over 2000: {v:?}");
    for (ver, p) in [("v1", 0.6), ("v2", 0.3), ("v3", 0.1)] {
        within_binomial(
            &format!("three {ver}"),
            v.get(ver).copied().unwrap_or(0),
            2000,
            p,
        );
    }
}

/// `x-user-group: beta` goes to v3 only; without it, never to v3.
fn header_rule_beats_split(env: &Env) {
    let beta = env.requests("web", 100, &["x-user-group:beta"]);
    let v = env.by_version(&beta);
    assert_eq!(v.get("v3"), Some(&100), "beta requests: {v:?}");
    let other = env.requests("web", 200, &["x-user-group:alpha"]);
    let v = env.by_version(&other);
    assert_eq!(
        v.get("v3"),
        None,
        "non-beta requests reached the canary: {v:?}"
    );
    assert!(v.contains_key("v1") && v.contains_key("v2"), "{v:?}");
}

fn load_balancers(env: &Env) {
    // Consistent hash on x-user: one user's 50 requests all land on one pod; 12 users spread
    // over more than one (all 12 on one of 3 pods by chance: 3^-11).
    let mut homes = BTreeSet::new();
    for u in 0..12 {
        let h = format!("x-user:user-{u}");
        let resps = env.requests("hash", 50, &[&h]);
        let pods = Env::by_pod(&resps);
        assert_eq!(pods.len(), 1, "user-{u} was not sticky: {pods:?}");
        homes.extend(pods.into_keys());
    }
    assert!(homes.len() > 1, "every user hashed to {homes:?}");

    // Round robin over the 3 v1 pods: 300 sequential requests, 100 ± 1 each (random picking
    // would give σ ≈ 8 per pod, so a spread this even is round robin's alone).
    let pods = Env::by_pod(&env.requests("rr", 300, &[]));
    eprintln!("round robin over 300: {pods:?}");
    assert_eq!(pods.len(), 3, "{pods:?}");
    let (lo, hi) = (pods.values().min().unwrap(), pods.values().max().unwrap());
    assert!(hi - lo <= 2, "round robin uneven: {pods:?}");

    // Least request: idle, every pod (v2 included) gets requests; with a request held open
    // on v2 (an upload that never ends), new requests avoid it (under random picking, 60
    // requests missing v2 has probability 0.8^60 ≈ 1.5e-6).
    let v2 = env.pods("v2")[0].clone();
    let idle = Env::by_pod(&env.requests("lr", 100, &[]));
    assert!(idle.contains_key(&v2), "idle v2 got nothing: {idle:?}");
    let url = format!("http://{}/hold", env.vip("lr", 80));
    let client = env.mesh.pod("client", "client").unwrap();
    let mut hold = Command::new("sh");
    hold.args([
        "-c",
        &format!("sleep 120 | curl -sS -T - -H 'Expect:' -H 'x-hold: yes' {url}"),
    ]);
    let mut hold = env.mesh.cluster.spawn(&client.netns, hold, "hold").unwrap();
    let mut busy = BTreeMap::new();
    let waited = wait_for(DEADLINE, "new requests to avoid the busy v2", || {
        busy = Env::by_pod(&env.requests("lr", 20, &[]));
        Ok(!busy.contains_key(&v2))
    });
    let after = Env::by_pod(&env.requests("lr", 60, &[]));
    hold.kill();
    waited.unwrap_or_else(|e| panic!("{e:#}: {busy:?}"));
    eprintln!("least request with v2 busy: {after:?}");
    assert!(!after.contains_key(&v2), "busy v2 still picked: {after:?}");
}

fn protocols(env: &Env, waypoint_pod: &str) {
    let echo = env.echo();
    let grpc = env.vip("web", 9090).to_string();
    for method in ["unary", "server-stream", "client-stream", "bidi"] {
        let out = env
            .mesh
            .exec(
                "client",
                "client",
                &[
                    &echo,
                    "grpc-call",
                    "--addr",
                    &grpc,
                    "--method",
                    method,
                    "--count",
                    "3",
                    "--status",
                    "7",
                    "--status-message",
                    "denied-by-test",
                    "--trailer",
                    "x-trail=kept",
                ],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "gRPC {method} through the waypoint: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("x-trail") && text.contains("kept") && text.contains("denied-by-test"),
            "gRPC {method}: trailer or message lost: {text}"
        );
    }

    let ws = format!("ws://{}/ws", env.vip("web", 80));
    let out = env
        .mesh
        .exec(
            "client",
            "client",
            &[
                &echo,
                "ws",
                "--url",
                &ws,
                "--count",
                "3",
                "--message",
                "ws-hello",
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.matches("ws-hello").count() == 3,
        "WebSocket through the waypoint: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The WHO line protocol on a tcp port: bytes through untouched, answered by a web pod.
    let client = env.mesh.pod("client", "client").unwrap();
    let mut conn = WhoConn::connect(&client, env.vip("web", 9000)).unwrap();
    for i in 0..3 {
        let reply = conn.who(&format!("line-{i}")).unwrap();
        assert!(
            env.version_of.contains_key(served_by(&reply)),
            "WHO answered by {reply}"
        );
    }
    drop(conn);
    // ... and it went through the waypoint, as a TCP connection (not parsed as HTTP).
    let mut log = String::new();
    wait_for(DEADLINE, "the waypoint to log the TCP connection", || {
        log = env.waypoint_log(waypoint_pod);
        Ok(log.lines().any(|l| {
            l.contains(" connection ") && l.contains("dst.port=9000") && l.contains("TCP")
        }))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{}",
            log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        )
    });
}

/// The waypoint's access log names the client's identity; the destination's ztunnel counts
/// the waypoint's.
fn identities(env: &Env, waypoint_pod: &str) {
    env.requests("web", 1, &["x-user-group:beta"]);
    let log = env.waypoint_log(waypoint_pod);
    assert!(
        log.lines()
            .any(|l| l.contains("request") && l.contains(CLIENT_IDENTITY)),
        "the waypoint's log never names {CLIENT_IDENTITY}:\n{}",
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    let v3 = env.pods("v3")[0].clone();
    let node = env.mesh.pod("shop", &v3).unwrap().node;
    let n = env.mesh.cluster.nodes()[node].clone();
    let mut text = String::new();
    wait_for(DEADLINE, "v3's ztunnel to count the waypoint", || {
        let out = env.mesh.cluster.run(
            &n.netns,
            &[
                "curl",
                "-sf",
                "--max-time",
                "5",
                "http://127.0.0.1:15020/metrics",
            ],
        )?;
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(text.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&format!("source_principal=\"{WAYPOINT_IDENTITY}\""))
                // Istio's workload name: the Deployment, not the pod.
                && l.contains("destination_workload=\"web-v3\"")
        }))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{text}"));
}

/// Weights rewritten under a steady keep-alive stream: no request fails, and responses of the
/// new routes (marked `x-routes: gen2`) split 10/90.
fn live_weight_change(env: &Env) {
    let client = env.mesh.pod("client", "client").unwrap();
    let url = format!("http://{}/live", env.vip("web", 80));
    let mut cmd = Command::new(env.echo());
    cmd.args(["client", &url, "--count", "100000", "--timeout", "5s"]);
    let mut stream = env
        .mesh
        .cluster
        .spawn(&client.netns, cmd, "live-stream")
        .unwrap();
    let log = stream.log_path().to_path_buf();
    let seen = || parse_client(&std::fs::read_to_string(&log).unwrap_or_default());
    let flowing = wait_for(DEADLINE, "500 responses before the change", || {
        Ok(seen().len() >= 500)
    });
    if let Err(e) = flowing {
        stream.kill();
        panic!("{e:#}");
    }
    env.mesh.apply(VS_WEB, &vs_web(10, 90, "gen2", "")).unwrap();
    let mut last = Vec::new();
    let enough = wait_for(Duration::from_secs(60), "1000 responses of gen2", || {
        last = seen();
        Ok(last.iter().filter(|r| r.routes == "gen2").count() >= 1000)
    });
    let still_running = matches!(stream.try_wait(), Ok(None));
    stream.kill();
    enough.unwrap_or_else(|e| panic!("{e:#}: {} responses", last.len()));
    assert!(
        still_running,
        "the stream ended early (a request failed):\n{}",
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let failed: Vec<&Resp> = last.iter().filter(|r| r.status != 200).collect();
    assert!(failed.is_empty(), "failed during the change: {failed:?}");
    let gen1: Vec<Resp> = last
        .iter()
        .filter(|r| r.routes == "gen1")
        .cloned()
        .collect();
    let gen2: Vec<Resp> = last
        .iter()
        .filter(|r| r.routes == "gen2")
        .cloned()
        .collect();
    assert_eq!(gen1.len() + gen2.len(), last.len(), "unmarked responses");
    let (v1, v2) = (env.by_version(&gen1), env.by_version(&gen2));
    eprintln!("live change: gen1 {v1:?}, gen2 {v2:?}");
    let n2 = gen2.len() as u64;
    within_binomial("gen2 v2 (90%)", v2.get("v2").copied().unwrap_or(0), n2, 0.9);
    let n1 = gen1.len() as u64;
    within_binomial("gen1 v2 (10%)", v1.get("v2").copied().unwrap_or(0), n1, 0.1);
}

/// An edit with an invalid regex is refused naming the field; gen2 stays in force.
fn invalid_edit_keeps_routes(env: &Env) {
    env.mesh
        .apply(
            VS_WEB,
            &vs_web(50, 50, "gen3", ", uri: {regex: \"(unclosed\"}"),
        )
        .unwrap();
    let field = "spec.http[0].match[0].uri.regex";
    let mut status = String::new();
    wait_for(
        DEADLINE,
        "meshd to refuse the invalid VirtualService",
        || {
            status = env.route_status("VirtualService", "web");
            Ok(status.contains(field) && status.contains("\"False\""))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{status}\n{}", env.mesh.meshd_log()));
    assert!(
        env.mesh.meshd_log().contains(field),
        "meshd's log does not name {field}"
    );
    let resps = env.requests_par("web", 1000, 4, &[]);
    assert!(
        resps.iter().all(|r| r.routes == "gen2"),
        "the refused edit took effect"
    );
    let v = env.by_version(&resps);
    eprintln!("after the refused edit: {v:?}");
    within_binomial(
        "v2 after refused edit",
        v.get("v2").copied().unwrap_or(0),
        1000,
        0.9,
    );
}

/// An HTTPRoute on `web` wins over its VirtualService (everything to web-v3); the
/// VirtualService's status reports the conflict naming the HTTPRoute.
fn httproute_beats_virtualservice(env: &Env) {
    env.mesh.apply(VS_WEB, &vs_web(10, 90, "gen2", "")).unwrap();
    env.mesh.apply(HTTP_ROUTE, HTTP_ROUTE_YAML).unwrap();
    let mut v = BTreeMap::new();
    wait_for(DEADLINE, "the HTTPRoute to take over", || {
        v = env.by_version(&env.requests("web", 20, &[]));
        Ok(v.keys().eq(["v3"]))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {v:?}"));
    let resps = env.requests("web", 200, &[]);
    let v = env.by_version(&resps);
    assert_eq!(v.get("v3"), Some(&200), "{v:?}");
    assert!(
        resps.iter().all(|r| r.routes.is_empty()),
        "VirtualService headers applied"
    );
    let mut status = String::new();
    wait_for(
        DEADLINE,
        "the conflict in the VirtualService's status",
        || {
            status = env.route_status("VirtualService", "web");
            Ok(status.contains("HTTPRoute shop/web-canary") && status.contains("onflict"))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{status}"));
    env.mesh.remove(HTTP_ROUTE).unwrap();
}
