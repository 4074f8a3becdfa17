//! The pure half of our Gateway API mesh conformance runner (tests/tests/gateway_conformance.rs):
//! where the upstream suite lives, how its manifests are enrolled in ambient with a waypoint,
//! how a client pod's request host resolves to a Service VIP as Kubernetes DNS would, the curl
//! command a request becomes, and checking curl's output against an expectation the way the
//! suite's `CompareRoundTrip` does (status, backend pod, namespace, path, headers seen and not
//! seen by the backend, response headers, redirect Location).
//!
//! No processes, files of the mesh or network here (the runner owns those); the upstream files
//! are only read, never copied.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde_json::{Value, json};

/// The upstream suite's version directory under tests/conformance.
pub const SUITE: &str = "gateway-api-v1.6.1";
/// The suite's namespaces (`suite.MeshNamespace`, `suite.MeshConsumerNamespace`).
pub const MESH_NS: &str = "gateway-conformance-mesh";
pub const CONSUMER_NS: &str = "gateway-conformance-mesh-consumer";
/// The waypoint each enrolled namespace gets (what `istioctl waypoint apply` names it).
pub const WAYPOINT: &str = "waypoint";

/// The suite's inputs, kept in the repository (`tests/conformance/<SUITE>`).
pub fn suite_dir() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("conformance")
        .join(SUITE);
    anyhow::ensure!(
        dir.join("mesh/manifests.yaml").is_file(),
        "the Gateway API conformance inputs are missing: expected {}/mesh/manifests.yaml (kept in \
         the repository under tests/conformance/{SUITE})",
        dir.display()
    );
    Ok(dir)
}

/// What an Istio ambient user adds to the suite's manifests: every Namespace labelled
/// `istio.io/dataplane-mode: ambient` and `istio.io/use-waypoint: waypoint`, and a Gateway
/// `waypoint` of class `istio-waypoint` in each. Returns the namespaces enrolled.
pub fn enroll_with_waypoints(docs: &mut Vec<Value>) -> Vec<String> {
    let mut namespaces = Vec::new();
    for doc in docs.iter_mut() {
        if doc.get("kind").and_then(Value::as_str) != Some("Namespace") {
            continue;
        }
        let Some(name) = doc.pointer("/metadata/name").and_then(Value::as_str) else {
            continue;
        };
        namespaces.push(name.to_string());
        let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) else {
            continue;
        };
        let labels = meta.entry("labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        if let Some(l) = labels.as_object_mut() {
            l.insert("istio.io/dataplane-mode".into(), "ambient".into());
            l.insert("istio.io/use-waypoint".into(), WAYPOINT.into());
        }
    }
    for ns in &namespaces {
        docs.push(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": WAYPOINT, "namespace": ns},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        }));
    }
    namespaces
}

/// Service VIPs by (namespace, name): the first ClusterIP of each Service document.
pub type Vips = BTreeMap<(String, String), IpAddr>;

/// Adds the VIPs of the rendered Service documents in `docs` to `vips`.
pub fn collect_vips(docs: &[Value], vips: &mut Vips) {
    for d in docs {
        if d.get("kind").and_then(Value::as_str) != Some("Service") {
            continue;
        }
        let ns = d.pointer("/metadata/namespace").and_then(Value::as_str);
        let name = d.pointer("/metadata/name").and_then(Value::as_str);
        let ip = d
            .pointer("/spec/clusterIPs/0")
            .or_else(|| d.pointer("/spec/clusterIP"))
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<IpAddr>().ok());
        if let (Some(name), Some(ip)) = (name, ip) {
            vips.insert((ns.unwrap_or("default").into(), name.into()), ip);
        }
    }
}

/// Splits `host[:port]` (IPv6 in brackets) into host and port (80 when absent).
pub fn split_host_port(host: &str) -> Result<(&str, u16), String> {
    let bad_port = |p: &str| format!("bad port {p:?} in host {host:?}");
    if let Some(rest) = host.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in host {host:?}"))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((h, p.parse().map_err(|_| bad_port(p))?)),
            None if after.is_empty() => Ok((h, 80)),
            None => Err(format!("junk after ']' in host {host:?}")),
        };
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok((host, 80)); // a bare IPv6 address has colons but no port
    }
    match host.rsplit_once(':') {
        Some((h, p)) => Ok((h, p.parse().map_err(|_| bad_port(p))?)),
        None => Ok((host, 80)),
    }
}

