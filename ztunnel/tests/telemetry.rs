//! Telemetry and admin endpoints over real sockets on 127.0.0.1.
//!
//! Owns the tests of [`ztunnel::metrics`], [`ztunnel::copy`] and [`ztunnel::admin`]: scrapes are
//! fetched over HTTP and parsed with a strict OpenMetrics text parser (below), bytes flow through
//! real TCP connections. Touches no proxy path, no namespace and no capture rule.
//!
//! Why not the `prometheus-parse` crate: it silently skips lines it cannot parse, splits label
//! values on `,` and `=`, and treats OpenMetrics counters (`# TYPE x counter` with samples
//! `x_total`) as untyped, so it could not catch the mistakes these tests are for.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::admin::{self, AdminError, AdminState, Server};
use ztunnel::copy::{self, Outcome};
use ztunnel::metrics::{self, Metrics, TcpLabels};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Istio's L4 label names, exactly.
const ISTIO_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

const L4_NAMES: &[&str] = &[
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
];

// ---------------------------------------------------------------------------------------------
// A strict OpenMetrics text parser: every line must be understood, or the test fails.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Scrape {
    /// Family name → type, from `# TYPE`.
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    /// Samples named `name` whose labels include every `(k, v)` in `filter`.
    fn find(&self, name: &str, filter: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && filter
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the single sample matching, or `None` if there is none (panics on several).
    fn value(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let found = self.find(name, filter);
        assert!(
            found.len() <= 1,
            "{name} {filter:?} matches {} series",
            found.len()
        );
        found.first().map(|s| s.value)
    }
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    let ok_rest = |c: char| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':');
    chars.next().is_some_and(ok_first) && chars.all(ok_rest)
}

