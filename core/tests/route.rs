//! meshcore::route decisions: every VirtualService / HTTPRoute / GRPCRoute match type and filter
//! with a request that matches and one that must not, weighted splits against binomial bounds,
//! precedence and consumer routes (tables from the Gateway API mesh conformance expectations),
//! conflicts, and the default route.

use http::{HeaderMap, HeaderName, HeaderValue};
use meshcore::route::{
    Diagnostic, HttpDecision, HttpRequestInfo, PortInfo, RouteResourceRef, RouteTable, ServiceInfo,
    Severity, compile,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

const NS: &str = "mesh";

fn service(ns: &str, name: &str, ports: &[u16]) -> ServiceInfo {
    ServiceInfo {
        key: format!("{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        hostname: format!("{name}.{ns}.svc.cluster.local"),
        ports: ports
            .iter()
            .map(|p| PortInfo {
                port: *p,
                name: format!("http-{p}"),
                app_protocol: String::new(),
            })
            .collect(),
    }
}

fn services() -> Vec<ServiceInfo> {
    vec![
        service(NS, "echo", &[80, 8080, 7070]),
        service(NS, "echo-v1", &[80, 8080, 7070]),
        service(NS, "echo-v2", &[80, 8080, 7070]),
        service(NS, "web", &[80]),
        service(NS, "db", &[5432]),
        service("other", "web", &[80]),
    ]
}

/// (kind, namespace, name, spec) in age order.
fn build(resources: &[(&str, &str, &str, Value)]) -> (RouteTable, Vec<Diagnostic>) {
    let refs: Vec<RouteResourceRef<'_>> = resources
        .iter()
        .enumerate()
        .map(|(i, (kind, ns, name, spec))| RouteResourceRef {
            kind,
            namespace: ns,
            name,
            spec,
            generation_order: i as i64,
        })
        .collect();
    compile(&refs, &services(), "cluster.local")
}

fn table(resources: &[(&str, &str, &str, Value)]) -> RouteTable {
    let (t, d) = build(resources);
    let errors: Vec<_> = d.iter().filter(|d| d.severity == Severity::Error).collect();
    assert!(errors.is_empty(), "unexpected errors: {errors:?}");
    t
}

/// A request; fields set by builder methods.
struct Req {
    service: String,
    port: u16,
    method: String,
    scheme: String,
    authority: String,
    path: String,
    headers: HeaderMap,
    client_ns: Option<String>,
}

fn req(service: &str, path: &str) -> Req {
    let name = service.rsplit('/').next().unwrap_or(service).to_string();
    Req {
        service: service.into(),
        port: 80,
        method: "GET".into(),
        scheme: "http".into(),
        authority: name,
        path: path.into(),
        headers: HeaderMap::new(),
        client_ns: Some(NS.into()),
    }
}

impl Req {
    fn header(mut self, k: &str, v: &str) -> Req {
        self.headers.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
        self
    }
    fn port(mut self, p: u16) -> Req {
        self.port = p;
        self
    }
    fn method(mut self, m: &str) -> Req {
        self.method = m.into();
        self
    }
    fn scheme(mut self, s: &str) -> Req {
        self.scheme = s.into();
        self
    }
    fn authority(mut self, a: &str) -> Req {
        self.authority = a.into();
        self
    }
    fn client_in(mut self, ns: &str) -> Req {
        self.client_ns = Some(ns.into());
        self
    }
    fn info(&self) -> HttpRequestInfo<'_> {
        HttpRequestInfo {
            service: &self.service,
            port: self.port,
            method: &self.method,
            scheme: &self.scheme,
            authority: &self.authority,
            path_and_query: &self.path,
            headers: &self.headers,
            client_namespace: self.client_ns.as_deref(),
        }
    }
}

/// "service:port[/subset]" of a Forward, or "404", "redirect <code> <location>", "direct <code>".
fn outcome(t: &RouteTable, r: &Req) -> String {
    match t.http(&r.info()) {
        HttpDecision::Forward(f) => match &f.backend.subset {
            Some(s) => format!("{}:{}/{s}", f.backend.service, f.backend.port),
            None => format!("{}:{}", f.backend.service, f.backend.port),
        },
        HttpDecision::NotFound => "404".into(),
        HttpDecision::Redirect { status, location } => format!("redirect {status} {location}"),
        HttpDecision::Direct { status, body } => format!("direct {status} {body}"),
    }
}

fn forward(t: &RouteTable, r: &Req) -> meshcore::route::Forward {
    match t.http(&r.info()) {
        HttpDecision::Forward(f) => f,
        other => panic!("expected a forward, got {other:?}"),
    }
}

/// A VirtualService on `web` with one rule: `matches` → web-v? (service other/web marks a match).
fn vs_match(matches: Value) -> RouteTable {
    table(&[(
        "VirtualService",
        NS,
        "web",
        json!({"hosts": ["web"], "http": [
            {"match": matches, "route": [{"destination": {"host": "web.other"}}]},
            {"route": [{"destination": {"host": "web"}}]}]}),
    )])
}

const HIT: &str = "other/web:80";
const MISS: &str = "mesh/web:80";

fn check(t: &RouteTable, r: Req, want: &str) {
    assert_eq!(
        outcome(t, &r),
        want,
        "{} {} {:?}",
        r.method,
        r.path,
        r.headers
    );
}

#[test]
fn vs_uri_exact_prefix_regex_and_ignore_case() {
    let w = "mesh/web";
    let t = vs_match(json!([{"uri": {"exact": "/a"}}]));
    check(&t, req(w, "/a?x=1"), HIT);
    check(&t, req(w, "/a/b"), MISS);
    check(&t, req(w, "/A"), MISS);
    let t = vs_match(json!([{"uri": {"prefix": "/api"}}]));
    check(&t, req(w, "/apis"), HIT); // Istio prefixes are plain string prefixes
    check(&t, req(w, "/ap"), MISS);
    let t = vs_match(json!([{"uri": {"regex": "/v[0-9]+/.*"}}]));
    check(&t, req(w, "/v12/x"), HIT);
    check(&t, req(w, "/x/v12/x"), MISS); // full match, not search
    let t = vs_match(json!([{"uri": {"exact": "/Login"}, "ignoreUriCase": true}]));
    check(&t, req(w, "/LOGIN"), HIT);
    check(&t, req(w, "/LOGINS"), MISS);
    let t = vs_match(json!([{"uri": {"prefix": "/Api"}, "ignoreUriCase": true}]));
    check(&t, req(w, "/aPI/x"), HIT);
    check(&t, req(w, "/x"), MISS);
}

#[test]
fn vs_scheme_method_authority_port() {
    let w = "mesh/web";
    let t = vs_match(json!([{"scheme": {"exact": "https"}}]));
    check(&t, req(w, "/").scheme("https"), HIT);
    check(&t, req(w, "/"), MISS);
    let t = vs_match(json!([{"method": {"regex": "POST|PUT"}}]));
    check(&t, req(w, "/").method("PUT"), HIT);
    check(&t, req(w, "/"), MISS);
    let t = vs_match(json!([{"authority": {"prefix": "web.mesh"}}]));
    check(&t, req(w, "/").authority("web.mesh.svc.cluster.local"), HIT);
    check(&t, req(w, "/").authority("web"), MISS);
    let t = vs_match(json!([{"port": 8080}]));
    check(&t, req(w, "/").port(8080), "other/web:80");
    check(&t, req(w, "/"), MISS);
}

#[test]
fn vs_headers_without_headers_and_query_params() {
    let w = "mesh/web";
    let t = vs_match(json!([{"headers": {"x-user-group": {"exact": "beta"}}}]));
    check(&t, req(w, "/").header("X-User-Group", "beta"), HIT);
    check(&t, req(w, "/").header("x-user-group", "Beta"), MISS);
    let t = vs_match(json!([{"headers": {"x-v": {"prefix": "v1"}}}]));
    check(&t, req(w, "/").header("x-v", "v1.2"), HIT);
    check(&t, req(w, "/").header("x-v", "v2"), MISS);
    let t = vs_match(json!([{"headers": {"x-v": {"regex": "v[12]"}}}]));
    check(&t, req(w, "/").header("x-v", "v2"), HIT);
    check(&t, req(w, "/").header("x-v", "v22"), MISS);
    let t = vs_match(json!([{"headers": {"x-debug": {}}}]));
    check(&t, req(w, "/").header("x-debug", ""), HIT);
    check(&t, req(w, "/"), MISS);
    let t = vs_match(json!([{"withoutHeaders": {"x-canary": {"exact": "off"}}}]));
    check(&t, req(w, "/"), HIT);
    check(&t, req(w, "/").header("x-canary", "on"), HIT);
    check(&t, req(w, "/").header("x-canary", "off"), MISS);
    let t = vs_match(json!([{"withoutHeaders": {"x-canary": {}}}]));
    check(&t, req(w, "/"), HIT);
    check(&t, req(w, "/").header("x-canary", "x"), MISS);
    let t = vs_match(json!([{"queryParams": {"debug": {"exact": ""}}}]));
    check(&t, req(w, "/?debug"), HIT);
    check(&t, req(w, "/?debug=1"), MISS);
    let t = vs_match(json!([{"queryParams": {"user": {"exact": "ann"}}}]));
    check(&t, req(w, "/p?a=1&user=ann"), HIT);
    check(&t, req(w, "/p?user=anne"), MISS);
    let t = vs_match(json!([{"queryParams": {"id": {"regex": "[0-9]+"}}}]));
    check(&t, req(w, "/?id=42"), HIT);
    check(&t, req(w, "/?id=4x"), MISS);
    let t = vs_match(json!([{"queryParams": {"id": {}}}]));
    check(&t, req(w, "/?id=4x"), HIT);
    check(&t, req(w, "/?idx=4"), MISS);
}

#[test]
fn vs_matches_or_fields_and_first_rule_wins() {
    let w = "mesh/web";
    let t = vs_match(
        json!([{"uri": {"prefix": "/a"}, "method": {"exact": "POST"}}, {"headers": {"x-b": {}}}]),
    );
    check(&t, req(w, "/a").method("POST"), HIT);
    check(&t, req(w, "/x").header("x-b", "1"), HIT);
    check(&t, req(w, "/a"), MISS); // fields AND-ed
    let t = table(&[(
        "VirtualService",
        NS,
        "web",
        json!({"hosts": ["web"], "http": [
            {"match": [{"uri": {"prefix": "/"}}], "route": [{"destination": {"host": "web.other"}}]},
            {"match": [{"uri": {"exact": "/x"}}], "route": [{"destination": {"host": "web"}}]}]}),
    )]);
    check(&t, req(w, "/x"), HIT); // ordered: the earlier, broader rule wins
    let t = vs_match(json!([{"uri": {"exact": "/only"}}]));
    let t2 = table(&[(
        "VirtualService",
        NS,
        "web",
        json!({"hosts": ["web"], "http": [
        {"match": [{"uri": {"exact": "/only"}}], "route": [{"destination": {"host": "web"}}]}]}),
    )]);
    check(&t, req(w, "/other"), MISS);
    check(&t2, req(w, "/other"), "404");
}

#[test]
fn default_route_and_tcp() {
    let t = table(&[]);
    check(
        &t,
        req("mesh/echo", "/anything").port(8080),
        "mesh/echo:8080",
    );
    assert_eq!(t.tcp("mesh/db", 5432).backend.service.as_ref(), "mesh/db");
    let t = table(&[(
        "VirtualService",
        NS,
        "db",
        json!({"hosts": ["db"], "tcp": [{"match": [{"port": 5432}], "route": [{"destination": {"host": "web.other", "port": {"number": 80}}}]}]}),
    )]);
    let d = t.tcp("mesh/db", 5432);
    assert_eq!(
        (d.backend.service.as_ref(), d.backend.port),
        ("other/web", 80)
    );
    assert_eq!(t.tcp("mesh/db", 5433).backend.service.as_ref(), "mesh/db");
    // A VirtualService with only tcp routes leaves HTTP on the default route.
    check(&t, req("mesh/db", "/").port(5432), "mesh/db:5432");
}

/// Counts outcomes over `n` requests with a fixed seed.
fn split(t: &RouteTable, r: &Req, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let key = match t.http_with(&r.info(), &mut rng) {
            HttpDecision::Forward(f) => format!(
                "{}/{}",
                f.backend.service,
                f.backend.subset.as_deref().unwrap_or("-")
            ),
            other => format!("{other:?}"),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// Within 5 standard deviations of the binomial mean: a false failure has odds below 1 in 10^6.
fn within_binomial(count: usize, n: usize, p: f64) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    assert!(
        ((count as f64) - mean).abs() <= 5.0 * sd,
        "{count} of {n}, expected {mean} ± {}",
        5.0 * sd
    );
}

fn web_dr() -> (&'static str, &'static str, &'static str, Value) {
    (
        "DestinationRule",
        NS,
        "web",
        json!({"host": "web", "subsets": [
        {"name": "stable", "labels": {"version": "v1"}}, {"name": "canary", "labels": {"version": "v2"}},
        {"name": "exp", "labels": {"version": "v3"}}]}),
    )
}

#[test]
fn weighted_splits_follow_weights() {
    let t = table(&[
        web_dr(),
        (
            "VirtualService",
            NS,
            "web",
            json!({"hosts": ["web"], "http": [
        {"match": [{"headers": {"x-user-group": {"exact": "beta"}}}], "route": [{"destination": {"host": "web", "subset": "canary"}}]},
        {"route": [{"destination": {"host": "web", "subset": "stable"}, "weight": 90},
                   {"destination": {"host": "web", "subset": "canary"}, "weight": 10}]}]}),
        ),
    ]);
    let c = split(&t, &req("mesh/web", "/"), 2000);
    within_binomial(c["mesh/web/canary"], 2000, 0.1);
    assert_eq!(c["mesh/web/stable"] + c["mesh/web/canary"], 2000);
    let c = split(
        &t,
        &req("mesh/web", "/").header("x-user-group", "beta"),
        200,
    );
    assert_eq!(c["mesh/web/canary"], 200);
    assert_eq!(
        t.subset_labels("mesh/web", "canary")
            .map(|l| l["version"].as_str()),
        Some("v2")
    );
    assert_eq!(t.subset_labels("mesh/web", "nope"), None);

    let t = table(&[
        web_dr(),
        (
            "VirtualService",
            NS,
            "web",
            json!({"hosts": ["web"], "http": [
        {"route": [{"destination": {"host": "web", "subset": "stable"}, "weight": 50},
                   {"destination": {"host": "web", "subset": "canary"}, "weight": 30},
                   {"destination": {"host": "web", "subset": "exp"}, "weight": 20}]}]}),
        ),
    ]);
    let c = split(&t, &req("mesh/web", "/"), 3000);
    within_binomial(c["mesh/web/stable"], 3000, 0.5);
    within_binomial(c["mesh/web/canary"], 3000, 0.3);
    within_binomial(c["mesh/web/exp"], 3000, 0.2);
}

#[test]
fn vs_rewrite_redirect_direct_response_headers() {
    let w = "mesh/web";
    let vs = |rule: Value| {
        table(&[(
            "VirtualService",
            NS,
            "web",
            json!({"hosts": ["web"], "http": [rule]}),
        )])
    };
    let t = vs(
        json!({"match": [{"uri": {"prefix": "/old"}}], "rewrite": {"uri": "/new", "authority": "web.internal"},
        "route": [{"destination": {"host": "web"}}]}),
    );
    let f = forward(&t, &req(w, "/old/page?q=1"));
    assert_eq!(
        (f.path.as_deref(), f.authority.as_deref()),
        (Some("/new/page?q=1"), Some("web.internal"))
    );
    let t = vs(
        json!({"match": [{"uri": {"exact": "/old"}}], "rewrite": {"uri": "/new"}, "route": [{"destination": {"host": "web"}}]}),
    );
    assert_eq!(
        forward(&t, &req(w, "/old?q")).path.as_deref(),
        Some("/new?q")
    );
    let t = vs(
        json!({"rewrite": {"uriRegexRewrite": {"match": "^/service/([^/]+)(/.*)$", "rewrite": "\\2/instance/\\1"}},
        "route": [{"destination": {"host": "web"}}]}),
    );
    assert_eq!(
        forward(&t, &req(w, "/service/foo/v1/api")).path.as_deref(),
        Some("/v1/api/instance/foo")
    );
    assert_eq!(
        forward(&t, &req(w, "/other")).path.as_deref(),
        Some("/other")
    );

    let t = vs(json!({"match": [{"uri": {"exact": "/r"}}], "redirect": {"uri": "/to"}}));
    check(&t, req(w, "/r?a=1"), "redirect 301 http://web/to?a=1");
    check(&t, req(w, "/r2"), "404");
    let t = vs(
        json!({"redirect": {"authority": "example.org", "scheme": "https", "redirectCode": 308}}),
    );
    check(&t, req(w, "/p"), "redirect 308 https://example.org/p");
    let t = vs(json!({"redirect": {"port": 8443, "scheme": "https"}}));
    check(
        &t,
        req(w, "/p").authority("web:80"),
        "redirect 301 https://web:8443/p",
    );
    let t = vs(json!({"redirect": {"derivePort": "FROM_REQUEST_PORT"}}));
    check(
        &t,
        req(w, "/p").port(8080),
        "redirect 301 http://web:8080/p",
    );

    let t = vs(
        json!({"match": [{"uri": {"exact": "/teapot"}}], "directResponse": {"status": 418, "body": {"string": "short and stout"}}}),
    );
    check(&t, req(w, "/teapot"), "direct 418 short and stout");
    check(&t, req(w, "/kettle"), "404");

    let t = vs(
        json!({"headers": {"request": {"set": {"x-a": "rule"}, "remove": ["x-drop"]}, "response": {"add": {"x-r": "1"}}},
        "route": [{"destination": {"host": "web"}, "headers": {"request": {"set": {"x-a": "dest"}, "add": {"x-d": "1"}}}}]}),
    );
    let f = forward(&t, &req(w, "/"));
    let mut h = HeaderMap::new();
    h.insert("x-drop", HeaderValue::from_static("1"));
    h.insert("x-keep", HeaderValue::from_static("1"));
    f.request_headers.apply(&mut h);
    assert_eq!(h["x-a"], "dest");
    assert_eq!(h["x-d"], "1");
    assert!(!h.contains_key("x-drop") && h.contains_key("x-keep"));
    let mut h = HeaderMap::new();
    f.response_headers.apply(&mut h);
    assert_eq!(h["x-r"], "1");
}

fn has_diag(d: &[Diagnostic], severity: Severity, field: &str) -> bool {
    d.iter().any(|x| x.severity == severity && x.field == field)
}

#[test]
fn compile_checks_hosts_subsets_and_conflicts() {
    let route =
        |dest: Value| json!({"hosts": ["web"], "http": [{"route": [{"destination": dest}]}]});
    let (t, d) = build(&[(
        "VirtualService",
        NS,
        "bad",
        route(json!({"host": "nosuch"})),
    )]);
    assert!(
        has_diag(
            &d,
            Severity::Error,
            "spec.http[0].route[0].destination.host"
        ),
        "{d:?}"
    );
    check(&t, req("mesh/web", "/"), "mesh/web:80"); // left out: default route
    let (_, d) = build(&[(
        "VirtualService",
        NS,
        "bad",
        route(json!({"host": "web", "subset": "canary"})),
    )]);
    assert!(
        has_diag(
            &d,
            Severity::Error,
            "spec.http[0].route[0].destination.subset"
        ),
        "{d:?}"
    );
    let (_, d) = build(&[
        web_dr(),
        (
            "VirtualService",
            NS,
            "bad",
            route(json!({"host": "web", "subset": "canry"})),
        ),
    ]);
    let e = d
        .iter()
        .find(|x| x.severity == Severity::Error)
        .expect("an error");
    assert_eq!(
        (e.resource.as_str(), e.field.as_str()),
        (
            "VirtualService mesh/bad",
            "spec.http[0].route[0].destination.subset"
        )
    );
    assert!(
        e.message.contains("canary"),
        "lists the subsets that exist: {}",
        e.message
    );
    let (_, d) = build(&[(
        "VirtualService",
        NS,
        "bad",
        json!({"hosts": ["nosuch.example.com"], "http": [{"route": [{"destination": {"host": "web"}}]}]}),
    )]);
    assert!(has_diag(&d, Severity::Error, "spec.hosts"), "{d:?}");
    let (_, d) = build(&[("DestinationRule", NS, "bad", json!({"host": "nosuch"}))]);
    assert!(has_diag(&d, Severity::Error, "spec.host"), "{d:?}");

    // Two VirtualServices on one host: the older wins.
    let (t, d) = build(&[
        (
            "VirtualService",
            NS,
            "old",
            route(json!({"host": "web.other"})),
        ),
        ("VirtualService", NS, "new", route(json!({"host": "echo"}))),
    ]);
    check(&t, req("mesh/web", "/"), "other/web:80");
    assert!(
        d.iter()
            .any(|x| x.severity == Severity::Conflict && x.resource == "VirtualService mesh/new"),
        "{d:?}"
    );

    // An HTTPRoute on the same Service beats the VirtualService, which is told so.
    let (t, d) = build(&[
        (
            "VirtualService",
            NS,
            "vs",
            route(json!({"host": "web.other"})),
        ),
        (
            "HTTPRoute",
            NS,
            "hr",
            json!({"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
            "rules": [{"backendRefs": [{"name": "echo", "port": 8080}]}]}),
        ),
    ]);
    check(&t, req("mesh/web", "/"), "mesh/echo:8080");
    let c = d
        .iter()
        .find(|x| x.severity == Severity::Conflict)
        .expect("a conflict");
    assert_eq!(c.resource, "VirtualService mesh/vs");
    assert!(c.message.contains("HTTPRoute mesh/hr"), "{}", c.message);
}

fn hr(name: &str, spec: Value) -> (&'static str, &'static str, String, Value) {
    ("HTTPRoute", NS, name.to_string(), spec)
}

fn gw_table(routes: &[(&'static str, &'static str, String, Value)]) -> RouteTable {
    let v: Vec<(&str, &str, &str, Value)> = routes
        .iter()
        .map(|(k, n, name, s)| (*k, *n, name.as_str(), s.clone()))
        .collect();
    table(&v)
}

const ECHO: &str = "mesh/echo";

/// conformance: tests/mesh/httproute-matching.{yaml,go}
#[test]
fn httproute_path_and_header_matching_precedence() {
    let t = gw_table(&[hr(
        "mesh-matching",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
        "rules": [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}, {"headers": [{"name": "version", "value": "one"}]}],
             "backendRefs": [{"name": "echo-v1", "port": 8080}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}, {"headers": [{"name": "version", "value": "two"}]}],
             "backendRefs": [{"name": "echo-v2", "port": 8080}]}]}),
    )]);
    for (path, header, want) in [
        ("/", None, "echo-v1"),
        ("/example", None, "echo-v1"),
        ("/", Some("one"), "echo-v1"),
        ("/v2", None, "echo-v2"),
        ("/v2/example", None, "echo-v2"),
        ("/", Some("two"), "echo-v2"),
        ("/v2/", None, "echo-v2"),
        ("/v2example", None, "echo-v1"),
        ("/foo/v2/example", None, "echo-v1"),
    ] {
        let mut r = req(ECHO, path);
        if let Some(v) = header {
            r = r.header("Version", v);
        }
        check(&t, r, &format!("mesh/{want}:8080"));
    }
    // Port 8080 has no route attached: default route.
    check(&t, req(ECHO, "/v2").port(8080), "mesh/echo:8080");
}

