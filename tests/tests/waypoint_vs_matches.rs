//! Every VirtualService match type and filter of issue 8, end to end through a real waypoint
//! with curl: one VirtualService on the bound Service `shop/web` has one rule per match type,
//! each answering with its own `directResponse` (body = rule name) or routing to its own
//! version, then a catch-all to v1. Each row of the table is one curl request that must hit its
//! rule or must not (falling through to the catch-all or another rule). A second Service
//! without a catch-all answers 404 on no match. Last, `meshctl waypoint delete` removes the
//! waypoint and bound traffic is answered directly, counted as bypassed by the client's ztunnel.
//!
//! One mesh, one test; every failing row is reported by name at the end; torn down even when
//! an assertion fails. Owns only this file.

use std::net::SocketAddr;
use std::time::Duration;

use localmesh::{LocalMesh, MeshOptions, wait_for};
use mesh_tests::{WhoConn, manifests, privileged, served_by};
use serde_json::Value;

const APPS: &str = "10-apps.yaml";
const VS: &str = "30-vs.yaml";
const DEADLINE: Duration = Duration::from_secs(30);
const HOST: &str = "web.shop.svc.cluster.local";

/// mesh-echo v1/v2 (one pod each): HTTP on 8080 and 8081, the WHO line protocol on 9000.
fn apps() -> String {
    let mut s = String::new();
    for v in ["v1", "v2"] {
        s += &format!(
            r#"
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-{v}, namespace: shop}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web, version: {v}}}}}
  template:
    metadata: {{labels: {{app: web, version: {v}}}}}
    spec:
      serviceAccountName: web
      containers:
      - name: echo
        command: [mesh-echo, serve]
        args: ["--port", "9000", "--http-port", "8080", "--http-port", "8081"]
"#
        );
    }
    for name in ["web", "nomatch"] {
        s += &format!(
            "\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  selector: {{app: web}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  \
             - {{name: http-alt, port: 81, targetPort: 8081}}\n  - {{name: tcp, port: 9000, targetPort: 9000}}\n  \
             - {{name: tcp-alt, port: 9001, targetPort: 9000}}\n"
        );
    }
    s + &format!(
        "\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {{name: web, namespace: shop}}\nspec:\n  host: {HOST}\n  \
         subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n"
    )
}