/// The address a client in `client_ns` reaches for `host[:port]`: an IP as is, else the VIP of
/// the Service the name resolves to through a pod's DNS search path (`<ns>.svc.<domain>`,
/// `svc.<domain>`, `<domain>`, then the name itself), as cluster DNS answers it.
pub fn resolve(
    host: &str,
    client_ns: &str,
    vips: &Vips,
    cluster_domain: &str,
) -> Result<SocketAddr, String> {
    let (name, port) = split_host_port(host)?;
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let suffixes = [
        format!(".{client_ns}.svc.{cluster_domain}"),
        format!(".svc.{cluster_domain}"),
        format!(".{cluster_domain}"),
        String::new(),
    ];
    let service_suffix = format!(".svc.{cluster_domain}");
    for s in &suffixes {
        let fqdn = format!("{name}{s}");
        // A Service record is exactly <service>.<namespace>.svc.<domain>.
        let Some(rest) = fqdn.strip_suffix(&service_suffix) else {
            continue;
        };
        if let Some((svc, ns)) = rest.split_once('.')
            && !ns.contains('.')
            && let Some(ip) = vips.get(&(ns.to_string(), svc.to_string()))
        {
            return Ok(SocketAddr::new(*ip, port));
        }
    }
    Err(format!(
        "{host:?} resolves to no Service from namespace {client_ns} (known: {})",
        vips.keys()
            .map(|(ns, n)| format!("{n}.{ns}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// One request of a case, as the suite's `http.Request` states it.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// What the client dials (the URL's host[:port]); also the Host header unless `headers`
    /// sets one.
    pub host: String,
    pub method: String,
    /// Path and query ("" means "/").
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn path(&self) -> &str {
        if self.path.is_empty() {
            "/"
        } else {
            &self.path
        }
    }

    /// The Host header sent: an explicit `Host` header, else the URL's host[:port].
    pub fn host_header(&self) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("host"))
            .map_or(self.host.as_str(), |(_, v)| v.as_str())
    }

    /// curl's argv for one request to `addr`: status and response headers then body on stdout,
    /// no redirect following, the path as written.
    pub fn curl(&self, addr: SocketAddr) -> Vec<String> {
        let mut argv: Vec<String> = ["curl", "-sS", "--max-time", "5", "--path-as-is", "-D", "-"]
            .map(String::from)
            .into();
        argv.extend(self.common(addr));
        argv
    }

    /// curl's argv for `n` requests in a row on one connection, each body followed by a line
    /// `{"status":<code>}` (see [`parse_batch`]).
    pub fn curl_batch(&self, addr: SocketAddr, n: usize) -> Vec<String> {
        let mut argv: Vec<String> = ["curl", "-sS", "--max-time", "120", "--path-as-is", "-w"]
            .map(String::from)
            .into();
        argv.push("\n{\"status\":%{http_code}}\n".into());
        let common = self.common(addr);
        let (opts, url) = common.split_at(common.len() - 1);
        argv.extend(opts.iter().cloned());
        argv.extend(std::iter::repeat_n(url[0].clone(), n));
        argv
    }

    fn common(&self, addr: SocketAddr) -> Vec<String> {
        let method = if self.method.is_empty() {
            "GET"
        } else {
            &self.method
        };
        let mut argv = vec![
            "-X".into(),
            method.into(),
            "-H".into(),
            format!("Host: {}", self.host_header()),
        ];
        for (k, v) in &self.headers {
            if !k.eq_ignore_ascii_case("host") {
                argv.push("-H".into());
                argv.push(format!("{k}: {v}"));
            }
        }
        argv.push(format!("http://{addr}{}", self.path()));
        argv
    }
}

/// What a redirect's Location must say (`roundtripper.RedirectRequest`); `None` takes the
/// suite's defaults: the request's scheme and path, any host, the scheme's default port.
#[derive(Clone, Debug, Default)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<String>,
    pub path: Option<String>,
}

/// One `http.ExpectedResponse`.
#[derive(Clone, Debug, Default)]
pub struct Expectation {
    pub request: Request,
    /// Accepted statuses (empty means 200).
    pub status: Vec<u16>,
    /// Prefix of the serving pod's name ("" accepts any).
    pub backend: String,
    pub namespace: Option<String>,
    /// The path (and query) the backend must see; `None`: the request's.
    pub seen_path: Option<String>,
    /// Headers the backend must see (values of repeated headers joined by ",").
    pub seen_headers: Vec<(String, String)>,
    pub absent_headers: Vec<String>,
    pub response_headers: Vec<(String, String)>,
    pub response_absent: Vec<String>,
    pub redirect: Option<Redirect>,
}

/// What curl printed for one exchange.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// Values of response header `name` joined by "," (None when absent).
    pub fn header(&self, name: &str) -> Option<String> {
        let v: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        (!v.is_empty()).then(|| v.join(","))
    }
}