/// conformance: tests/mesh/httproute-query-param-matching.{yaml,go}
#[test]
fn httproute_query_param_matching() {
    let q = |name: &str, value: &str| json!({"name": name, "value": value});
    let b = |n: &str| json!([{"name": n, "port": 8080}]);
    let t = gw_table(&[hr(
        "mesh-query-param-matching",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
        "rules": [
            {"matches": [{"queryParams": [q("animal", "whale")]}], "backendRefs": b("echo-v1")},
            {"matches": [{"queryParams": [q("animal", "dolphin")]}], "backendRefs": b("echo-v2")},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/path1"}, "queryParams": [q("animal", "whale")]}], "backendRefs": b("echo-v1")},
            {"matches": [{"headers": [q("version", "one")], "queryParams": [q("animal", "whale")]}], "backendRefs": b("echo-v2")},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/path3"}, "queryParams": [q("animal", "shark")]},
                         {"path": {"type": "PathPrefix", "value": "/path4"}, "headers": [q("version", "three")], "queryParams": [q("animal", "kraken")]}],
             "backendRefs": b("echo-v1")},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/path5"}}], "backendRefs": b("echo-v1")},
            {"matches": [{"queryParams": [q("animal", "hydra")]}], "backendRefs": b("echo-v2")}]}),
    )]);
    let v1 = "mesh/echo-v1:8080";
    let v2 = "mesh/echo-v2:8080";
    check(&t, req(ECHO, "/?animal=whale"), v1);
    check(&t, req(ECHO, "/?animal=dolphin"), v2);
    check(&t, req(ECHO, "/?animal=whale&otherparam=irrelevant"), v1);
    check(&t, req(ECHO, "/?animal=dolphin&color=yellow"), v2);
    for miss in [
        "/?color=blue",
        "/?animal=dog",
        "/?animal=whaledolphin",
        "/",
        "/?animal=shark",
        "/path4?animal=kraken",
    ] {
        check(&t, req(ECHO, miss), "404");
    }
    check(&t, req(ECHO, "/path1?animal=whale"), v1);
    check(&t, req(ECHO, "/?animal=whale").header("version", "one"), v2);
    check(&t, req(ECHO, "/path3?animal=shark"), v1);
    check(
        &t,
        req(ECHO, "/path4?animal=kraken").header("version", "three"),
        v1,
    );
    check(&t, req(ECHO, "/path5?animal=hydra"), v1);
}