/// The VirtualServices. For mutation checks, `VS_MUTATE='from=>to'` replaces the first `from`
/// in the YAML (the row guarding that rule must then fail, and only it).
fn virtual_services() -> String {
    let direct = |name: &str| format!("directResponse: {{status: 200, body: {{string: {name}}}}}");
    let rules: Vec<(String, String)> = vec![
        ("uri-exact".into(), "[{uri: {exact: /exact}}]".into()),
        ("uri-prefix".into(), "[{uri: {prefix: /pre/}}]".into()),
        (
            "uri-regex".into(),
            r#"[{uri: {regex: "/re/[0-9]+"}}]"#.into(),
        ),
        (
            "ignore-case".into(),
            "[{uri: {exact: /case}, ignoreUriCase: true}]".into(),
        ),
        (
            "scheme-https".into(),
            "[{uri: {exact: /scheme}, scheme: {exact: https}}]".into(),
        ),
        (
            "scheme-http".into(),
            "[{uri: {exact: /scheme}, scheme: {exact: http}}]".into(),
        ),
        (
            "method".into(),
            "[{uri: {prefix: /method}, method: {exact: POST}}]".into(),
        ),
        (
            "authority-exact".into(),
            "[{authority: {exact: a.example}}]".into(),
        ),
        (
            "authority-prefix".into(),
            "[{authority: {prefix: pre.example}}]".into(),
        ),
        (
            "authority-regex".into(),
            r#"[{authority: {regex: "re[0-9]+\\.example"}}]"#.into(),
        ),
        (
            "header-exact".into(),
            "[{headers: {x-h-exact: {exact: \"yes\"}}}]".into(),
        ),
        (
            "header-prefix".into(),
            "[{headers: {x-h-prefix: {prefix: ab}}}]".into(),
        ),
        (
            "header-regex".into(),
            r#"[{headers: {x-h-regex: {regex: "[0-9]+"}}}]"#.into(),
        ),
        (
            "header-present".into(),
            "[{headers: {x-h-present: {}}}]".into(),
        ),
        (
            "without-headers".into(),
            "[{uri: {prefix: /without}, withoutHeaders: {x-block: {}}}]".into(),
        ),
        (
            "query-exact".into(),
            "[{queryParams: {qe: {exact: one}}}]".into(),
        ),
        (
            "query-prefix".into(),
            "[{queryParams: {qp: {prefix: ab}}}]".into(),
        ),
        (
            "query-regex".into(),
            r#"[{queryParams: {qr: {regex: "[0-9]+"}}}]"#.into(),
        ),
        (
            "query-empty".into(),
            "[{queryParams: {flag: {exact: \"\"}}}]".into(),
        ),
        (
            "port-81".into(),
            "[{uri: {prefix: /port}, port: 81}]".into(),
        ),
        (
            "or".into(),
            "[{uri: {exact: /or-a}}, {uri: {exact: /or-b}}]".into(),
        ),
        (
            "and".into(),
            "[{uri: {exact: /and}, headers: {x-and: {exact: \"yes\"}}}]".into(),
        ),
    ];
    let mut http = String::new();
    for (name, m) in &rules {
        http += &format!("  - name: {name}\n    match: {m}\n    {}\n", direct(name));
    }
    let v1 = format!("{{destination: {{host: {HOST}, subset: v1}}}}");
    let v2 = format!("{{destination: {{host: {HOST}, subset: v2}}}}");
    http += &format!(
        r#"  - name: rewrite-uri
    match: [{{uri: {{prefix: /old/}}}}]
    rewrite: {{uri: /new/}}
    route: [{v2}]
  - name: rewrite-authority
    match: [{{uri: {{prefix: /auth-rw}}}}]
    rewrite: {{authority: rewritten.example}}
    route: [{v2}]
  - name: regex-rewrite
    match: [{{uri: {{prefix: /rx/}}}}]
    rewrite: {{uriRegexRewrite: {{match: "^/rx/([a-z]+)/([0-9]+)$", rewrite: '/\2/\1'}}}}
    route: [{v2}]
  - name: redirect
    match: [{{uri: {{exact: /redirect}}}}]
    redirect: {{uri: /target, authority: new.example, redirectCode: 308}}
  - name: request-headers
    match: [{{uri: {{prefix: /reqh}}}}]
    headers: {{request: {{set: {{x-set: rule}}, add: {{x-add: added}}, remove: [x-remove]}}}}
    route: [{v2}]
  - name: destination-headers
    match: [{{uri: {{prefix: /dsth}}}}]
    route:
    - destination: {{host: {HOST}, subset: v2}}
      headers: {{request: {{set: {{x-dst: "yes"}}, add: {{x-add: dst}}, remove: [x-remove]}}}}
  - name: response-headers
    match: [{{uri: {{prefix: /resph}}}}]
    headers: {{response: {{set: {{x-resp-set: rule}}, add: {{x-resp-add: added}}, remove: [x-gone]}}}}
    route: [{v1}]
  - name: catch-all
    route: [{v1}]
"#
    );
    let vs = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {{name: web, namespace: shop}}\nspec:\n  hosts: [{HOST}]\n  http:\n{http}  \
         tcp:\n  - match: [{{port: 9000}}]\n    route: [{v2}]\n  \
         - match: [{{port: 9001}}]\n    route: [{v1}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {{name: nomatch, namespace: shop}}\nspec:\n  hosts: [nomatch.shop.svc.cluster.local]\n  \
         http:\n  - match: [{{uri: {{exact: /only}}}}]\n    \
         route: [{{destination: {{host: nomatch.shop.svc.cluster.local}}}}]\n"
    );
    match std::env::var("VS_MUTATE").ok().and_then(|m| {
        let (from, to) = m.split_once("=>")?;
        Some((from.to_string(), to.to_string()))
    }) {
        Some((from, to)) => {
            assert!(vs.contains(&from), "VS_MUTATE: {from:?} not in the YAML");
            eprintln!("!!! mutated: {from:?} => {to:?}");
            vs.replacen(&from, &to, 1)
        }
        None => vs,
    }
}