/// Parses `curl -D - -o -` output: the last header block (interim 1xx ones skipped), then the
/// body.
pub fn parse_curl(out: &[u8]) -> Result<Reply, String> {
    let text = String::from_utf8_lossy(out);
    let mut rest: &str = &text;
    loop {
        let (head, body) = rest
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no complete response head in curl output {text:?}"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        if (100..200).contains(&status) {
            rest = body;
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        return Ok(Reply {
            status,
            headers,
            body: body.to_string(),
        });
    }
}

/// Parses [`Request::curl_batch`] output into (status, serving pod) per request.
pub fn parse_batch(out: &[u8]) -> Result<Vec<(u16, String)>, String> {
    let mut values = serde_json::Deserializer::from_slice(out).into_iter::<Value>();
    let mut replies = Vec::new();
    while let Some(body) = values.next() {
        let body = body.map_err(|e| format!("batch output is not echo replies: {e}"))?;
        let status = match values.next() {
            Some(Ok(s)) => s.get("status").and_then(Value::as_u64),
            _ => None,
        }
        .ok_or_else(|| "batch output: a reply without its status line".to_string())?;
        let pod = body.get("pod").and_then(Value::as_str).unwrap_or("");
        replies.push((u16::try_from(status).unwrap_or(0), pod.to_string()));
    }
    Ok(replies)
}

/// `mesh-echo grpc-call` arguments after the binary: `count` unary calls to `addr` on one
/// connection, with `authority` as `:authority` (the Host the suite's client would send).
pub fn grpc_call_args(addr: SocketAddr, authority: &str, count: usize) -> Vec<String> {
    [
        "grpc-call",
        "--addr",
        &addr.to_string(),
        "--authority",
        authority,
        "--method",
        "unary",
        "--count",
        &count.to_string(),
        "--timeout",
        "5s",
    ]
    .map(String::from)
    .into()
}

/// Parses `mesh-echo grpc-call` output (a JSON line per reply, then one with the call's
/// `status`) into (grpc-status, serving pod) per call; a call that failed has pod "".
pub fn parse_grpc_calls(out: &[u8]) -> Result<Vec<(i64, String)>, String> {
    let mut calls = Vec::new();
    let mut pod = String::new();
    for line in String::from_utf8_lossy(out)
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("grpc-call printed {line:?}: {e}"))?;
        if let Some(status) = v.get("status").and_then(Value::as_i64) {
            calls.push((status, std::mem::take(&mut pod)));
        } else if let Some(p) = v.get("pod").and_then(Value::as_str) {
            pod = p.to_string();
        }
    }
    Ok(calls)
}

/// Values of the header `name` the backend saw, joined by "," (the echo reply's `headers`
/// maps names to a list of values, or to one value); names compare case-insensitively.
fn seen_header(echo: &Value, name: &str) -> Option<String> {
    let map = echo.get("headers")?.as_object()?;
    let mut vals = Vec::new();
    for (k, v) in map {
        if k.eq_ignore_ascii_case(name) {
            match v {
                Value::Array(a) => vals.extend(a.iter().filter_map(Value::as_str)),
                Value::String(s) => vals.push(s),
                _ => {}
            }
        }
    }
    (!vals.is_empty()).then(|| vals.join(","))
}