#[test]
fn httproute_exact_regex_method_and_header_regex() {
    let parent = json!([{"group": "", "kind": "Service", "name": "echo"}]);
    let t = gw_table(&[hr(
        "m",
        json!({"parentRefs": parent, "rules": [
        {"matches": [{"path": {"type": "Exact", "value": "/exact"}}], "backendRefs": [{"name": "echo-v1", "port": 80}]},
        {"matches": [{"path": {"type": "RegularExpression", "value": "/re/[0-9]+"}}], "backendRefs": [{"name": "echo-v2", "port": 80}]},
        {"matches": [{"method": "POST", "path": {"value": "/m"}}], "backendRefs": [{"name": "echo-v1", "port": 7070}]},
        {"matches": [{"headers": [{"type": "RegularExpression", "name": "x-v", "value": "v[0-9]"}], "path": {"value": "/h"}}], "backendRefs": [{"name": "echo-v2", "port": 7070}]}]}),
    )]);
    check(&t, req(ECHO, "/exact"), "mesh/echo-v1:80");
    check(&t, req(ECHO, "/exact/"), "404");
    check(&t, req(ECHO, "/re/42"), "mesh/echo-v2:80");
    check(&t, req(ECHO, "/re/42/x"), "404");
    check(&t, req(ECHO, "/m").method("POST"), "mesh/echo-v1:7070");
    check(&t, req(ECHO, "/m"), "404");
    check(&t, req(ECHO, "/h").header("x-v", "v7"), "mesh/echo-v2:7070");
    check(&t, req(ECHO, "/h").header("x-v", "v77"), "404");
}

