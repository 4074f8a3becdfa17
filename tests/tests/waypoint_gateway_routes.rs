//! The HTTPRoute and GRPCRoute matches not covered by gateway_conformance.rs, and every
//! DestinationRule consistent-hash source plus RANDOM, end to end through a real waypoint with
//! real clients (curl, `mesh-echo grpc-call`). Route rules that match tag the request with
//! `x-rule: <rule>` (a RequestHeaderModifier) and send it to web-v2; HTTP misses fall through to
//! a catch-all on web-v1; the GRPCRoute has no catch-all, so a gRPC miss must end the call with
//! a non-OK status. Each row is one request (or a batch for load balancing) that must hit or
//! must not.
//!
//! One mesh, one test; every failing row is reported by name at the end; torn down even when
//! an assertion fails (LocalMesh's drop). Owns only this file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{manifests, privileged};
use serde_json::Value;

const APPS: &str = "10-apps.yaml";
const ROUTES: &str = "30-routes.yaml";
const DEADLINE: Duration = Duration::from_secs(30);
/// Services that load-balance over the three web-v1 pods, each with its DestinationRule.
const LB: [(&str, &str); 4] = [
    ("random", "{simple: RANDOM}"),
    (
        "cookie",
        "{consistentHash: {httpCookie: {name: sticky, ttl: 60s}}}",
    ),
    ("srcip", "{consistentHash: {useSourceIp: true}}"),
    ("query", "{consistentHash: {httpQueryParameterName: user}}"),
];

/// web-v1 (3 pods) and web-v2 (1 pod): HTTP on 8080, gRPC on 9090.
fn apps() -> String {
    let mut s = String::new();
    for (v, n) in [("v1", 3), ("v2", 1)] {
        s += &format!(
            r#"
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-{v}, namespace: shop}}
spec:
  replicas: {n}
  selector: {{matchLabels: {{app: web, version: {v}}}}}
  template:
    metadata: {{labels: {{app: web, version: {v}}}}}
    spec:
      serviceAccountName: web
      containers:
      - name: echo
        command: [mesh-echo, serve]
        args: ["--port", "9000", "--http-port", "8080", "--grpc-port", "9090"]
"#
        );
    }
    let svc = |name: &str, sel: &str| {
        format!(
            "\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  selector: {sel}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  \
             - {{name: grpc, port: 9090, targetPort: 9090, appProtocol: grpc}}\n"
        )
    };
    s += &svc("web", "{app: web}");
    s += &svc("web-v1", "{app: web, version: v1}");
    s += &svc("web-v2", "{app: web, version: v2}");
    for (name, _) in LB {
        s += &svc(name, "{app: web, version: v1}");
    }
    s
}

