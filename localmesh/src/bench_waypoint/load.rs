//! The bench's tools: wrk and h2load runs and their reports, a process's CPU time and peak
//! RSS from /proc, and the backend's and proxies' configurations. No scenario of its own.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use testbed::{Cluster, Netns};

use super::{BACKEND_PORT, CONNECTIONS, Target};
pub(super) use crate::bench::num;
use crate::wait_for;

pub(super) fn s(p: &Path) -> String {
    p.display().to_string()
}

pub(super) fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Requests per second of a load report (`requests` over `duration_us`).
pub(super) fn rps(report: &Value) -> f64 {
    num(report, "requests") / (num(report, "duration_us") / 1e6)
}

/// Waits until `url` answers from `netns` with the backend's 1 KiB body.
pub(super) fn wait_body(cluster: &Cluster, netns: &Netns, url: &str) -> anyhow::Result<()> {
    wait_for(
        Duration::from_secs(30),
        &format!("{url} to serve the 1 KiB body"),
        || {
            let out = cluster.run(netns, &["curl", "-sf", "--max-time", "2", url])?;
            Ok(out.status.success() && out.stdout.len() == 1024)
        },
    )
}

/// wrk at saturation on `url` for `d`; the report script's JSON.
pub(super) fn wrk(
    cluster: &Cluster,
    netns: &Netns,
    cpu: &Option<String>,
    script: &Path,
    url: &str,
    d: Duration,
) -> anyhow::Result<Value> {
    let (conns, secs, script) = (
        CONNECTIONS.to_string(),
        format!("{}s", d.as_secs().max(1)),
        s(script),
    );
    let mut argv = Vec::new();
    if let Some(cpu) = cpu {
        argv.extend(["taskset", "-c", cpu.as_str()]);
    }
    argv.extend(["wrk", "-t1", "-c", &conns, "-d", &secs, "-s", &script, url]);
    let out = cluster.run(netns, &argv)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no report from wrk {url}: {stdout}"))?;
    let v: Value = serde_json::from_str(line).with_context(|| format!("parsing {line}"))?;
    if num(&v, "errors") > 0.0 || num(&v, "non2xx") > 0.0 {
        bail!("wrk {url} saw errors: {line}");
    }
    Ok(v)
}

/// h2load over HTTP/1.1 on `url` at `per_conn` requests/s on each of the connections for `d`:
/// (achieved req/s, p50 µs, p99 µs) from its per-request log, written to `log`.
#[allow(clippy::too_many_arguments)]
pub(super) fn h2load_fixed(
    cluster: &Cluster,
    netns: &Netns,
    cpu: &Option<String>,
    log: &Path,
    url: &str,
    per_conn: f64,
    d: Duration,
) -> anyhow::Result<(f64, f64, f64)> {
    let (conns, rps, secs, log_arg) = (
        CONNECTIONS.to_string(),
        format!("--rps={per_conn}"),
        d.as_secs().max(1).to_string(),
        format!("--log-file={}", log.display()),
    );
    let mut argv = Vec::new();
    if let Some(cpu) = cpu {
        argv.extend(["taskset", "-c", cpu.as_str()]);
    }
    argv.extend([
        "h2load", "--h1", "-t", "1", "-c", &conns, &rps, "-D", &secs, &log_arg, url,
    ]);
    let out = cluster.run(netns, &argv)?;
    if !out.status.success() {
        bail!("h2load {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut lat = Vec::new();
    let (mut first, mut last) = (u64::MAX, 0u64);
    for line in text.lines() {
        let mut cols = line.split('\t');
        let (Some(start), Some(status), Some(us)) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        let (Ok(start), Ok(us)) = (start.parse::<u64>(), us.parse::<u64>()) else {
            continue;
        };
        if status != "200" {
            bail!("h2load {url}: status {status}");
        }
        first = first.min(start);
        last = last.max(start + us);
        lat.push(us);
    }
    if lat.is_empty() {
        bail!("h2load {url} completed no request");
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize] as f64;
    let span = (last.saturating_sub(first) as f64 / 1e6).max(1e-6);
    Ok((lat.len() as f64 / span, pct(0.50), pct(0.99)))
}

/// `pid` and its children (nginx's workers).
pub(super) fn family(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    pids.extend(
        children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok()),
    );
    pids
}

/// utime+stime of `pid` and its children, in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for p in family(pid) {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat"))
            .with_context(|| format!("reading /proc/{p}/stat"))?;
        // Fields after the command name (which may hold spaces) start at field 3 (state).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| {
            f.get(n - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total += field(14) + field(15);
    }
    Ok(total)
}

pub(super) fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// VmHWM of `pid` and its children, KiB (shared pages counted once per process).
pub(super) fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for p in family(pid) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status"))
            .with_context(|| format!("reading /proc/{p}/status"))?;
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// wrk's report as one JSON line (the percentiles are wrk's, in µs).
pub(super) const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d,"non2xx":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"#;

/// The nginx directives every instance needs to run unprivileged-file-free inside the run dir.
pub(super) fn nginx_common(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nuser root;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err warn;\n\
         events {{ worker_connections 4096; }}\n"
    )
}

pub(super) fn nginx_http_common(dir: &Path, name: &str) -> String {
    let d = dir.display();
    let mut h =
        String::from("access_log off;\nkeepalive_requests 100000000;\nkeepalive_timeout 300s;\n");
    for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(h, "{t}_temp_path {d}/{name}-tmp/{t};");
    }
    h
}

pub(super) fn backend_nginx_conf(dir: &Path, listen: &str) -> String {
    let body = "x".repeat(1024);
    format!(
        "worker_processes 1;\n{}http {{\n{}server {{\n  listen {listen};\n  \
         location / {{ default_type application/octet-stream; return 200 \"{body}\"; }}\n}}\n}}\n",
        nginx_common(dir, "backend"),
        nginx_http_common(dir, "backend"),
    )
}

pub(super) fn proxy_nginx_conf(dir: &Path) -> String {
    format!(
        "worker_processes 2;\n{}http {{\n{}upstream backend {{\n  server 127.0.0.1:{BACKEND_PORT};\n  \
         keepalive 64;\n  keepalive_requests 100000000;\n}}\nserver {{\n  listen 127.0.0.1:{};\n  \
         location / {{\n    proxy_pass http://backend;\n    proxy_http_version 1.1;\n    \
         proxy_set_header Connection \"\";\n  }}\n}}\n}}\n",
        nginx_common(dir, "nginx-proxy"),
        nginx_http_common(dir, "nginx-proxy"),
        Target::Nginx.port(),
    )
}

pub(super) fn envoy_bootstrap() -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            name: bench
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: backend}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {BACKEND_PORT}}}}}}}
"#,
        listen = Target::Envoy.port()
    )
}