#[test]
fn httproute_precedence_across_routes_and_ties() {
    let parent = json!([{"group": "", "kind": "Service", "name": "echo"}]);
    let rule =
        |m: Value, to: &str| json!({"matches": [m], "backendRefs": [{"name": to, "port": 80}]});
    // Written in the least helpful order; precedence must sort it out.
    let t = gw_table(&[
        hr(
            "a-prefix",
            json!({"parentRefs": parent, "rules": [rule(json!({"path": {"value": "/api"}}), "echo-v1")]}),
        ),
        hr(
            "b-longer",
            json!({"parentRefs": parent, "rules": [rule(json!({"path": {"value": "/api/v2"}}), "echo-v2")]}),
        ),
        hr(
            "c-exact",
            json!({"parentRefs": parent, "rules": [rule(json!({"path": {"type": "Exact", "value": "/api"}}), "web")]}),
        ),
        hr(
            "d-method",
            json!({"parentRefs": parent, "rules": [rule(json!({"path": {"value": "/api"}, "method": "DELETE"}), "echo")]}),
        ),
        hr(
            "e-same-as-a",
            json!({"parentRefs": parent, "rules": [rule(json!({"path": {"value": "/api"}}), "echo-v2")]}),
        ),
    ]);
    check(&t, req(ECHO, "/api"), "mesh/web:80");
    check(&t, req(ECHO, "/api/v2/x"), "mesh/echo-v2:80");
    check(&t, req(ECHO, "/api/x").method("DELETE"), "mesh/echo:80");
    check(&t, req(ECHO, "/api/x"), "mesh/echo-v1:80"); // tie: the older route
}