/// The routes and DestinationRules. For mutation checks, `ROUTES_MUTATE='from=>to'` replaces
/// the first `from` in the YAML (the rows guarding it must then fail).
fn routes() -> String {
    let tag = |rule: &str| {
        format!(
            "    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-rule, value: {rule}}}]}}}}]\n"
        )
    };
    let http_rules = [
        ("ready", "[{path: {type: Exact, value: /ready}}]"),
        (
            "method",
            "[{path: {type: PathPrefix, value: /method}, method: POST}]",
        ),
        (
            "path-regex",
            r#"[{path: {type: RegularExpression, value: "/re/[0-9]+"}}]"#,
        ),
        (
            "header-regex",
            r#"[{path: {value: /hre}, headers: [{type: RegularExpression, name: x-hr, value: "[0-9]+"}]}]"#,
        ),
        (
            "query-regex",
            r#"[{path: {value: /qre}, queryParams: [{type: RegularExpression, name: qr, value: "[0-9]+"}]}]"#,
        ),
    ];
    let mut http = String::new();
    for (rule, m) in http_rules {
        http += &format!(
            "  - matches: {m}\n{}    backendRefs: [{{name: web-v2, port: 80}}]\n",
            tag(rule)
        );
    }
    // The fall-through covers only the other rules' prefixes: any PathPrefix outranks a
    // RegularExpression path (Istio's order: exact > prefix > regex), so /re/* has none.
    http += "  - matches: [{path: {value: /method}}, {path: {value: /hre}}, {path: {value: /qre}}]\n    \
             backendRefs: [{name: web-v1, port: 80}]\n";
    // Each gRPC rule also needs `x-case: <rule>`, so a miss cannot land on another rule.
    let grpc_rules = [
        ("ready", "{service: mesh.echo.v1.Echo, method: Unary}"),
        (
            "svc-method",
            "{type: Exact, service: mesh.echo.v1.Echo, method: ServerStream}",
        ),
        ("svc-only", "{service: mesh.echo.v1.Echo}"),
        ("svc-other", "{service: mesh.echo.v1.Other}"),
        ("method-only", "{method: Bidi}"),
        (
            "method-regex",
            r#"{type: RegularExpression, service: "mesh\\.echo\\..+", method: "Server.*"}"#,
        ),
    ];
    let mut grpc = String::new();
    for (rule, m) in grpc_rules {
        grpc += &format!(
            "  - matches: [{{method: {m}, headers: [{{name: x-case, value: {rule}}}]}}]\n{}    \
             backendRefs: [{{name: web-v2, port: 9090}}]\n",
            tag(rule)
        );
    }
    grpc += &format!(
        "  - matches: [{{headers: [{{name: x-g, value: \"yes\"}}]}}]\n{}    backendRefs: [{{name: web-v2, port: 9090}}]\n",
        tag("header-exact")
    );
    grpc += &format!(
        "  - matches: [{{headers: [{{type: RegularExpression, name: x-gr, value: \"[0-9]+\"}}]}}]\n{}    \
         backendRefs: [{{name: web-v2, port: 9090}}]\n",
        tag("header-regex")
    );
    grpc += "  - matches: [{headers: [{name: x-case, value: modifiers}]}]\n    filters:\n    \
             - type: RequestHeaderModifier\n      requestHeaderModifier: {set: [{name: x-set, value: route}], \
             add: [{name: x-add, value: route}], remove: [x-remove]}\n    \
             - type: ResponseHeaderModifier\n      responseHeaderModifier: {set: [{name: x-resp-set, value: route}], \
             add: [{name: x-resp-add, value: route}]}\n    \
             backendRefs: [{name: web-v2, port: 9090}]\n";
    let mut yaml = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n{http}\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 9090}}]\n  rules:\n{grpc}"
    );
    for (name, lb) in LB {
        yaml += &format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: {name}, namespace: shop}}\nspec:\n  host: {name}.shop.svc.cluster.local\n  \
             trafficPolicy: {{loadBalancer: {lb}}}\n"
        );
    }
    match std::env::var("ROUTES_MUTATE").ok().and_then(|m| {
        let (from, to) = m.split_once("=>")?;
        Some((from.to_string(), to.to_string()))
    }) {
        Some((from, to)) => {
            assert!(
                yaml.contains(&from),
                "ROUTES_MUTATE: {from:?} not in the YAML"
            );
            eprintln!("!!! mutated: {from:?} => {to:?}");
            yaml.replacen(&from, &to, 1)
        }
        None => yaml,
    }
}

/// One HTTP answer: status, response headers (lowercase names), the echo's JSON body.
#[derive(Debug, Default)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    fn pod(&self) -> &str {
        self.body["pod"].as_str().unwrap_or("")
    }
    /// Values the HTTP backend saw for request header `name` (Go-style canonical key).
    fn seen(&self, name: &str) -> Vec<&str> {
        self.body["headers"][name]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }
}

/// One gRPC call: its status and, if a reply came, the pod and the metadata it received.
#[derive(Debug, Default)]
struct Call {
    status: i64,
    pod: String,
    metadata: Value,
}

impl Call {
    fn md(&self, key: &str) -> Vec<&str> {
        self.metadata[key]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }
}

struct Env<'a> {
    mesh: &'a LocalMesh,
    vips: BTreeMap<String, String>,
}