/// Checks a reply against an expectation as the suite's `CompareRoundTrip` does: backend-side
/// checks on a 200, Location checks on a redirect, response headers on any status.
pub fn check(exp: &Expectation, reply: &Reply) -> Result<(), String> {
    let statuses = if exp.status.is_empty() {
        &[200][..]
    } else {
        &exp.status[..]
    };
    if !statuses.contains(&reply.status) {
        return Err(format!(
            "status {} (wanted {statuses:?}); body {:?}",
            reply.status,
            truncate(&reply.body)
        ));
    }
    for (k, v) in &exp.response_headers {
        let got = reply.header(k);
        if got.as_deref() != Some(v) {
            return Err(format!("response header {k}: {got:?}, wanted {v:?}"));
        }
    }
    for k in &exp.response_absent {
        if let Some(got) = reply.header(k) {
            return Err(format!("response header {k}: {got:?}, wanted none"));
        }
    }
    if reply.status == 200 {
        check_backend(exp, reply)
    } else if (300..400).contains(&reply.status) {
        check_redirect(exp, reply)
    } else {
        Ok(())
    }
}

fn check_backend(exp: &Expectation, reply: &Reply) -> Result<(), String> {
    let echo: Value = serde_json::from_str(&reply.body).map_err(|e| {
        format!(
            "body is not an echo reply ({e}): {:?}",
            truncate(&reply.body)
        )
    })?;
    let field = |k: &str| {
        echo.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let pod = field("pod");
    if !pod.starts_with(&exp.backend) {
        return Err(format!("served by pod {pod:?}, wanted {:?}*", exp.backend));
    }
    if let Some(ns) = &exp.namespace
        && field("namespace") != *ns
    {
        return Err(format!(
            "served from namespace {:?}, wanted {ns:?}",
            field("namespace")
        ));
    }
    let want_path = exp.seen_path.as_deref().unwrap_or(exp.request.path());
    if field("path") != want_path {
        return Err(format!(
            "backend saw path {:?}, wanted {want_path:?}",
            field("path")
        ));
    }
    let want_method = if exp.request.method.is_empty() {
        "GET"
    } else {
        &exp.request.method
    };
    if field("method") != want_method {
        return Err(format!(
            "backend saw method {:?}, wanted {want_method}",
            field("method")
        ));
    }
    for (k, v) in &exp.seen_headers {
        let got = seen_header(&echo, k);
        if got.as_deref() != Some(v) {
            return Err(format!("backend saw header {k}: {got:?}, wanted {v:?}"));
        }
    }
    for k in &exp.absent_headers {
        if let Some(got) = seen_header(&echo, k) {
            return Err(format!("backend saw header {k}: {got:?}, wanted none"));
        }
    }
    Ok(())
}

fn check_redirect(exp: &Expectation, reply: &Reply) -> Result<(), String> {
    let Some(want) = &exp.redirect else {
        return Ok(());
    };
    let location = reply
        .header("location")
        .ok_or_else(|| format!("redirect {} without a Location", reply.status))?;
    let (scheme, rest) = location
        .split_once("://")
        .ok_or_else(|| format!("Location {location:?} is not absolute"))?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path_query) = rest.split_at(end);
    let path = path_query.split('?').next().unwrap_or("");
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']').unwrap_or((v6, ""));
            (h, after.strip_prefix(':').unwrap_or(""))
        }
        None => authority.rsplit_once(':').unwrap_or((authority, "")),
    };
    let mismatch = |what: &str, got: &str, wanted: &str| {
        Err(format!(
            "Location {location:?}: {what} {got:?}, wanted {wanted:?}"
        ))
    };
    if let Some(h) = &want.host
        && host != h
    {
        return mismatch("host", host, h);
    }
    let want_scheme = want.scheme.as_deref().unwrap_or("http");
    if scheme != want_scheme {
        return mismatch("scheme", scheme, want_scheme);
    }
    match &want.port {
        Some(p) if port != p => return mismatch("port", port, p),
        Some(_) => {}
        None => {
            let default = if scheme == "https" { "443" } else { "80" };
            if !port.is_empty() && port != default {
                return mismatch("port", port, &format!("none or {default}"));
            }
        }
    }
    let want_path = want
        .path
        .as_deref()
        .unwrap_or_else(|| exp.request.path().split('?').next().unwrap_or("/"));
    if path != want_path {
        return mismatch("path", path, want_path);
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Checks an observed split: every response from a backend with a non-zero weight, each
/// backend's share within `tolerance` (absolute) of its weight's. `weights` are pod-name
/// prefixes and weights; `pods` the serving pod of each request.
pub fn check_distribution(
    weights: &[(&str, u32)],
    pods: &[String],
    tolerance: f64,
) -> Result<(), String> {
    let total_weight: u32 = weights.iter().map(|(_, w)| w).sum();
    let mut counts = vec![0usize; weights.len()];
    for p in pods {
        // Longest prefix wins, so "echo-v1" does not swallow "echo-v10".
        let i = weights
            .iter()
            .enumerate()
            .filter(|(_, (prefix, _))| p.starts_with(prefix))
            .max_by_key(|(_, (prefix, _))| prefix.len())
            .map(|(i, _)| i)
            .ok_or_else(|| format!("a request was served by {p:?}, not one of the backends"))?;
        counts[i] += 1;
    }
    let n = pods.len().max(1) as f64;
    for ((prefix, w), c) in weights.iter().zip(&counts) {
        let want = f64::from(*w) / f64::from(total_weight.max(1));
        let got = *c as f64 / n;
        if *w == 0 && *c > 0 || (got - want).abs() > tolerance {
            return Err(format!(
                "{prefix}: {c} of {} requests ({:.1}%), wanted {:.1}% ± {:.1}",
                pods.len(),
                got * 100.0,
                want * 100.0,
                tolerance * 100.0
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vips() -> Vips {
        let mut v = Vips::new();
        v.insert(
            (MESH_NS.into(), "echo".into()),
            "10.96.0.1".parse().unwrap(),
        );
        v.insert(
            (MESH_NS.into(), "echo-v1".into()),
            "10.96.0.2".parse().unwrap(),
        );
        v.insert(
            (CONSUMER_NS.into(), "echo".into()),
            "10.96.0.9".parse().unwrap(),
        );
        v
    }

    #[test]
    fn hosts_resolve_as_cluster_dns_answers_a_pod() {
        let v = vips();
        let r = |h: &str, ns: &str| resolve(h, ns, &v, "cluster.local");
        assert_eq!(r("echo", MESH_NS).unwrap(), "10.96.0.1:80".parse().unwrap());
        // A short name is the client's own namespace's Service.
        assert_eq!(
            r("echo", CONSUMER_NS).unwrap(),
            "10.96.0.9:80".parse().unwrap()
        );
        assert!(r("echo-v1", CONSUMER_NS).is_err());
        let cross = "echo-v1.gateway-conformance-mesh";
        assert_eq!(
            r(cross, CONSUMER_NS).unwrap(),
            "10.96.0.2:80".parse().unwrap()
        );
        let fqdn = "echo-v1.gateway-conformance-mesh.svc.cluster.local.:8080";
        assert_eq!(r(fqdn, "x").unwrap(), "10.96.0.2:8080".parse().unwrap());
        assert_eq!(
            r("echo-v1.gateway-conformance-mesh.svc:7070", "x").unwrap(),
            "10.96.0.2:7070".parse().unwrap()
        );
        assert_eq!(
            r("echo-v1:8080", MESH_NS).unwrap(),
            "10.96.0.2:8080".parse().unwrap()
        );
        assert_eq!(
            r("[fd00::5]:8080", "x").unwrap(),
            "[fd00::5]:8080".parse().unwrap()
        );
        assert_eq!(
            r("10.1.2.3:8080", "x").unwrap(),
            "10.1.2.3:8080".parse().unwrap()
        );
        assert!(r("echo.nowhere", MESH_NS).is_err());
        assert!(r("echo:http", MESH_NS).is_err());
    }

    #[test]
    fn enrollment_labels_namespaces_and_adds_a_waypoint_each() {
        let mut docs = vec![
            json!({"kind": "Namespace", "metadata": {"name": "a", "labels": {"x": "y"}}}),
            json!({"kind": "Namespace", "metadata": {"name": "b"}}),
            json!({"kind": "Service", "metadata": {"name": "s", "namespace": "a"}}),
        ];
        assert_eq!(enroll_with_waypoints(&mut docs), ["a", "b"]);
        for d in &docs[..2] {
            assert_eq!(
                d["metadata"]["labels"]["istio.io/dataplane-mode"],
                "ambient"
            );
            assert_eq!(d["metadata"]["labels"]["istio.io/use-waypoint"], WAYPOINT);
        }
        assert_eq!(docs[0]["metadata"]["labels"]["x"], "y");
        let gws: Vec<_> = docs.iter().filter(|d| d["kind"] == "Gateway").collect();
        assert_eq!(gws.len(), 2);
        assert_eq!(gws[1]["metadata"]["namespace"], "b");
        assert_eq!(gws[1]["spec"]["gatewayClassName"], "istio-waypoint");
    }

    fn reply(status: u16, headers: &str, body: &Value) -> Reply {
        let out = format!("HTTP/1.1 {status} X\r\n{headers}\r\n{body}");
        parse_curl(out.as_bytes()).unwrap()
    }

    fn echo(pod: &str, path: &str, headers: Value) -> Value {
        json!({"pod": pod, "namespace": MESH_NS, "path": path, "method": "GET",
               "host": "echo", "headers": headers})
    }

    fn exp(path: &str) -> Expectation {
        Expectation {
            request: Request {
                host: "echo".into(),
                path: path.into(),
                ..Default::default()
            },
            backend: "echo-v1".into(),
            namespace: Some(MESH_NS.into()),
            ..Default::default()
        }
    }

    #[test]
    fn backend_side_checks() {
        let body = echo(
            "echo-v1-abc-xyz",
            "/add",
            json!({"X-Header-Add": ["a", "b"], "Some": ["v"]}),
        );
        let ok = reply(200, "Content-Type: json\r\n", &body);
        let mut e = exp("/add");
        e.seen_headers = vec![("x-header-add".into(), "a,b".into())];
        e.absent_headers = vec!["X-Header-Remove".into()];
        assert_eq!(check(&e, &ok), Ok(()));
        let mut wrong = e.clone();
        wrong.backend = "echo-v2".into();
        assert!(check(&wrong, &ok).unwrap_err().contains("echo-v2"));
        let mut wrong = e.clone();
        wrong.absent_headers = vec!["some".into()];
        assert!(check(&wrong, &ok).is_err());
        let mut wrong = e.clone();
        wrong.seen_path = Some("/other".into());
        assert!(check(&wrong, &ok).is_err());
        let mut wrong = e.clone();
        wrong.namespace = Some(CONSUMER_NS.into());
        assert!(check(&wrong, &ok).is_err());
        let mut wrong = e.clone();
        wrong.response_headers = vec![("X-Header-Set".into(), "set".into())];
        assert!(check(&wrong, &ok).is_err());
        wrong.response_headers.clear();
        wrong.response_absent = vec!["content-type".into()];
        assert!(check(&wrong, &ok).is_err());
        // A 404 is only a status: no backend to check.
        let mut nf = exp("/");
        nf.status = vec![404];
        assert_eq!(check(&nf, &reply(404, "", &json!("no route"))), Ok(()));
        assert!(check(&nf, &ok).unwrap_err().contains("status 200"));
    }

    #[test]
    fn redirect_checks_take_the_suites_defaults() {
        let r = |loc: &str| reply(302, &format!("Location: {loc}\r\n"), &json!(""));
        let mut e = exp("/port");
        e.status = vec![302];
        e.redirect = Some(Redirect {
            port: Some("8083".into()),
            ..Default::default()
        });
        assert_eq!(check(&e, &r("http://echo:8083/port")), Ok(()));
        assert!(check(&e, &r("http://echo/port")).is_err());
        e.redirect = Some(Redirect {
            scheme: Some("https".into()),
            host: Some("example.org".into()),
            ..Default::default()
        });
        assert_eq!(check(&e, &r("https://example.org/port")), Ok(()));
        assert_eq!(check(&e, &r("https://example.org:443/port")), Ok(()));
        assert!(check(&e, &r("https://example.org:80/port")).is_err());
        assert!(check(&e, &r("http://example.org/port")).is_err());
        assert!(check(&e, &r("https://echo/port")).is_err());
        assert!(check(&e, &r("https://example.org/other")).is_err());
        assert!(check(&e, &r("/port")).is_err());
        e.redirect = Some(Redirect {
            path: Some("/replacement-prefix/lemon".into()),
            ..Default::default()
        });
        assert_eq!(
            check(&e, &r("http://echo/replacement-prefix/lemon")),
            Ok(())
        );
        assert!(check(&e, &reply(302, "", &json!(""))).is_err());
    }

    #[test]
    fn curl_output_and_arguments() {
        let out = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nA: 1\r\nA: 2\r\n\r\n{}";
        let r = parse_curl(out).unwrap();
        assert_eq!(
            (r.status, r.header("a").as_deref(), r.body.as_str()),
            (200, Some("1,2"), "{}")
        );
        assert!(parse_curl(b"").is_err());
        let req = Request {
            host: "echo-v2".into(),
            headers: vec![("Host".into(), "echo-v1".into()), ("X".into(), "y".into())],
            ..Default::default()
        };
        let argv = req.curl("10.96.0.3:80".parse().unwrap());
        assert!(argv.windows(2).any(|w| w == ["-H", "Host: echo-v1"]));
        assert!(argv.windows(2).any(|w| w == ["-H", "X: y"]));
        assert_eq!(argv.last().unwrap(), "http://10.96.0.3:80/");
        let batch = req.curl_batch("[fd00::1]:80".parse().unwrap(), 3);
        assert_eq!(
            batch
                .iter()
                .filter(|a| *a == "http://[fd00::1]:80/")
                .count(),
            3
        );
        let out = b"{\"pod\":\"echo-v1-a\"}\n{\"status\":200}\n{\"pod\":\"echo-v2-b\"}\n{\"status\":200}\n";
        assert_eq!(
            parse_batch(out).unwrap(),
            [
                (200, "echo-v1-a".to_string()),
                (200, "echo-v2-b".to_string())
            ]
        );
        assert!(parse_batch(b"no healthy upstream\n{\"status\":503}\n").is_err());
    }

    #[test]
    fn grpc_call_output() {
        let out = b"{\"pod\":\"echo-v1-a\",\"message\":\"hello\"}\n{\"status\":0}\n\
                    {\"status\":14,\"message\":\"unavailable\"}\n";
        assert_eq!(
            parse_grpc_calls(out).unwrap(),
            [(0, "echo-v1-a".to_string()), (14, String::new())]
        );
        let args = grpc_call_args("10.96.0.1:7070".parse().unwrap(), "echo:7070", 5);
        assert!(args.windows(2).any(|w| w == ["--authority", "echo:7070"]));
        assert!(args.windows(2).any(|w| w == ["--count", "5"]));
    }

    #[test]
    fn distribution_within_tolerance() {
        let pods = |a: usize, b: usize| {
            let mut v = vec!["echo-v1-x".to_string(); a];
            v.extend(vec!["echo-v2-y".to_string(); b]);
            v
        };
        let w = [("echo-v1", 70), ("echo-v2", 30), ("echo-v3", 0)];
        assert_eq!(check_distribution(&w, &pods(355, 145), 0.05), Ok(()));
        assert!(check_distribution(&w, &pods(400, 100), 0.05).is_err());
        assert!(check_distribution(&w, &pods(500, 0), 0.05).is_err());
        let mut stray = pods(350, 149);
        stray.push("echo-v3-z".into());
        assert!(check_distribution(&w, &stray, 0.05).is_err());
        stray.push("other".into());
        assert!(
            check_distribution(&w, &stray, 0.05)
                .unwrap_err()
                .contains("other")
        );
    }
}