/// conformance: tests/mesh/mesh-consumer-route.{yaml,go}
#[test]
fn consumer_routes_apply_to_their_namespace_only() {
    let t = gw_table(&[
        hr(
            "producer",
            json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo-v1"}],
            "rules": [{"matches": [{"path": {"type": "Exact", "value": "/p"}}], "backendRefs": [{"name": "echo-v1", "port": 80}]}]}),
        ),
        (
            "HTTPRoute",
            "consumer",
            "mesh-echo-add-header".into(),
            json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo-v1", "namespace": NS}],
            "rules": [{"filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "X-Header-Set", "value": "set"}]}}],
                       "backendRefs": [{"name": "echo-v1", "namespace": NS, "port": 80}]}]}),
        ),
    ]);
    let r = req("mesh/echo-v1", "/").client_in("consumer");
    let f = forward(&t, &r);
    let mut h = HeaderMap::new();
    f.response_headers.apply(&mut h);
    assert_eq!(h["x-header-set"], "set");
    check(&t, req("mesh/echo-v1", "/"), "404"); // producer's rules for everyone else
    check(&t, req("mesh/echo-v1", "/p"), "mesh/echo-v1:80");
    let f = forward(&t, &req("mesh/echo-v1", "/p"));
    assert!(f.response_headers.is_empty());
}