fn parse_openmetrics(text: &str) -> Result<Scrape, String> {
    let mut scrape = Scrape::default();
    let mut lines = text.split('\n').enumerate().peekable();
    let mut saw_eof = false;
    while let Some((i, line)) = lines.next() {
        let at = |msg: &str| format!("line {}: {msg}: {line:?}", i + 1);
        if saw_eof {
            // Only the final newline may follow "# EOF".
            if line.is_empty() && lines.peek().is_none() {
                break;
            }
            return Err(at("content after # EOF"));
        }
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, family, arg) = (parts.next(), parts.next(), parts.next());
            let (Some(kind), Some(family)) = (kind, family) else {
                return Err(at("short metadata line"));
            };
            if !is_name(family, true) {
                return Err(at("bad family name"));
            }
            match kind {
                "TYPE" => {
                    let ty = arg.ok_or_else(|| at("TYPE without a type"))?;
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "gaugehistogram",
                        "stateset",
                        "info",
                        "summary",
                        "unknown",
                    ];
                    if !known.contains(&ty) {
                        return Err(at("unknown type"));
                    }
                    if scrape
                        .types
                        .insert(family.to_string(), ty.to_string())
                        .is_some()
                    {
                        return Err(at("family declared twice"));
                    }
                }
                "HELP" | "UNIT" => {}
                _ => return Err(at("unknown metadata")),
            }
            continue;
        }
        if line.is_empty() {
            return Err(at("empty line (not allowed in OpenMetrics)"));
        }
        let sample = parse_sample(line).map_err(|e| at(&e))?;
        // Every sample must belong to a declared family, with the suffix its type allows.
        let family = scrape
            .types
            .iter()
            .filter(|(f, _)| sample.name.starts_with(f.as_str()))
            .max_by_key(|(f, _)| f.len())
            .ok_or_else(|| at("sample of an undeclared family"))?;
        let suffix = &sample.name[family.0.len()..];
        let allowed: &[&str] = match family.1.as_str() {
            "counter" => &["_total", "_created"],
            "gauge" | "unknown" | "stateset" => &[""],
            "info" => &["_info"],
            _ => &[
                "", "_bucket", "_count", "_sum", "_created", "_gcount", "_gsum",
            ],
        };
        if !allowed.contains(&suffix) {
            return Err(at(&format!(
                "suffix {suffix:?} not allowed for a {}",
                family.1
            )));
        }
        scrape.samples.push(sample);
    }
    if !saw_eof {
        return Err("no # EOF".to_string());
    }
    Ok(scrape)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_name(name, true) {
        return Err("bad metric name".into());
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        loop {
            // label name
            let start = chars.peek().map(|(i, _)| *i).ok_or("unterminated labels")?;
            if body[start..].starts_with('}') {
                chars.next();
                break;
            }
            let eq = body[start..].find('=').ok_or("label without =")? + start;
            let lname = &body[start..eq];
            if !is_name(lname, false) {
                return Err(format!("bad label name {lname:?}"));
            }
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    '\n' => return Err("raw newline in label value".into()),
                    c => value.push(c),
                }
            }
            if labels.insert(lname.to_string(), value).is_some() {
                return Err(format!("duplicate label {lname}"));
            }
            match chars.next().ok_or("unterminated labels")?.1 {
                ',' => {}
                '}' => break,
                c => return Err(format!("unexpected {c:?} after label value")),
            }
        }
        let consumed = chars.peek().map(|(i, _)| *i).unwrap_or(body.len());
        rest = &body[consumed..];
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before value")?;
    let mut fields = rest.split(' ');
    let value = fields.next().ok_or("no value")?;
    let value: f64 = value.parse().map_err(|_| format!("bad value {value:?}"))?;
    if let Some(ts) = fields.next() {
        ts.parse::<f64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields (exemplars are not expected here)".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[test]
fn parser_is_strict() {
    assert!(parse_openmetrics("# TYPE a counter\na_total 1\n# EOF\n").is_ok());
    assert!(
        parse_openmetrics("# TYPE a counter\na_total 1\n").is_err(),
        "missing EOF"
    );
    assert!(
        parse_openmetrics("# TYPE a counter\na 1\n# EOF\n").is_err(),
        "counter without _total"
    );
    assert!(
        parse_openmetrics("b 1\n# EOF\n").is_err(),
        "undeclared family"
    );
    assert!(
        parse_openmetrics("# TYPE a gauge\na{x=\"1} 1\n# EOF\n").is_err(),
        "unterminated"
    );
    assert!(
        parse_openmetrics("# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n# EOF\n").is_err(),
        "dup label"
    );
    assert!(
        parse_openmetrics("# TYPE a gauge\na{x=\"1\"} one\n# EOF\n").is_err(),
        "bad value"
    );
    let s = parse_openmetrics("# TYPE a gauge\na{x=\"q\\\"},y=\\\\\",y=\"\"} 2\n# EOF\n").unwrap();
    assert_eq!(s.samples[0].labels["x"], "q\"},y=\\");
    assert_eq!(s.samples[0].labels["y"], "");
}

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (Connection: close, Content-Length bodies — what hyper sends for Full).
// ---------------------------------------------------------------------------------------------

struct HttpResponse {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

async fn http(method: &str, addr: SocketAddr, target: &str) -> HttpResponse {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers: BTreeMap<String, String> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        if let Some(len) = headers.get("content-length") {
            assert_eq!(body.len(), len.parse::<usize>().unwrap(), "body length");
        }
        HttpResponse {
            status,
            headers,
            body: body.to_string(),
        }
    };
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .expect("HTTP request timed out")
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

struct Harness {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    last_level: Arc<Mutex<Option<String>>>,
    admin: SocketAddr,
    metrics_addr: SocketAddr,
    ready_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The log-filter check the test's closure applies (ztunnel's real one is tracing's EnvFilter).
fn validate_level(filter: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    for directive in filter.split(',') {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level) {
            return Err(format!("unknown level {level:?}"));
        }
    }
    Ok(())
}

async fn start() -> Harness {
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let last_level = Arc::new(Mutex::new(None));
    let state = AdminState {
        metrics: Arc::clone(&metrics),
        ready: Box::new({
            let ready = Arc::clone(&ready);
            move || {
                if ready.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("waiting for certificates of 2 pods".into())
                }
            }
        }),
        config_dump: Box::new(
            || serde_json::json!({"workloads": [{"name": "echo", "namespace": "default"}], "services": []}),
        ),
        set_log_level: Box::new({
            let last_level = Arc::clone(&last_level);
            move |filter| {
                validate_level(filter)?;
                *last_level.lock().unwrap() = Some(filter.to_string());
                Ok(())
            }
        }),
    };
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let bound = admin::bind(Arc::new(state), any, any, any).await.unwrap();
    let (admin, metrics_addr, ready_addr) = (
        bound.admin_addr().unwrap(),
        bound.metrics_addr().unwrap(),
        bound.ready_addr().unwrap(),
    );
    let task = tokio::spawn(bound.run());
    Harness {
        metrics,
        ready,
        last_level,
        admin,
        metrics_addr,
        ready_addr,
        task,
    }
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let resp = http("GET", addr, "/metrics").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.headers["content-type"], metrics::CONTENT_TYPE);
    parse_openmetrics(&resp.body)
        .unwrap_or_else(|e| panic!("unparseable scrape: {e}\n{}", resp.body))
}