/// One curl answer: status, response headers (lowercase names), body.
#[derive(Debug, Default)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    /// The version (`v1`/`v2`) of the echo pod that answered, if one did.
    fn version(&self) -> Option<&'static str> {
        let pod = self.json()["pod"].as_str().unwrap_or("").to_string();
        ["v1", "v2"]
            .into_iter()
            .find(|v| pod.starts_with(&format!("web-{v}")))
    }
    /// Values the backend saw for request header `name` (canonical Go-style key).
    fn seen(&self, name: &str) -> Vec<String> {
        self.json()["headers"][name]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct Env<'a> {
    mesh: &'a LocalMesh,
}

impl Env<'_> {
    fn vip(&self, name: &str, port: u16) -> SocketAddr {
        let text = std::fs::read_to_string(self.mesh.config_dir.join(APPS)).unwrap();
        let docs = localmesh::render::parse_docs(APPS, &text).unwrap();
        let svc = docs
            .iter()
            .find(|d| localmesh::render::kind(d) == "Service" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Service {name}"));
        SocketAddr::new(
            svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap(),
            port,
        )
    }

    /// curl from the client pod to `service:port` + `path` with extra curl args.
    fn curl(&self, service: &str, port: u16, path: &str, args: &[&str]) -> Result<Reply, String> {
        let url = format!("http://{}{path}", self.vip(service, port));
        let mut argv = vec!["curl", "-sS", "--max-time", "5", "-D", "-"];
        argv.extend(args);
        argv.push(&url);
        let out = self
            .mesh
            .exec("client", "client", &argv)
            .map_err(|e| format!("{e:#}"))?;
        if !out.status.success() {
            return Err(format!(
                "curl {url}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
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
        Ok(Reply {
            status,
            headers,
            body: body.to_string(),
        })
    }

    /// `n` WHO connections to `service:port`; the versions that answered.
    fn who_versions(&self, service: &str, port: u16, n: usize) -> Result<Vec<String>, String> {
        let client = self
            .mesh
            .pod("client", "client")
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for i in 0..n {
            let mut c =
                WhoConn::connect(&client, self.vip(service, port)).map_err(|e| e.to_string())?;
            let r = c.who(&format!("tcp-{i}")).map_err(|e| e.to_string())?;
            let who = served_by(&r);
            out.push(
                who.strip_prefix("web-")
                    .unwrap_or(who)
                    .chars()
                    .take(2)
                    .collect(),
            );
        }
        Ok(out)
    }
}

type Check = Box<dyn Fn(&Reply) -> Result<(), String>>;

/// Answered by directResponse rule `name`.
fn direct(name: &'static str) -> Check {
    Box::new(move |r| {
        if r.status == 200 && r.body == name {
            Ok(())
        } else {
            Err(format!(
                "want rule {name}, got {} {:?}",
                r.status,
                short(&r.body)
            ))
        }
    })
}

/// Not answered by rule `name`: fell through to the catch-all (v1 echo).
fn catch_all(not: &'static str) -> Check {
    Box::new(move |r| {
        if r.status == 200 && r.body != not && r.version() == Some("v1") {
            Ok(())
        } else {
            Err(format!(
                "want catch-all (not {not}), got {} {:?}",
                r.status,
                short(&r.body)
            ))
        }
    })
}

/// Routed to echo `version` and `pred` holds on the reply.
fn echo(version: &'static str, what: &'static str, pred: fn(&Reply) -> bool) -> Check {
    Box::new(move |r| {
        if r.status == 200 && r.version() == Some(version) && pred(r) {
            Ok(())
        } else {
            Err(format!(
                "want {version} with {what}, got {} {:?} {:?}",
                r.status,
                r.headers,
                short(&r.body)
            ))
        }
    })
}

fn short(s: &str) -> String {
    s.chars().take(300).collect()
}

struct Row {
    name: &'static str,
    service: &'static str,
    port: u16,
    path: &'static str,
    args: &'static [&'static str],
    check: Check,
}

fn row(name: &'static str, path: &'static str, args: &'static [&'static str], check: Check) -> Row {
    Row {
        name,
        service: "web",
        port: 80,
        path,
        args,
        check,
    }
}

fn rows() -> Vec<Row> {
    vec![
        row("uri exact: hit", "/exact", &[], direct("uri-exact")),
        row(
            "uri exact: longer path misses",
            "/exact/more",
            &[],
            catch_all("uri-exact"),
        ),
        row("uri prefix: hit", "/pre/x", &[], direct("uri-prefix")),
        row("uri prefix: miss", "/prex", &[], catch_all("uri-prefix")),
        row(
            "uri regex: full match hits",
            "/re/123",
            &[],
            direct("uri-regex"),
        ),
        row(
            "uri regex: substring match misses",
            "/re/123/x",
            &[],
            catch_all("uri-regex"),
        ),
        row(
            "ignoreUriCase: other case hits",
            "/CaSe",
            &[],
            direct("ignore-case"),
        ),
        row(
            "ignoreUriCase: other path misses",
            "/cases",
            &[],
            catch_all("ignore-case"),
        ),
        row(
            "scheme: http hits the http rule, not the https one before it",
            "/scheme",
            &[],
            direct("scheme-http"),
        ),
        row(
            "method: POST hits",
            "/method",
            &["-X", "POST"],
            direct("method"),
        ),
        row("method: GET misses", "/method", &[], catch_all("method")),
        row(
            "authority exact: hit",
            "/a",
            &["-H", "Host: a.example"],
            direct("authority-exact"),
        ),
        row(
            "authority exact: longer misses",
            "/a",
            &["-H", "Host: a.example.org"],
            catch_all("authority-exact"),
        ),
        row(
            "authority prefix: hit",
            "/a",
            &["-H", "Host: pre.example.org"],
            direct("authority-prefix"),
        ),
        row(
            "authority prefix: miss",
            "/a",
            &["-H", "Host: x.pre.example"],
            catch_all("authority-prefix"),
        ),
        row(
            "authority regex: hit",
            "/a",
            &["-H", "Host: re42.example"],
            direct("authority-regex"),
        ),
        row(
            "authority regex: substring misses",
            "/a",
            &["-H", "Host: re42.example.org"],
            catch_all("authority-regex"),
        ),
        row(
            "header exact: hit",
            "/h",
            &["-H", "x-h-exact: yes"],
            direct("header-exact"),
        ),
        row(
            "header exact: miss",
            "/h",
            &["-H", "x-h-exact: yes2"],
            catch_all("header-exact"),
        ),
        row(
            "header prefix: hit",
            "/h",
            &["-H", "x-h-prefix: abc"],
            direct("header-prefix"),
        ),
        row(
            "header prefix: miss",
            "/h",
            &["-H", "x-h-prefix: xab"],
            catch_all("header-prefix"),
        ),
        row(
            "header regex: hit",
            "/h",
            &["-H", "x-h-regex: 123"],
            direct("header-regex"),
        ),
        row(
            "header regex: substring misses",
            "/h",
            &["-H", "x-h-regex: 12a"],
            catch_all("header-regex"),
        ),
        row(
            "header present {}: hit",
            "/h",
            &["-H", "x-h-present: anything"],
            direct("header-present"),
        ),
        row(
            "header present {}: absent misses",
            "/h",
            &[],
            catch_all("header-present"),
        ),
        row(
            "withoutHeaders: absent hits",
            "/without",
            &[],
            direct("without-headers"),
        ),
        row(
            "withoutHeaders: present misses",
            "/without",
            &["-H", "x-block: 1"],
            catch_all("without-headers"),
        ),
        row("query exact: hit", "/q?qe=one", &[], direct("query-exact")),
        row(
            "query exact: miss",
            "/q?qe=one1",
            &[],
            catch_all("query-exact"),
        ),
        row(
            "query prefix: hit",
            "/q?qp=abc",
            &[],
            direct("query-prefix"),
        ),
        row(
            "query prefix: miss",
            "/q?qp=xab",
            &[],
            catch_all("query-prefix"),
        ),
        row(
            "query regex: hit",
            "/q?x=1&qr=42",
            &[],
            direct("query-regex"),
        ),
        row(
            "query regex: substring misses",
            "/q?qr=42x",
            &[],
            catch_all("query-regex"),
        ),
        row(
            "query exact \"\": bare key hits",
            "/q?flag",
            &[],
            direct("query-empty"),
        ),
        row(
            "query exact \"\": a value misses",
            "/q?flag=x",
            &[],
            catch_all("query-empty"),
        ),
        row(
            "query exact \"\": absent misses",
            "/q",
            &[],
            catch_all("query-empty"),
        ),
        Row {
            name: "port: 81 hits",
            service: "web",
            port: 81,
            path: "/port",
            args: &[],
            check: direct("port-81"),
        },
        row("port: 80 misses", "/port", &[], catch_all("port-81")),
        row("match entries OR-ed: first", "/or-a", &[], direct("or")),
        row("match entries OR-ed: second", "/or-b", &[], direct("or")),
        row(
            "match entries OR-ed: neither misses",
            "/or-c",
            &[],
            catch_all("or"),
        ),
        row(
            "fields AND-ed: both hit",
            "/and",
            &["-H", "x-and: yes"],
            direct("and"),
        ),
        row(
            "fields AND-ed: uri alone misses",
            "/and",
            &[],
            catch_all("and"),
        ),
        row(
            "fields AND-ed: header alone misses",
            "/andx",
            &["-H", "x-and: yes"],
            catch_all("and"),
        ),
        row(
            "rewrite.uri: prefix replaced",
            "/old/x?k=1",
            &[],
            echo("v2", "path /new/x?k=1", |r| {
                r.json()["path"] == "/new/x?k=1"
            }),
        ),
        row(
            "rewrite.uri: non-match untouched",
            "/older",
            &[],
            echo("v1", "path /older", |r| r.json()["path"] == "/older"),
        ),
        row(
            "rewrite.authority: host rewritten",
            "/auth-rw",
            &[],
            echo("v2", "host rewritten.example", |r| {
                r.json()["host"] == "rewritten.example"
            }),
        ),
        row(
            "rewrite.authority: non-match keeps host",
            "/auth",
            &[],
            echo("v1", "host not rewritten", |r| {
                r.json()["host"] != "rewritten.example"
            }),
        ),
        row(
            "uriRegexRewrite: captures swapped",
            "/rx/abc/12",
            &[],
            echo("v2", "path /12/abc", |r| r.json()["path"] == "/12/abc"),
        ),
        row(
            "uriRegexRewrite: no regex match, path kept",
            "/rx/abc",
            &[],
            echo("v2", "path /rx/abc", |r| r.json()["path"] == "/rx/abc"),
        ),
        row(
            "redirect: 308 + Location",
            "/redirect",
            &[],
            Box::new(|r: &Reply| {
                if r.status == 308 && r.header("location") == ["http://new.example/target"] {
                    Ok(())
                } else {
                    Err(format!(
                        "want 308 to http://new.example/target, got {} {:?}",
                        r.status,
                        r.header("location")
                    ))
                }
            }),
        ),
        row(
            "redirect: non-match not redirected",
            "/redirect2",
            &[],
            catch_all("redirect"),
        ),
        row(
            "request headers (rule): set/add/remove",
            "/reqh",
            &[
                "-H",
                "x-set: client",
                "-H",
                "x-add: client",
                "-H",
                "x-remove: gone",
            ],
            echo("v2", "X-Set [rule], X-Add client+added, no X-Remove", |r| {
                r.seen("X-Set") == ["rule"]
                    && r.seen("X-Add").contains(&"client".into())
                    && r.seen("X-Add").contains(&"added".into())
                    && r.seen("X-Remove").is_empty()
            }),
        ),
        row(
            "request headers: non-match untouched",
            "/req",
            &["-H", "x-set: client", "-H", "x-remove: kept"],
            echo("v1", "X-Set [client], X-Remove kept", |r| {
                r.seen("X-Set") == ["client"] && r.seen("X-Remove") == ["kept"]
            }),
        ),
        row(
            "request headers (destination): set/add/remove",
            "/dsth",
            &["-H", "x-add: client", "-H", "x-remove: gone"],
            echo("v2", "X-Dst yes, X-Add client+dst, no X-Remove", |r| {
                r.seen("X-Dst") == ["yes"]
                    && r.seen("X-Add").contains(&"client".into())
                    && r.seen("X-Add").contains(&"dst".into())
                    && r.seen("X-Remove").is_empty()
            }),
        ),
        row(
            "response headers: set/add/remove",
            "/resph",
            &["-H", "x-echo-set-header: x-resp-set:backend,x-gone:1"],
            echo("v1", "x-resp-set rule, x-resp-add added, no x-gone", |r| {
                r.header("x-resp-set") == ["rule"]
                    && r.header("x-resp-add") == ["added"]
                    && r.header("x-gone").is_empty()
            }),
        ),
        row(
            "response headers: non-match untouched",
            "/resp",
            &["-H", "x-echo-set-header: x-resp-set:backend,x-gone:1"],
            echo("v1", "x-resp-set backend, x-gone, no x-resp-add", |r| {
                r.header("x-resp-set") == ["backend"]
                    && r.header("x-gone") == ["1"]
                    && r.header("x-resp-add").is_empty()
            }),
        ),
        Row {
            name: "no match: 404",
            service: "nomatch",
            port: 80,
            path: "/other",
            args: &[],
            check: Box::new(|r: &Reply| {
                if r.status == 404 {
                    Ok(())
                } else {
                    Err(format!("want 404, got {}", r.status))
                }
            }),
        },
        Row {
            name: "no match: the one rule hits",
            service: "nomatch",
            port: 80,
            path: "/only",
            args: &[],
            check: Box::new(|r: &Reply| {
                if r.status == 200 && r.version().is_some() {
                    Ok(())
                } else {
                    Err(format!("want 200 from echo, got {}", r.status))
                }
            }),
        },
    ]
}

#[test]
fn virtual_service_matches_and_filters_through_the_waypoint() {
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
        &manifests::pod("client", "client", 0, "client", &[]),
    )
    .unwrap();
    mesh.apply(APPS, &apps()).unwrap();
    mesh.apply(VS, &virtual_services()).unwrap();
    mesh.wait_enrolled("client", "client").unwrap();
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
    for v in ["v1", "v2"] {
        let pod = mesh.wait_for_pods("shop", &format!("web-{v}"), 1).unwrap()[0].clone();
        for port in [8080, 8081, 9000] {
            mesh.wait_listening("shop", &pod, port).unwrap();
        }
    }
    let env = Env { mesh: &mesh };
    // Routes are in force once the first directResponse rule answers (then every rule is).
    let mut last = String::new();
    wait_for(DEADLINE, "the waypoint to serve the VirtualService", || {
        let r = env.curl("web", 80, "/exact", &[]);
        last = format!("{r:?}");
        Ok(r.is_ok_and(|r| r.body == "uri-exact"))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {last}"));

    let mut failed = Vec::new();
    let all = rows();
    for r in &all {
        let got = env
            .curl(r.service, r.port, r.path, r.args)
            .and_then(|rep| (r.check)(&rep));
        match got {
            Ok(()) => eprintln!("ok   {}", r.name),
            Err(e) => {
                eprintln!("FAIL {}: {e}", r.name);
                failed.push(format!("{}: {e}", r.name));
            }
        }
    }
    // tcp routes by port: 9000 → v2 only, 9001 → v1 only.
    for (name, port, want) in [
        ("tcp route port 9000 → v2", 9000, "v2"),
        ("tcp route port 9001 → v1", 9001, "v1"),
    ] {
        match env.who_versions("web", port, 16) {
            Ok(vs) if vs.iter().all(|v| v == want) => eprintln!("ok   {name}"),
            other => {
                eprintln!("FAIL {name}: {other:?}");
                failed.push(format!("{name}: {other:?}"));
            }
        }
    }
    eprintln!(
        "{} of {} rows passed",
        all.len() + 2 - failed.len(),
        all.len() + 2
    );

    // The waypoint deleted: its pod goes, bound traffic is answered directly, counted as bypassed.
    let out = mesh.meshctl(&["waypoint", "delete", "-n", "shop"]).unwrap();
    assert!(
        out.status.success(),
        "meshctl waypoint delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(DEADLINE, "the waypoint pod to go", || {
        Ok(mesh.pod("shop", &waypoint_pod).is_err())
    })
    .unwrap();
    let mut seen = String::new();
    wait_for(DEADLINE, "/exact answered directly by a web pod", || {
        let r = env.curl("web", 80, "/exact", &[]);
        seen = format!("{r:?}");
        Ok(r.is_ok_and(|r| r.status == 200 && r.version().is_some()))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {seen}"));
    let node = mesh.cluster.nodes()[0].clone();
    let mut bypassed = None;
    wait_for(
        DEADLINE,
        "mesh_waypoint_bypass_total on the client's ztunnel",
        || {
            let out = mesh.cluster.run(
                &node.netns,
                &[
                    "curl",
                    "-sf",
                    "--max-time",
                    "5",
                    "http://127.0.0.1:15020/metrics",
                ],
            )?;
            bypassed = String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.starts_with("mesh_waypoint_bypass_total{"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
            Ok(bypassed.is_some_and(|n| n >= 1.0))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}: {bypassed:?}"));

    assert!(
        failed.is_empty(),
        "{} rows failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