/// conformance: tests/mesh/mesh-ports.{yaml,go} (a parentRef port limits the route to it)
#[test]
fn parent_ref_port_limits_the_route() {
    let t = gw_table(&[hr(
        "mesh-split-v1",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo-v1", "port": 80}],
        "rules": [{"filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "X-Header-Set", "value": "v1"}]}}],
                   "backendRefs": [{"name": "echo-v1", "port": 80}]}]}),
    )]);
    assert!(
        !forward(&t, &req("mesh/echo-v1", "/"))
            .response_headers
            .is_empty()
    );
    assert!(
        forward(&t, &req("mesh/echo-v1", "/").port(8080))
            .response_headers
            .is_empty()
    );
}

fn redirect_table(filter: Value, prefix: &str) -> RouteTable {
    gw_table(&[hr(
        "redirect",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
                   "filters": [{"type": "RequestRedirect", "requestRedirect": filter}]}]}),
    )])
}

/// conformance: tests/mesh/httproute-redirect-{path,port,scheme,host-and-status}, 30x-redirect
#[test]
fn httproute_redirects() {
    let cases: &[(Value, &str, &str, &str)] = &[
        (
            json!({"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/replacement-prefix"}}),
            "/original-prefix",
            "/original-prefix/lemon",
            "redirect 302 http://echo/replacement-prefix/lemon",
        ),
        (
            json!({"path": {"type": "ReplaceFullPath", "replaceFullPath": "/full-path-replacement"}}),
            "/full",
            "/full/path/original",
            "redirect 302 http://echo/full-path-replacement",
        ),
        (
            json!({"hostname": "example.org", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/replacement-prefix"}}),
            "/path-and-host",
            "/path-and-host",
            "redirect 302 http://example.org/replacement-prefix",
        ),
        (
            json!({"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/replacement-prefix"}, "statusCode": 301}),
            "/path-and-status",
            "/path-and-status",
            "redirect 301 http://echo/replacement-prefix",
        ),
        (
            json!({"port": 8083}),
            "/port",
            "/port",
            "redirect 302 http://echo:8083/port",
        ),
        (
            json!({"port": 8083, "hostname": "example.org"}),
            "/port-and-host",
            "/port-and-host",
            "redirect 302 http://example.org:8083/port-and-host",
        ),
        (
            json!({"scheme": "https"}),
            "/scheme",
            "/scheme",
            "redirect 302 https://echo/scheme",
        ),
        (
            json!({"scheme": "https", "hostname": "example.org", "statusCode": 301}),
            "/scheme-and-host",
            "/scheme-and-host?q=1",
            "redirect 301 https://example.org/scheme-and-host?q=1",
        ),
        (
            json!({"hostname": "example.org", "statusCode": 303}),
            "/",
            "/x",
            "redirect 303 http://example.org/x",
        ),
        (
            json!({"statusCode": 307}),
            "/",
            "/x",
            "redirect 307 http://echo/x",
        ),
        (
            json!({"statusCode": 308, "scheme": "https", "port": 8443}),
            "/",
            "/x",
            "redirect 308 https://echo:8443/x",
        ),
    ];
    for (filter, prefix, path, want) in cases {
        let t = redirect_table(filter.clone(), prefix);
        check(&t, req(ECHO, path).authority("echo"), want);
        if *prefix != "/" {
            check(
                &t,
                req(ECHO, &format!("{prefix}x")).authority("echo"),
                "404",
            );
        }
    }
}