impl Env<'_> {
    fn vip(&self, name: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.vips[name].parse().unwrap(), port)
    }

    /// curl from `pod` in namespace client; `urls` are paths on `service:80`. Every reply.
    fn curl_from(
        &self,
        pod: &str,
        service: &str,
        urls: &[String],
        args: &[&str],
    ) -> Result<Vec<Reply>, String> {
        let base = format!("http://{}", self.vip(service, 80));
        let full: Vec<String> = urls.iter().map(|u| format!("{base}{u}")).collect();
        let mut argv = vec!["curl", "-sS", "--max-time", "10", "-D", "-"];
        argv.extend(args);
        argv.extend(full.iter().map(String::as_str));
        let out = self
            .mesh
            .exec("client", pod, &argv)
            .map_err(|e| format!("{e:#}"))?;
        if !out.status.success() {
            return Err(format!("curl: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut replies = Vec::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("HTTP/") {
            rest = &rest[start..];
            let (head, after) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
            let mut lines = head.lines();
            let status = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_string()))
                .collect();
            let mut de = serde_json::Deserializer::from_str(after).into_iter::<Value>();
            let body = match de.next() {
                Some(Ok(v)) => v,
                _ => Value::Null,
            };
            rest = &after[de.byte_offset()..];
            replies.push(Reply {
                status,
                headers,
                body,
            });
        }
        if replies.len() != urls.len() {
            return Err(format!(
                "{} replies for {} requests",
                replies.len(),
                urls.len()
            ));
        }
        Ok(replies)
    }

    fn curl(&self, path: &str, args: &[&str]) -> Result<Reply, String> {
        let mut r = self.curl_from("client", "web", &[path.to_string()], args)?;
        Ok(r.remove(0))
    }

    /// One `mesh-echo grpc-call` to web:9090 with `method` and metadata `k=v` pairs.
    fn grpc(&self, method: &str, md: &[&str]) -> Result<Call, String> {
        let echo = self.mesh.bins.echo.display().to_string();
        let addr = self.vip("web", 9090).to_string();
        let mut argv = vec![
            echo.as_str(),
            "grpc-call",
            "--addr",
            &addr,
            "--method",
            method,
            "--timeout",
            "5s",
        ];
        for kv in md {
            argv.extend(["--metadata", kv]);
        }
        // Non-zero exit is a non-OK call: the status line says which.
        let out = self
            .mesh
            .exec("client", "client", &argv)
            .map_err(|e| format!("{e:#}"))?;
        let mut call = Call {
            status: -1,
            ..Call::default()
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let Some(s) = v["status"].as_i64() {
                call.status = s;
            } else if let Some(p) = v["pod"].as_str() {
                call.pod = p.to_string();
                call.metadata = v["metadata"].clone();
            }
        }
        if call.status < 0 {
            return Err(format!(
                "no status line: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(call)
    }
}

fn tagged(r: &Reply, rule: &str) -> Result<(), String> {
    if r.status == 200 && r.pod().starts_with("web-v2") && r.seen("X-Rule") == [rule] {
        Ok(())
    } else {
        Err(format!(
            "want rule {rule} (web-v2, X-Rule {rule}), got {} {} {:?}",
            r.status,
            r.pod(),
            r.seen("X-Rule")
        ))
    }
}

fn catch_all(r: &Reply) -> Result<(), String> {
    if r.status == 200 && r.pod().starts_with("web-v1") && r.seen("X-Rule").is_empty() {
        Ok(())
    } else {
        Err(format!(
            "want catch-all web-v1 untagged, got {} {} {:?}",
            r.status,
            r.pod(),
            r.seen("X-Rule")
        ))
    }
}

fn grpc_hit(c: &Call, rule: &str) -> Result<(), String> {
    if c.status == 0 && c.pod.starts_with("web-v2") && c.md("x-rule") == [rule] {
        Ok(())
    } else {
        Err(format!("want OK via rule {rule}, got {c:?}"))
    }
}

/// Gateway API: a GRPCRoute request that matches no rule is not served (UNIMPLEMENTED or a
/// 404, which gRPC clients see as UNIMPLEMENTED): any non-OK status, and no reply.
fn grpc_miss(c: &Call) -> Result<(), String> {
    if c.status != 0 && c.pod.is_empty() {
        Ok(())
    } else {
        Err(format!("want a non-OK status and no reply, got {c:?}"))
    }
}

fn by_pod(rs: &[Reply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in rs {
        *m.entry(r.pod().to_string()).or_insert(0) += 1;
    }
    m
}

/// All requests answered 200 by one single web-v1 pod.
fn sticky(rs: &[Reply]) -> Result<(), String> {
    let m = by_pod(rs);
    if rs.iter().all(|r| r.status == 200)
        && m.len() == 1
        && m.keys().all(|p| p.starts_with("web-v1"))
    {
        Ok(())
    } else {
        Err(format!("want one web-v1 pod, got {m:?}"))
    }
}

/// All requests answered 200 by web-v1 pods, more than one of them.
fn spread(rs: &[Reply]) -> Result<(), String> {
    let m = by_pod(rs);
    if rs.iter().all(|r| r.status == 200) && m.len() > 1 {
        Ok(())
    } else {
        Err(format!("want several pods, got {m:?}"))
    }
}

fn urls(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

type Row<'a> = (&'static str, Box<dyn Fn() -> Result<(), String> + 'a>);

fn rows<'a>(env: &'a Env<'a>) -> Vec<Row<'a>> {
    let h = |path: &'static str, args: &'static [&'static str], rule: &'static str| {
        Box::new(move || tagged(&env.curl(path, args)?, rule)) as Box<dyn Fn() -> _>
    };
    let m = |path: &'static str, args: &'static [&'static str]| {
        Box::new(move || catch_all(&env.curl(path, args)?)) as Box<dyn Fn() -> _>
    };
    let g = |method: &'static str, md: &'static [&'static str], rule: &'static str| {
        Box::new(move || grpc_hit(&env.grpc(method, md)?, rule)) as Box<dyn Fn() -> _>
    };
    let gm = |method: &'static str, md: &'static [&'static str]| {
        Box::new(move || grpc_miss(&env.grpc(method, md)?)) as Box<dyn Fn() -> _>
    };
    vec![
        (
            "HTTPRoute method POST: hit",
            h("/method", &["-X", "POST"], "method"),
        ),
        ("HTTPRoute method: GET misses", m("/method", &[])),
        ("HTTPRoute path regex: hit", h("/re/123", &[], "path-regex")),
        (
            "HTTPRoute path regex: miss is a 404",
            Box::new(move || match env.curl("/re/abc", &[])? {
                r if r.status == 404 => Ok(()),
                r => Err(format!("want 404, got {} {}", r.status, r.pod())),
            }),
        ),
        (
            "HTTPRoute header regex: hit",
            h("/hre", &["-H", "x-hr: 123"], "header-regex"),
        ),
        (
            "HTTPRoute header regex: miss",
            m("/hre", &["-H", "x-hr: abc"]),
        ),
        (
            "HTTPRoute query regex: hit",
            h("/qre?qr=42", &[], "query-regex"),
        ),
        ("HTTPRoute query regex: miss", m("/qre?qr=xy", &[])),
        (
            "GRPCRoute service+method: hit",
            g("server-stream", &["x-case=svc-method"], "svc-method"),
        ),
        (
            "GRPCRoute service+method: other method misses",
            gm("unary", &["x-case=svc-method"]),
        ),
        (
            "GRPCRoute service only: hit",
            g("unary", &["x-case=svc-only"], "svc-only"),
        ),
        (
            "GRPCRoute service only: other service misses",
            gm("unary", &["x-case=svc-other"]),
        ),
        (
            "GRPCRoute method only: hit",
            g("bidi", &["x-case=method-only"], "method-only"),
        ),
        (
            "GRPCRoute method only: other method misses",
            gm("unary", &["x-case=method-only"]),
        ),
        (
            "GRPCRoute method regex: hit",
            g("server-stream", &["x-case=method-regex"], "method-regex"),
        ),
        (
            "GRPCRoute method regex: miss",
            gm("client-stream", &["x-case=method-regex"]),
        ),
        (
            "GRPCRoute header exact: hit",
            g("unary", &["x-g=yes"], "header-exact"),
        ),
        ("GRPCRoute header exact: miss", gm("unary", &["x-g=yes2"])),
        (
            "GRPCRoute header regex: hit",
            g("unary", &["x-gr=123"], "header-regex"),
        ),
        ("GRPCRoute header regex: miss", gm("unary", &["x-gr=abc"])),
        (
            "GRPCRoute RequestHeaderModifier: set/add/remove",
            Box::new(move || {
                let c = env.grpc(
                    "unary",
                    &[
                        "x-case=modifiers",
                        "x-set=client",
                        "x-add=client",
                        "x-remove=gone",
                    ],
                )?;
                let add = c.md("x-add");
                if c.status == 0
                    && c.md("x-set") == ["route"]
                    && add.contains(&"client")
                    && add.contains(&"route")
                    && c.md("x-remove").is_empty()
                {
                    Ok(())
                } else {
                    Err(format!(
                        "want x-set route, x-add client+route, no x-remove: {c:?}"
                    ))
                }
            }),
        ),
        (
            "GRPCRoute RequestHeaderModifier: other rule untouched",
            Box::new(move || {
                let c = env.grpc("unary", &["x-g=yes", "x-set=client", "x-remove=kept"])?;
                if c.status == 0 && c.md("x-set") == ["client"] && c.md("x-remove") == ["kept"] {
                    Ok(())
                } else {
                    Err(format!("want x-set client, x-remove kept: {c:?}"))
                }
            }),
        ),
        (
            "GRPCRoute ResponseHeaderModifier: set/add (h2 curl)",
            Box::new(move || {
                let r = grpc_curl(env, "modifiers")?;
                if r.header("x-resp-set") == ["route"] && r.header("x-resp-add") == ["route"] {
                    Ok(())
                } else {
                    Err(format!("want x-resp-set/x-resp-add route: {:?}", r.headers))
                }
            }),
        ),
        (
            "GRPCRoute ResponseHeaderModifier: other rule untouched",
            Box::new(move || {
                let r = grpc_curl(env, "svc-only")?;
                if r.status == 200 && r.header("x-resp-set").is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "want 200 without x-resp-set: {} {:?}",
                        r.status, r.headers
                    ))
                }
            }),
        ),
        // RANDOM over 3 pods, 300 requests: each pod's share is Binomial(300, 1/3), σ ≈ 2.7
        // points; 60% is ~10σ above the mean, so a fair spread never trips it, while a
        // balancer pinned to one pod (100%) or two (≥50% each, one pod unreached) fails.
        (
            "DestinationRule RANDOM: 3 pods reached, none over 60% of 300",
            Box::new(move || {
                let rs = env.curl_from("client", "random", &urls("/r?i=", 300), &[])?;
                let m = by_pod(&rs);
                let ok = rs.iter().all(|r| r.status == 200)
                    && m.len() == 3
                    && m.keys().all(|p| p.starts_with("web-v1"))
                    && m.values().all(|&n| n * 100 <= 60 * 300);
                if ok { Ok(()) } else { Err(format!("{m:?}")) }
            }),
        ),
        (
            "consistentHash httpCookie: Set-Cookie, then the cookie sticks",
            Box::new(move || {
                let first = env.curl_from("client", "cookie", &["/c".into()], &[])?;
                let cookie = first[0]
                    .header("set-cookie")
                    .first()
                    .and_then(|c| c.split(';').next())
                    .filter(|c| c.starts_with("sticky="))
                    .ok_or_else(|| format!("no Set-Cookie sticky=: {:?}", first[0].headers))?
                    .to_string();
                sticky(&env.curl_from("client", "cookie", &urls("/c?i=", 30), &["-b", &cookie])?)
            }),
        ),
        (
            "consistentHash httpCookie: other cookie values spread",
            Box::new(move || {
                // 12 values over 3 pods: all on one pod has p = 3·(1/3)^12 ≈ 6·10⁻⁶.
                let mut rs = Vec::new();
                for i in 0..12 {
                    let c = format!("sticky=value-{i}");
                    rs.extend(env.curl_from("client", "cookie", &["/c".into()], &["-b", &c])?);
                }
                spread(&rs)
            }),
        ),
        (
            "consistentHash useSourceIp: one client sticks",
            Box::new(move || sticky(&env.curl_from("client", "srcip", &urls("/s?i=", 30), &[])?)),
        ),
        (
            "consistentHash useSourceIp: second client sticks too",
            Box::new(move || {
                sticky(&env.curl_from("client2", "srcip", &urls("/s?i=", 30), &[])?)
            }),
        ),
        (
            "consistentHash httpQueryParameterName: same value sticks",
            Box::new(move || {
                let u: Vec<String> = (0..30).map(|i| format!("/q?user=alice&i={i}")).collect();
                sticky(&env.curl_from("client", "query", &u, &[])?)
            }),
        ),
        (
            "consistentHash httpQueryParameterName: different values spread",
            Box::new(move || {
                spread(&env.curl_from("client", "query", &urls("/q?user=u", 30), &[])?)
            }),
        ),
    ]
}

/// A gRPC Unary request by curl over HTTP/2 (tonic shows no response headers of an OK call);
/// the body is empty, so the echo's answer may be an error status: only the head matters.
fn grpc_curl(env: &Env, case: &str) -> Result<Reply, String> {
    let url = format!("http://{}/mesh.echo.v1.Echo/Unary", env.vip("web", 9090));
    let case = format!("x-case: {case}");
    let argv = [
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--http2-prior-knowledge",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        &case,
        "--data-binary",
        "",
        &url,
    ];
    let out = env
        .mesh
        .exec("client", "client", &argv)
        .map_err(|e| format!("{e:#}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("curl h2: {}", String::from_utf8_lossy(&out.stderr)))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: Value::Null,
    })
}

#[test]
fn gateway_routes_and_load_balancers_through_the_waypoint() {
    if !privileged() {
        return;
    }
    let mesh = LocalMesh::start(MeshOptions::default()).expect("start local mesh");
    mesh.apply(
        "00-namespaces.yaml",
        &(manifests::namespace("client", true) + &manifests::namespace("shop", true)),
    )
    .unwrap();
    mesh.apply(
        "05-client.yaml",
        &(manifests::pod("client", "client", 0, "client", &[])
            + "\n---\n"
            + &manifests::pod("client", "client2", 0, "client", &[])),
    )
    .unwrap();
    mesh.apply(APPS, &apps()).unwrap();
    mesh.apply(ROUTES, &routes()).unwrap();
    mesh.wait_enrolled("client", "client").unwrap();
    mesh.wait_enrolled("client", "client2").unwrap();
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
    for (v, n) in [("v1", 3), ("v2", 1)] {
        for pod in mesh.wait_for_pods("shop", &format!("web-{v}"), n).unwrap() {
            mesh.wait_listening("shop", &pod, 8080).unwrap();
            mesh.wait_listening("shop", &pod, 9090).unwrap();
        }
    }
    let text = std::fs::read_to_string(mesh.config_dir.join(APPS)).unwrap();
    let docs = localmesh::render::parse_docs(APPS, &text).unwrap();
    let vips = docs
        .iter()
        .filter(|d| localmesh::render::kind(d) == "Service")
        .map(|d| {
            let name = d["metadata"]["name"].as_str().unwrap_or("").to_string();
            let ip = d["spec"]["clusterIP"].as_str().unwrap_or("").to_string();
            (name, ip)
        })
        .collect();
    let env = Env { mesh: &mesh, vips };
    // Config is in force once both routes' `ready` rules answer (one config push carries it
    // all); those rules are no row's, so a mutated row cannot stall the wait.
    let mut last = String::new();
    wait_for(DEADLINE, "the waypoint to serve the routes", || {
        let h = env.curl("/ready", &[]).and_then(|r| tagged(&r, "ready"));
        let g = env
            .grpc("unary", &["x-case=ready"])
            .and_then(|c| grpc_hit(&c, "ready"));
        last = format!("{h:?} {g:?}");
        Ok(h.is_ok() && g.is_ok())
    })
    .unwrap_or_else(|e| panic!("{e:#}: {last}"));

    let all = rows(&env);
    let mut failed = Vec::new();
    for (name, check) in &all {
        match check() {
            Ok(()) => eprintln!("ok   {name}"),
            Err(e) => {
                eprintln!("FAIL {name}: {e}");
                failed.push(format!("{name}: {e}"));
            }
        }
    }
    eprintln!("{} of {} rows passed", all.len() - failed.len(), all.len());
    assert!(
        failed.is_empty(),
        "{} rows failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
