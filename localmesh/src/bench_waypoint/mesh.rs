//! The through-the-mesh half of the waypoint bench: a client pod calling a Service bound to a
//! waypoint vs a Service selecting the same pod without one (L4 only), in one local-mode mesh;
//! and, in the same rounds, more Services on the same pod and waypoint that differ by one
//! feature: retries off (`attempts: 0`), retries on (a VirtualService retry policy and a route
//! timeout), and an AuthorizationPolicy (ALLOW by principal, method and path, DENY /admin/*),
//! each reported as a ratio to the plain waypoint Service (Istio's default retry policy, no
//! policy). Owns that scenario only; the tools are `load`'s.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use super::load::{
    WRK_SCRIPT, backend_nginx_conf, clock_ticks, cpu_ticks, h2load_fixed, num, peak_rss_kib, rps,
    wait_body, write, wrk,
};
use super::{BACKEND_PORT, CONNECTIONS, Figures, ROUNDS, ROWS, Target};
use crate::bench::median_by;
use crate::{LocalMesh, MeshOptions, wait_for};

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
    /// The feature variants: (what, saturation figures).
    pub features: Vec<(String, Figures)>,
    /// Whether the waypoint answered 403 to `/admin/` on the policy's Service before the runs.
    pub policy_enforced: bool,
}

/// The feature variants: Service name, row name.
const FEATURES: [(&str, &str); 3] = [
    ("web-noretry", "retries off (retries.attempts: 0)"),
    (
        "web-retry",
        "retries on (attempts 3, 5xx/reset/connect-failure, timeouts)",
    ),
    (
        "web-authz",
        "AuthorizationPolicy (ALLOW principal+GET+/*, DENY /admin/*)",
    ),
];

/// The feature Services' VirtualServices and policies.
const FEATURE_CONFIG: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
    metadata: {name: web-noretry, namespace: bench-shop}\nspec:\n  \
    hosts: [web-noretry.bench-shop.svc.cluster.local]\n  http:\n  \
    - route: [{destination: {host: web-noretry.bench-shop.svc.cluster.local}}]\n    \
    retries: {attempts: 0}\n---\n\
    apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
    metadata: {name: web-retry, namespace: bench-shop}\nspec:\n  \
    hosts: [web-retry.bench-shop.svc.cluster.local]\n  http:\n  \
    - route: [{destination: {host: web-retry.bench-shop.svc.cluster.local}}]\n    \
    timeout: 10s\n    \
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"5xx,reset,connect-failure\"}\n---\n\
    apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: web-authz-allow, namespace: bench-shop}\nspec:\n  \
    targetRefs: [{kind: Service, group: \"\", name: web-authz}]\n  action: ALLOW\n  rules:\n  \
    - from: [{source: {principals: [cluster.local/ns/bench-client/sa/default]}}]\n    \
    to: [{operation: {methods: [GET], paths: [\"/*\"]}}]\n---\n\
    apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: web-authz-deny, namespace: bench-shop}\nspec:\n  \
    targetRefs: [{kind: Service, group: \"\", name: web-authz}]\n  action: DENY\n  rules:\n  \
    - to: [{operation: {paths: [\"/admin/*\"]}}]\n";