/// conformance: tests/mesh/httproute-rewrite-path.{yaml,go}
#[test]
fn httproute_url_rewrite_and_header_modifiers() {
    let rw = |prefix: &str, path: Value, extra: Value| {
        let mut filters = vec![json!({"type": "URLRewrite", "urlRewrite": {"path": path}})];
        if !extra.is_null() {
            filters.push(extra);
        }
        json!({"matches": [{"path": {"type": "PathPrefix", "value": prefix}}], "filters": filters, "backendRefs": [{"name": "echo-v1", "port": 80}]})
    };
    let modifier = json!({"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "X-Header-Set", "value": "set-overwrites-values"}],
        "add": [{"name": "X-Header-Add", "value": "header-val-1"}, {"name": "X-Header-Add-Append", "value": "header-val-2"}],
        "remove": ["X-Header-Remove"]}});
    let t = gw_table(&[hr(
        "mesh-rewrite-path",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}], "rules": [
            rw("/prefix/one", json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": "/one"}), Value::Null),
            rw("/strip-prefix", json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}), Value::Null),
            rw("/full/one", json!({"type": "ReplaceFullPath", "replaceFullPath": "/one"}), Value::Null),
            rw("/full/rewrite-path-and-modify-headers", json!({"type": "ReplaceFullPath", "replaceFullPath": "/test"}), modifier.clone()),
            rw("/prefix/rewrite-path-and-modify-headers", json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": "/prefix"}), modifier),
        ]}),
    )]);
    for (path, want) in [
        ("/prefix/one/two", "/one/two"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
        ("/full/rewrite-path-and-modify-headers/test", "/test"),
        ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
    ] {
        assert_eq!(
            forward(&t, &req(ECHO, path)).path.as_deref(),
            Some(want),
            "{path}"
        );
    }
    let f = forward(&t, &req(ECHO, "/full/rewrite-path-and-modify-headers/test"));
    let mut h = HeaderMap::new();
    h.insert("x-header-remove", HeaderValue::from_static("remove-val"));
    h.insert(
        "x-header-add-append",
        HeaderValue::from_static("append-val-1"),
    );
    h.insert("x-header-set", HeaderValue::from_static("set-val"));
    f.request_headers.apply(&mut h);
    assert_eq!(h["x-header-set"], "set-overwrites-values");
    assert_eq!(h["x-header-add"], "header-val-1");
    let appended: Vec<_> = h
        .get_all("x-header-add-append")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(appended, ["append-val-1", "header-val-2"]);
    assert!(!h.contains_key("x-header-remove"));
    // A path outside every rule is not rewritten: no route at all.
    check(&t, req(ECHO, "/prefix/onetwo"), "404");
}

/// conformance: tests/mesh/httproute-weight and grpcroute-weight (weight 0 and a missing
/// Service never get traffic)
#[test]
fn backend_weights_and_invalid_backends() {
    let t = gw_table(&[hr(
        "w",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
        "rules": [{"backendRefs": [{"name": "echo-v1", "port": 8080, "weight": 70}, {"name": "echo-v2", "port": 8080, "weight": 30},
                                   {"name": "echo-v3", "port": 8080, "weight": 0}]}]}),
    )]);
    let c = split(&t, &req(ECHO, "/"), 2000);
    within_binomial(c["mesh/echo-v1/-"], 2000, 0.7);
    assert_eq!(c["mesh/echo-v1/-"] + c["mesh/echo-v2/-"], 2000, "{c:?}");
    let (t, d) = build(&[(
        "HTTPRoute",
        NS,
        "bad-backend",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
        "rules": [{"backendRefs": [{"name": "echo-v3", "port": 80}]}]}),
    )]);
    assert!(
        has_diag(&d, Severity::Warning, "spec.rules[0].backendRefs[0]"),
        "{d:?}"
    );
    assert!(outcome(&t, &req(ECHO, "/")).starts_with("direct 500"));
    let t = gw_table(&[hr(
        "no-backends",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}], "rules": [{}]}),
    )]);
    assert!(outcome(&t, &req(ECHO, "/")).starts_with("direct 500"));
}