/// Polls the scrape until `check` holds (counters advance right after the write that delivered
/// the bytes, so a reader may see the bytes a moment before the counter).
async fn eventually(addr: SocketAddr, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let s = scrape(addr).await;
        if check(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:#?}",
            s.samples
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A proxied connection: `client` ⇄ (`proxy_client` … `proxy_server`) ⇄ `server`, two real TCP
/// socket pairs, with the proxy ends handed to the copy under test.
struct Pairs {
    client: TcpStream,
    proxy_client: TcpStream,
    proxy_server: TcpStream,
    server: TcpStream,
}

async fn pairs() -> Pairs {
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }
    let (client, proxy_client) = pair().await;
    let (proxy_server, server) = pair().await;
    Pairs {
        client,
        proxy_client,
        proxy_server,
        server,
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn labels(reporter: &str) -> TcpLabels {
    TcpLabels {
        source_workload: "sleep".into(),
        source_workload_namespace: "default".into(),
        source_principal: "spiffe://cluster.local/ns/default/sa/sleep".into(),
        destination_service: "echo.default.svc.cluster.local".into(),
        destination_workload: "echo".into(),
        connection_security_policy: "mutual_tls".into(),
        ..TcpLabels::unknown(reporter)
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn l4_metrics_count_bytes_while_open_and_close_on_drop() {
    let h = start().await;
    const N: usize = 300_000; // several buffers' worth, client → server
    const M: usize = 123_457; // server → client

    let p = pairs().await;
    let conn = h.metrics.open(labels("source"));
    // A second, concurrent connection reported by the other side, to check series separation.
    let q = pairs().await;
    let conn2 = h.metrics.open(labels("destination"));

    let Pairs {
        mut client,
        mut proxy_client,
        mut proxy_server,
        mut server,
    } = p;
    let copy = tokio::spawn(async move {
        let r = copy::bidirectional(&mut proxy_client, &mut proxy_server, &conn).await;
        (r, conn)
    });
    let Pairs {
        client: mut client2,
        proxy_client: mut pc2,
        proxy_server: mut ps2,
        server: mut server2,
    } = q;
    let copy2 = tokio::spawn(async move {
        let r = copy::bidirectional(&mut pc2, &mut ps2, &conn2).await;
        (r, conn2)
    });

    // N bytes up, M bytes down, checked for content.
    let up = pattern(N, 1);
    let down = pattern(M, 7);
    let (w, r) = tokio::join!(client.write_all(&up), async {
        let mut got = vec![0; N];
        server.read_exact(&mut got).await.map(|_| got)
    });
    w.unwrap();
    assert_eq!(r.unwrap(), up);
    let (w, r) = tokio::join!(server.write_all(&down), async {
        let mut got = vec![0; M];
        client.read_exact(&mut got).await.map(|_| got)
    });
    w.unwrap();
    assert_eq!(r.unwrap(), down);
    client2.write_all(b"ping").await.unwrap();
    let mut ping = [0; 4];
    server2.read_exact(&mut ping).await.unwrap();

    // Mid-stream: both connections still open, bytes already counted.
    let src = [("reporter", "source")];
    let dst = [("reporter", "destination")];
    let s = eventually(h.metrics_addr, "byte counters mid-stream", |s| {
        s.value("istio_tcp_received_bytes_total", &src) == Some(N as f64)
            && s.value("istio_tcp_sent_bytes_total", &src) == Some(M as f64)
            && s.value("istio_tcp_received_bytes_total", &dst) == Some(4.0)
    })
    .await;
    assert_eq!(
        s.value("istio_tcp_connections_opened_total", &src),
        Some(1.0)
    );
    assert_eq!(
        s.value("istio_tcp_connections_opened_total", &dst),
        Some(1.0)
    );
    assert_eq!(
        s.value("istio_tcp_connections_closed_total", &src),
        None,
        "closed before the close"
    );
    assert_eq!(s.value("istio_tcp_sent_bytes_total", &dst), Some(0.0));
    assert!(
        !copy.is_finished(),
        "the connection must still be open mid-stream"
    );

    // The names, typed as counters, with exactly Istio's label names and values. (A family with
    // no series yet — `closed`, mid-stream — is not in the scrape at all; checked after close.)
    for family in [
        "istio_tcp_connections_opened",
        "istio_tcp_received_bytes",
        "istio_tcp_sent_bytes",
    ] {
        assert_eq!(
            s.types.get(family).map(String::as_str),
            Some("counter"),
            "{family}"
        );
    }
    let want: BTreeSet<&str> = ISTIO_LABELS.iter().copied().collect();
    for name in L4_NAMES.iter().filter(|n| !n.contains("closed")) {
        let found = s.find(name, &[]);
        assert_eq!(found.len(), 2, "{name}: one series per reporter");
        for sample in found {
            let got: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
            assert_eq!(got, want, "{name} label names");
        }
    }
    let sample = s.find("istio_tcp_connections_opened_total", &src)[0];
    assert_eq!(
        sample.labels["source_principal"],
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    assert_eq!(
        sample.labels["destination_service"],
        "echo.default.svc.cluster.local"
    );
    assert_eq!(sample.labels["connection_security_policy"], "mutual_tls");
    assert_eq!(sample.labels["request_protocol"], "tcp");
    assert_eq!(sample.labels["response_flags"], "-");
    assert_eq!(sample.labels["destination_app"], "unknown");

    // Close the first connection (client first, then server) and check the totals and the close.
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    server.shutdown().await.unwrap();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let (result, conn) = tokio::time::timeout(TIMEOUT, copy).await.unwrap().unwrap();
    assert_eq!(result.unwrap(), (N as u64, M as u64));
    drop(conn);

    let s = scrape(h.metrics_addr).await;
    assert_eq!(
        s.types
            .get("istio_tcp_connections_closed")
            .map(String::as_str),
        Some("counter")
    );
    for name in L4_NAMES {
        for sample in s.find(name, &[]) {
            let got: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
            assert_eq!(got, want, "{name} label names");
        }
    }
    assert_eq!(
        s.value("istio_tcp_connections_opened_total", &src),
        Some(1.0)
    );
    assert_eq!(
        s.value("istio_tcp_connections_closed_total", &src),
        Some(1.0)
    );
    assert_eq!(
        s.value("istio_tcp_received_bytes_total", &src),
        Some(N as f64)
    );
    assert_eq!(s.value("istio_tcp_sent_bytes_total", &src), Some(M as f64));
    assert_eq!(
        s.value("istio_tcp_connections_closed_total", &dst),
        None,
        "the second is still open"
    );

    // The second connection is closed by a (simulated) policy change: its close carries DENY.
    drop((client2, server2));
    let (result, mut conn2) = tokio::time::timeout(TIMEOUT, copy2).await.unwrap().unwrap();
    assert_eq!(result.unwrap(), (4, 0));
    conn2.set_response_flags(metrics::FLAG_DENY);
    drop(conn2);
    let s = scrape(h.metrics_addr).await;
    assert_eq!(
        s.value(
            "istio_tcp_connections_closed_total",
            &[("reporter", "destination"), ("response_flags", "DENY")]
        ),
        Some(1.0)
    );
    assert_eq!(
        s.value(
            "istio_tcp_connections_closed_total",
            &[("reporter", "destination"), ("response_flags", "-")]
        ),
        None
    );
    assert_eq!(
        s.value(
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("response_flags", "-")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn denied_and_failed_connections_are_opened_and_closed_with_flags() {
    let m = Metrics::new();
    for flags in [
        metrics::FLAG_DENY,
        metrics::FLAG_CONNECT,
        metrics::FLAG_DENY,
    ] {
        drop(m.open(TcpLabels {
            response_flags: flags.into(),
            ..TcpLabels::unknown("destination")
        }));
    }
    let s = parse_openmetrics(&m.encode()).unwrap();
    for (flags, n) in [("DENY", 2.0), ("CONNECT", 1.0)] {
        let f = [("response_flags", flags)];
        assert_eq!(s.value("istio_tcp_connections_opened_total", &f), Some(n));
        assert_eq!(s.value("istio_tcp_connections_closed_total", &f), Some(n));
        assert_eq!(s.value("istio_tcp_received_bytes_total", &f), Some(0.0));
    }
}

#[tokio::test]
async fn ztunnel_metrics_and_label_escaping() {
    use ztunnel::certs::CertEvents;
    let m = Metrics::new();
    m.cert_issued("spiffe://cluster.local/ns/a/sa/b");
    m.cert_issued("spiffe://cluster.local/ns/a/sa/b");
    m.cert_fetch_failed("spiffe://cluster.local/ns/a/sa/b");
    m.set_capture_mode("iptables");
    m.set_capture_mode("nftables");
    // A hostile principal (peer-influenced) must not break the exposition.
    let evil = "x\"} 1\nistio_tcp_sent_bytes_total{a=\"\\";
    drop(m.open(TcpLabels {
        source_principal: evil.into(),
        ..TcpLabels::unknown("destination")
    }));

    let s = parse_openmetrics(&m.encode()).unwrap();
    let id = [("identity", "spiffe://cluster.local/ns/a/sa/b")];
    assert_eq!(s.value("ztunnel_certs_issued_total", &id), Some(2.0));
    assert_eq!(s.value("ztunnel_cert_fetch_failures_total", &id), Some(1.0));
    assert_eq!(s.types["ztunnel_capture_mode"], "gauge");
    let modes = s.find("ztunnel_capture_mode", &[]);
    assert_eq!(modes.len(), 1, "only the current mode: {modes:?}");
    assert_eq!(modes[0].labels["mode"], "nftables");
    assert_eq!(modes[0].value, 1.0);
    assert_eq!(
        s.value(
            "istio_tcp_connections_opened_total",
            &[("source_principal", evil)]
        ),
        Some(1.0)
    );
    assert_eq!(
        s.find("istio_tcp_sent_bytes_total", &[]).len(),
        1,
        "no injected series"
    );
}

#[tokio::test]
async fn readiness_flips_from_503_to_200() {
    let h = start().await;
    let r = http("GET", h.ready_addr, "/healthz/ready").await;
    assert_eq!(r.status, 503);
    assert!(
        r.body.contains("waiting for certificates of 2 pods"),
        "{}",
        r.body
    );
    h.ready.store(true, Ordering::SeqCst);
    let r = http("GET", h.ready_addr, "/healthz/ready").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.trim(), "ready");
    assert_eq!(
        http("POST", h.ready_addr, "/healthz/ready").await.status,
        405
    );
}

#[tokio::test]
async fn config_dump_is_json() {
    let h = start().await;
    let r = http("GET", h.admin, "/config_dump").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["workloads"][0]["name"], "echo");
}

#[tokio::test]
async fn logging_sets_valid_filters_and_rejects_bad_ones() {
    let h = start().await;
    let r = http("POST", h.admin, "/logging?level=bad").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("unknown level"), "{}", r.body);
    assert_eq!(*h.last_level.lock().unwrap(), None);

    let r = http("POST", h.admin, "/logging").await;
    assert_eq!(r.status, 400, "missing level");
    assert_eq!(
        http("POST", h.admin, "/logging?level=%zz").await.status,
        400
    );
    assert_eq!(
        http("GET", h.admin, "/logging?level=debug").await.status,
        405
    );

    let r = http("POST", h.admin, "/logging?level=debug").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("debug"));
    let r = http("POST", h.admin, "/logging?level=ztunnel%3Ddebug%2Cinfo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        h.last_level.lock().unwrap().as_deref(),
        Some("ztunnel=debug,info")
    );
}

#[tokio::test]
async fn unknown_paths_are_404_on_every_server() {
    let h = start().await;
    for (addr, path) in [
        (h.admin, "/nope"),
        (h.admin, "/metrics"),
        (h.metrics_addr, "/config_dump"),
        (h.metrics_addr, "/"),
        (h.ready_addr, "/healthz/live"),
    ] {
        assert_eq!(http("GET", addr, path).await.status, 404, "{addr}{path}");
    }
}

#[tokio::test]
async fn binding_errors_name_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let state = Arc::new(AdminState {
        metrics: Metrics::new(),
        ready: Box::new(|| Ok(())),
        config_dump: Box::new(|| serde_json::Value::Null),
        set_log_level: Box::new(|_| Ok(())),
    });
    let err = admin::serve(state, any, taken_addr, any).await.unwrap_err();
    let AdminError::Bind { server, addr, .. } = &err;
    assert_eq!((*server, *addr), (Server::Metrics, taken_addr));
    assert!(err.to_string().contains(&taken_addr.to_string()), "{err}");
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_flowing() {
    let m = Metrics::new();
    let conn = m.open(TcpLabels::unknown("source"));
    let Pairs {
        mut client,
        mut proxy_client,
        mut proxy_server,
        mut server,
    } = pairs().await;
    let copy = tokio::spawn(async move {
        copy::bidirectional(&mut proxy_client, &mut proxy_server, &conn).await
    });

    // The client sends its request and half-closes; the server sees EOF, *then* answers.
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut req = Vec::new();
    tokio::time::timeout(TIMEOUT, server.read_to_end(&mut req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req, b"request");
    let reply = pattern(100_000, 3);
    server.write_all(&reply).await.unwrap();
    server.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(TIMEOUT, client.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, reply);
    let totals = tokio::time::timeout(TIMEOUT, copy)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(totals, (7, 100_000));
}

#[tokio::test]
async fn bidirectional_until_stops_on_cancel() {
    let m = Metrics::new();
    let conn = m.open(TcpLabels::unknown("destination"));
    let Pairs {
        mut client,
        mut proxy_client,
        mut proxy_server,
        mut server,
    } = pairs().await;
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let copy = tokio::spawn(async move {
        let cancel = async {
            let _ = cancel_rx.await;
        };
        // Returning drops the proxy's ends: both connections close.
        copy::bidirectional_until(&mut proxy_client, &mut proxy_server, &conn, cancel).await
    });

    client.write_all(b"hello").await.unwrap();
    let mut buf = [0; 5];
    server.read_exact(&mut buf).await.unwrap();
    assert!(!copy.is_finished());

    cancel_tx.send(()).unwrap();
    let outcome = tokio::time::timeout(TIMEOUT, copy)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(outcome, Outcome::Cancelled(_)), "{outcome:?}");
    assert_eq!(outcome.totals().client_to_server, 5);
    assert_eq!(outcome.totals().server_to_client, 0);

    // Both peers see the connection end (EOF or reset), neither hangs.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(TIMEOUT, client.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(r.map_or(true, |n| n == 0));
    let r = tokio::time::timeout(TIMEOUT, server.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(r.map_or(true, |n| n == 0));
}

#[tokio::test]
async fn bidirectional_until_completes_without_cancel() {
    let m = Metrics::new();
    let conn = m.open(TcpLabels::unknown("source"));
    let Pairs {
        mut client,
        mut proxy_client,
        mut proxy_server,
        mut server,
    } = pairs().await;
    let copy = tokio::spawn(async move {
        copy::bidirectional_until(
            &mut proxy_client,
            &mut proxy_server,
            &conn,
            std::future::pending(),
        )
        .await
    });
    client.write_all(b"abc").await.unwrap();
    client.shutdown().await.unwrap();
    server.write_all(b"de").await.unwrap();
    server.shutdown().await.unwrap();
    let mut sink = Vec::new();
    server.read_to_end(&mut sink).await.unwrap();
    client.read_to_end(&mut sink).await.unwrap();
    assert_eq!(sink, b"abcde");
    let outcome = tokio::time::timeout(TIMEOUT, copy)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Completed(copy::Totals {
            client_to_server: 3,
            server_to_client: 2
        })
    );
}