fn mesh_manifest(dir: &Path) -> String {
    let conf = dir.join("web-backend.conf");
    let err = dir.join("web-backend.err");
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\n\
         metadata: {name: bench-client, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: v1\nkind: Namespace\n\
         metadata: {name: bench-shop, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    let services = [("web", "waypoint"), ("web-l4", "none")]
        .into_iter()
        .chain(FEATURES.iter().map(|(s, _)| (*s, "waypoint")));
    for (name, label) in services {
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
    mesh.apply("30-features.yaml", FEATURE_CONFIG)?;
    let pods = mesh.wait_for_pods("bench-shop", "waypoint", 1)?;
    let wp = pods.first().context("no waypoint pod")?.clone();
    mesh.wait_listening("bench-shop", &wp, 15008)?;
    wait_for(
        Duration::from_secs(30),
        "the client's ztunnel to bind bench-shop/web to its waypoint",
        || {
            let dump = mesh.config_dump(0)?;
            Ok(dump["services"].as_array().is_some_and(|ss| {
                ["web", "web-noretry", "web-retry", "web-authz"]
                    .iter()
                    .all(|name| {
                        let key = format!("bench-shop/{name}");
                        ss.iter()
                            .any(|s| s["key"] == key.as_str() && s["waypoint"]["state"] == "ready")
                    })
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
    let mut urls = vec![vip("web-l4")?, vip("web")?];
    for (name, _) in FEATURES {
        urls.push(vip(name)?);
    }
    for u in &urls {
        wait_body(&mesh.cluster, &client.netns, u)?;
    }
    // The policy is enforced once /admin/ is refused (it may take a moment to arrive); if it
    // never is, the row is still measured and the report says so.
    let authz = urls[urls.len() - 1].clone();
    let policy_enforced = wait_for(
        Duration::from_secs(20),
        "the waypoint to enforce bench-shop/web-authz-deny",
        || {
            let url = format!("{authz}admin/x");
            let out = mesh.cluster.run(
                &client.netns,
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "2",
                    &url,
                ],
            )?;
            Ok(out.stdout == b"403")
        },
    )
    .is_ok();
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
    let mut samples = vec![Vec::new(); urls.len()];
    let mut through = 0.0;
    let mut sent_through = 0.0;
    let mut wp_cpu = (0u64, 0f64);
    // The waypoint's CPU ticks and the requests sent, per URL.
    let mut url_cpu = vec![(0u64, 0f64); urls.len()];
    let wp_pid = listener_pid(&mesh, "bench-shop", &wp, 15008)?;
    for _ in 0..ROUNDS {
        for (i, u) in urls.iter().enumerate() {
            let before = (counted()?, cpu_ticks(wp_pid)?);
            let w = wrk(&mesh.cluster, &client.netns, &None, &script, u, duration)?;
            if i >= 1 {
                through += counted()? - before.0;
                sent_through += num(&w, "requests");
                url_cpu[i].0 += cpu_ticks(wp_pid)?.saturating_sub(before.1);
                url_cpu[i].1 += num(&w, "requests");
            }
            if i == 1 {
                wp_cpu.0 += cpu_ticks(wp_pid)?.saturating_sub(before.1);
                wp_cpu.1 += num(&w, "requests");
            }
            samples[i].push(w);
        }
    }
    // Every request sent to the bound Service must have been the waypoint's, else this
    // measured a bypass.
    anyhow::ensure!(
        through >= sent_through,
        "the waypoint counted {through} requests of the {sent_through} sent to its Services: not bound?"
    );
    let med: Vec<Value> = samples
        .iter()
        .map(|runs| {
            median_by(runs, rps)
                .cloned()
                .context("no waypoint run measured")
        })
        .collect::<anyhow::Result<_>>()?;
    let slowest = rps(&med[0]).min(rps(&med[1]));
    let per_conn = (slowest * 0.5 / f64::from(CONNECTIONS)).max(1.0).floor();
    let mut figures = Vec::new();
    for (i, (w, u)) in med.iter().zip(&urls).take(2).enumerate() {
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
    let features = FEATURES
        .iter()
        .zip(med[2..].iter().zip(&url_cpu[2..]))
        .map(|((_, what), (w, cpu))| {
            let f = Figures {
                target: Target::Waypoint,
                rps: rps(w),
                p50_us: num(w, "p50_us"),
                p99_us: num(w, "p99_us"),
                fixed_p50_us: f64::NAN,
                fixed_p99_us: f64::NAN,
                fixed_rps: f64::NAN,
                cpu_us_per_req: cpu.0 as f64 * 1e6 / clock_ticks() / cpu.1,
                rss_mib: f64::NAN,
            };
            (what.to_string(), f)
        })
        .collect();
    Ok(MeshReport {
        features,
        policy_enforced,
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
    let rows: Vec<(String, &Figures)> = r
        .features
        .iter()
        .map(|(what, f)| {
            let note = if what.starts_with("AuthorizationPolicy") && !r.policy_enforced {
                " [NOT ENFORCED: /admin/ was not refused]"
            } else {
                ""
            };
            (format!("{what}{note}"), f)
        })
        .collect();
    super::print_features(
        "waypoint features through the mesh (same run; plain = Istio's default retry policy, no policy)",
        wp,
        &rows,
    );
}