#[test]
fn grpcroute_method_and_header_matching() {
    let parent = json!([{"group": "", "kind": "Service", "name": "echo", "port": 7070}]);
    let t = table(&[(
        "GRPCRoute",
        NS,
        "g",
        json!({"parentRefs": parent, "rules": [
        {"matches": [{"method": {"service": "grpc.Echo", "method": "Say"}}], "backendRefs": [{"name": "echo-v1", "port": 7070}]},
        {"matches": [{"method": {"service": "grpc.Echo"}}], "backendRefs": [{"name": "echo-v2", "port": 7070}]},
        {"matches": [{"method": {"method": "Ping"}}], "backendRefs": [{"name": "echo", "port": 7070}]},
        {"matches": [{"method": {"type": "RegularExpression", "service": "grpc\\.Admin.*", "method": "Get.*"}}], "backendRefs": [{"name": "web", "port": 80}]},
        {"matches": [{"headers": [{"name": "x-tenant", "value": "a"}]}],
         "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-routed", "value": "tenant"}]}}],
         "backendRefs": [{"name": "echo-v1", "port": 8080}]}]}),
    )]);
    let g = |path: &str| {
        req(ECHO, path)
            .method("POST")
            .port(7070)
            .header("content-type", "application/grpc")
    };
    check(&t, g("/grpc.Echo/Say"), "mesh/echo-v1:7070");
    check(&t, g("/grpc.Echo/Other"), "mesh/echo-v2:7070");
    check(&t, g("/grpc.EchoX/Say"), "404");
    check(&t, g("/any.Svc/Ping"), "mesh/echo:7070");
    check(&t, g("/any.Svc/Pingx"), "404");
    check(&t, g("/grpc.AdminV2/GetUser"), "mesh/web:80");
    check(&t, g("/grpc.AdminV2/SetUser"), "404");
    check(&t, g("/x.Y/Z").header("x-tenant", "a"), "mesh/echo-v1:8080");
    check(&t, g("/x.Y/Z").header("x-tenant", "b"), "404");
}

/// conformance: tests/mesh/httproute-request-header-modifier-backend and httproute-named-rule
#[test]
fn backend_level_header_modifier_and_named_rules() {
    let t = gw_table(&[hr(
        "mesh-http-named-rules",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
        "rules": [
            {"name": "named-rule", "matches": [{"path": {"value": "/named"}}],
             "backendRefs": [{"name": "echo-v1", "port": 8080, "filters": [{"type": "RequestHeaderModifier",
                "requestHeaderModifier": {"set": [{"name": "X-Header-Set", "value": "set-overwrites-values"}], "remove": ["X-Header-Remove"]}}]}]},
            {"matches": [{"path": {"value": "/unnamed"}}], "backendRefs": [{"name": "echo-v2", "port": 8080}]}]}),
    )]);
    let f = forward(&t, &req(ECHO, "/named"));
    assert_eq!(
        &*f.route_name,
        "HTTPRoute mesh/mesh-http-named-rules#named-rule"
    );
    assert_eq!(&*f.resource, "HTTPRoute mesh/mesh-http-named-rules");
    let mut h = HeaderMap::new();
    h.insert("x-header-set", HeaderValue::from_static("old"));
    h.insert("x-header-remove", HeaderValue::from_static("x"));
    f.request_headers.apply(&mut h);
    assert_eq!(h["x-header-set"], "set-overwrites-values");
    assert!(!h.contains_key("x-header-remove"));
    let f = forward(&t, &req(ECHO, "/unnamed"));
    assert_eq!(&*f.route_name, "HTTPRoute mesh/mesh-http-named-rules#1");
    assert!(f.request_headers.is_empty());
}

#[test]
fn consumer_route_leaves_the_virtual_service_for_other_clients() {
    let (t, d) = build(&[
        (
            "VirtualService",
            NS,
            "vs",
            json!({"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web.other"}}]}]}),
        ),
        (
            "HTTPRoute",
            "client",
            "mine",
            json!({"parentRefs": [{"group": "", "kind": "Service", "name": "web", "namespace": NS}],
            "rules": [{"backendRefs": [{"name": "echo", "namespace": NS, "port": 80}]}]}),
        ),
    ]);
    assert!(!d.iter().any(|x| x.severity == Severity::Conflict), "{d:?}");
    check(&t, req("mesh/web", "/").client_in("client"), "mesh/echo:80");
    check(&t, req("mesh/web", "/"), "other/web:80");
}

#[test]
fn compile_reports_unsupported_fields_and_still_applies_the_rest() {
    let (t, d) = build(&[(
        "VirtualService",
        NS,
        "vs",
        json!({"hosts": ["web"], "http": [
        {"corsPolicy": {}, "retries": {"retryRemoteLocalities": true}, "route": [{"destination": {"host": "web.other", "typo": 1}}]}]}),
    )]);
    for field in [
        "spec.http[0].corsPolicy",
        "spec.http[0].retries.retryRemoteLocalities",
        "spec.http[0].route[0].destination.typo",
    ] {
        assert!(has_diag(&d, Severity::Unsupported, field), "{field}: {d:?}");
    }
    check(&t, req("mesh/web", "/"), "other/web:80");
}

#[test]
fn wildcard_hosts_are_reported_not_refused() {
    let (t, d) = build(&[
        (
            "DestinationRule",
            NS,
            "all",
            json!({"host": "*.mesh.svc.cluster.local", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}),
        ),
        (
            "VirtualService",
            NS,
            "vs",
            json!({"hosts": ["*.mesh.svc.cluster.local", "web"], "http": [{"route": [{"destination": {"host": "web.other"}}]}]}),
        ),
    ]);
    assert!(!d.iter().any(|x| x.severity == Severity::Error), "{d:?}");
    assert!(has_diag(&d, Severity::Unsupported, "spec.host"), "{d:?}");
    assert!(
        has_diag(&d, Severity::Unsupported, "spec.hosts[0]"),
        "{d:?}"
    );
    check(&t, req("mesh/web", "/"), "other/web:80");
    check(&t, req("mesh/echo", "/"), "mesh/echo:80");
}
