//! The demo's L7 part: a canary release of `store/web` behind a waypoint.
//!
//! examples/demo/ declares the namespace, the `web-stable` and `web-canary` Deployments, and
//! the VirtualService + DestinationRule (90/10 split, `x-user-group: beta` → canary). This
//! module runs `meshctl waypoint apply -n store --enroll-namespace --wait` as a user would,
//! sends HTTP requests from shop/frontend, and shows the observed split, the header rule and
//! who each hop saw. Owns this scenario only; the report's layout is the parent's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};

use super::Check;
use crate::LocalMesh;
use crate::client::field;

const NS: &str = "store";
const HOST: &str = "web.store.svc.cluster.local";
const MESHCTL: [&str; 6] = [
    "waypoint",
    "apply",
    "-n",
    NS,
    "--enroll-namespace",
    "--wait",
];
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/store/sa/waypoint";
/// Requests for the split: enough that a 90/10 split shows, few enough to take a second or two.
const SPLIT_REQUESTS: u32 = 400;
const CANARY_SHARE: f64 = 0.10;
/// Allowed distance of the canary count from its mean, in binomial standard deviations: a
/// correct 90/10 split fails this about once in 14,000 runs (exact binomial tails: 7e-5).
const SIGMAS: f64 = 4.0;
const BETA_REQUESTS: u32 = 20;
const DEADLINE: Duration = Duration::from_secs(30);

/// What the set-up established, for the checks after it.
struct Waypoint {
    pod: String,
    vip: SocketAddr,
}

/// The waypoint checks, in report order.
pub(super) fn checks(mesh: &LocalMesh) -> Vec<Check> {
    let mut setup_lines = Vec::new();
    let setup = set_up(mesh, &mut setup_lines);
    let mut checks = vec![Check {
        title: match mesh.api() {
            // API mode: what meshctl does, done in the API (meshctl is local-only).
            Some(_) => format!("in the API: Gateway {NS}/waypoint, namespace {NS} enrolled"),
            None => format!("$ meshctl {}", MESHCTL.join(" ")),
        },
        result: match &setup {
            Ok(_) => Ok(setup_lines),
            Err(e) => Err(anyhow::anyhow!(
                "{e:#}\n          {}",
                setup_lines.join("\n          ")
            )),
        },
    }];
    let wp = match setup {
        Ok(wp) => wp,
        Err(_) => {
            for title in TITLES {
                checks.push(Check {
                    title: title.into(),
                    result: Err(anyhow::anyhow!("not run: the waypoint is not set up")),
                });
            }
            return checks;
        }
    };
    let run = super::nonce("split");
    let sent = get(mesh, &wp, &format!("/{run}"), SPLIT_REQUESTS, &[]);
    let hops = match &sent {
        Ok(_) => hops(mesh, &wp, &run),
        Err(_) => Err(anyhow::anyhow!("not run: the split's requests failed")),
    };
    checks.push(Check {
        title: TITLES[0].into(),
        result: sent.and_then(|pods| split(&pods)),
    });
    checks.push(Check {
        title: TITLES[1].into(),
        result: beta(mesh, &wp),
    });
    checks.push(Check {
        title: TITLES[2].into(),
        result: hops,
    });
    checks
}

const TITLES: [&str; 3] = [
    "shop/frontend → store/web via the waypoint: 90/10 split (VirtualService + DestinationRule)",
    "shop/frontend → store/web with x-user-group: beta → canary (header rule)",
    "each hop's identity: frontend → waypoint → web",
];

/// Runs meshctl, then waits for the waypoint's pod and for the client node's ztunnel to bind
/// store/web to it. `lines` gets what the user would see.
fn set_up(mesh: &LocalMesh, lines: &mut Vec<String>) -> anyhow::Result<Waypoint> {
    for d in ["web-stable", "web-canary"] {
        mesh.wait_for_pods(NS, d, 1)?;
    }
    if mesh.api().is_some() {
        lines.extend(mesh.api_waypoint_apply(NS, "waypoint")?);
        return wait_bound(mesh, lines);
    }
    let out = mesh.meshctl(&MESHCTL)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    lines.extend(
        stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("| {l}")),
    );
    if !out.status.success() {
        bail!(
            "meshctl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    wait_bound(mesh, lines)
}

/// Waits for the waypoint's pod and for the client node's ztunnel to bind store/web to it.
fn wait_bound(mesh: &LocalMesh, lines: &mut Vec<String>) -> anyhow::Result<Waypoint> {
    let pod = mesh
        .wait_for_pods(NS, "waypoint", 1)?
        .into_iter()
        .next()
        .context("no waypoint pod")?;
    mesh.wait_listening(NS, &pod, meshcore::HBONE_PORT)?;
    let mut last = serde_json::Value::Null;
    crate::wait_for(
        DEADLINE,
        "node-0's ztunnel to bind store/web to the waypoint",
        || {
            last = mesh.config_dump(0)?["services"]
                .as_array()
                .and_then(|ss| ss.iter().find(|s| s["key"] == "store/web"))
                .map(|s| s["waypoint"].clone())
                .unwrap_or_default();
            Ok(last["state"] == "ready")
        },
    )
    .with_context(|| format!("last binding seen: {last}"))?;
    let node = mesh.pod(NS, &pod)?.node;
    lines.push(format!(
        "waypoint pod {NS}/{pod} on node-{node}; namespace {NS} labelled istio.io/use-waypoint=waypoint"
    ));
    lines.push(format!(
        "node-0's ztunnel binds Service store/web to Gateway {} ({})",
        last["gateway"].as_str().unwrap_or("?"),
        last["state"].as_str().unwrap_or("?")
    ));
    Ok(Waypoint {
        pod,
        vip: vip(mesh)?,
    })
}

/// Service store/web's IPv4 VIP, port 80, as local mode rendered it.
fn vip(mesh: &LocalMesh) -> anyhow::Result<SocketAddr> {
    let file = "30-web.yaml";
    let text = std::fs::read_to_string(mesh.config_dir.join(file))?;
    for doc in crate::render::parse_docs(file, &text)? {
        if crate::render::kind(&doc) == "Service"
            && crate::render::str_at(&doc, &["metadata", "name"]) == Some("web")
        {
            let ip = crate::render::str_at(&doc, &["spec", "clusterIP"])
                .context("Service store/web has no clusterIP")?;
            return Ok(SocketAddr::new(ip.parse()?, 80));
        }
    }
    bail!("Service store/web not found in the rendered {file}")
}

/// `mesh-echo client` from shop/frontend: `count` GETs of `path` on one keep-alive connection
/// to the VIP, Host web.store.svc.cluster.local. Returns the serving pod of each.
fn get(
    mesh: &LocalMesh,
    wp: &Waypoint,
    path: &str,
    count: u32,
    headers: &[&str],
) -> anyhow::Result<Vec<String>> {
    let echo = mesh.bins.echo.display().to_string();
    let url = format!("http://{HOST}{path}");
    let addr = wp.vip.to_string();
    let count = count.to_string();
    let mut argv = vec![
        echo.as_str(),
        "client",
        &url,
        "--addr",
        &addr,
        "--count",
        &count,
        "--timeout",
        "5s",
    ];
    for h in headers {
        argv.extend(["-H", h]);
    }
    let out = mesh.exec("shop", "frontend", &argv)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "mesh-echo client {url} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let statuses: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once("] StatusCode=").map(|(_, s)| s))
        .collect();
    if let Some(bad) = statuses.iter().find(|s| **s != "200") {
        bail!("a request got status {bad}");
    }
    let pods: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_once(" body] Hostname=").map(|(_, p)| p.to_string()))
        .collect();
    anyhow::ensure!(
        pods.len() == statuses.len() && pods.len().to_string() == count,
        "{} replies naming a pod, {} statuses, for {count} requests",
        pods.len(),
        statuses.len()
    );
    Ok(pods)
}

/// Which Deployment a pod belongs to: its name is `<deployment>-<hash>-<suffix>`.
fn version(pod: &str) -> Option<&'static str> {
    ["stable", "canary"]
        .into_iter()
        .find(|v| pod.starts_with(&format!("web-{v}-")))
}

/// Counts the serving pods of the split's requests by version and checks the canary's share.
fn split(pods: &[String]) -> anyhow::Result<Vec<String>> {
    let mut by_version: BTreeMap<&str, usize> = BTreeMap::new();
    for p in pods {
        let v = version(p).with_context(|| format!("served by {p}, not a web pod"))?;
        *by_version.entry(v).or_default() += 1;
    }
    let n = pods.len() as f64;
    let stable = by_version.get("stable").copied().unwrap_or(0);
    let canary = by_version.get("canary").copied().unwrap_or(0);
    let mean = n * CANARY_SHARE;
    let sigma = (n * CANARY_SHARE * (1.0 - CANARY_SHARE)).sqrt();
    let (lo, hi) = (
        (mean - SIGMAS * sigma).ceil(),
        (mean + SIGMAS * sigma).floor(),
    );
    let line = format!(
        "{} requests: stable {stable} ({:.1}%), canary {canary} ({:.1}%)",
        pods.len(),
        100.0 * stable as f64 / n,
        100.0 * canary as f64 / n
    );
    anyhow::ensure!(
        (lo..=hi).contains(&(canary as f64)),
        "{line}: canary outside {lo}..={hi} (binomial n={n}, p={CANARY_SHARE}, ±{SIGMAS}σ)"
    );
    Ok(vec![
        line,
        format!(
            "canary within {lo}..={hi} (binomial mean {mean}, σ {sigma:.1}, ±{SIGMAS}σ): the 90/10 weights hold"
        ),
    ])
}

fn beta(mesh: &LocalMesh, wp: &Waypoint) -> anyhow::Result<Vec<String>> {
    let path = format!("/{}", super::nonce("beta"));
    let pods = get(mesh, wp, &path, BETA_REQUESTS, &["x-user-group:beta"])?;
    let canary = pods.iter().filter(|p| version(p) == Some("canary")).count();
    anyhow::ensure!(
        canary == pods.len(),
        "only {canary}/{} beta requests reached the canary: {pods:?}",
        pods.len()
    );
    // The waypoint's access log names the route each request took.
    let mut routes = Vec::new();
    crate::wait_for(DEADLINE, "the waypoint to log the beta requests", || {
        routes = logged(&waypoint_log(mesh, &wp.pod))
            .into_iter()
            .filter(|r| r.path == path)
            .map(|r| r.route)
            .collect();
        Ok(routes.len() >= pods.len())
    })?;
    routes.sort();
    routes.dedup();
    Ok(vec![format!(
        "{canary}/{} beta requests → canary; the waypoint's access log: route={}",
        pods.len(),
        routes.join(",")
    )])
}

/// Who each hop saw: the waypoint's access log names the client, the destination ztunnel's
/// metrics name the waypoint (never the client), and the reply names the serving pod.
fn hops(mesh: &LocalMesh, wp: &Waypoint, run: &str) -> anyhow::Result<Vec<String>> {
    // Hop 0: the client's ztunnel sent the connection to the waypoint, not to a web pod.
    let mut found = None;
    let what = format!(
        "node-0's access log to show a connection to {} via the waypoint",
        wp.vip
    );
    crate::wait_for(DEADLINE, &what, || {
        found = mesh.access_log(0).into_iter().find(|e| {
            field(e, "dst") == wp.vip.to_string() && field(e, "waypoint") == "store/waypoint"
        });
        Ok(found.is_some())
    })?;
    let out = found.context("access-log entry vanished")?;
    anyhow::ensure!(
        field(&out, "dst.identity") == WAYPOINT_ID,
        "node-0's ztunnel reached {} instead of the waypoint",
        field(&out, "dst.identity")
    );

    // Hop 1: the waypoint's access log, one line per request.
    let mut seen: Vec<String> = Vec::new();
    let mut routes: BTreeMap<String, usize> = BTreeMap::new();
    crate::wait_for(DEADLINE, "the waypoint to log the split's requests", || {
        let lines: Vec<Logged> = logged(&waypoint_log(mesh, &wp.pod))
            .into_iter()
            .filter(|r| r.path == format!("/{run}"))
            .collect();
        seen = lines.iter().map(|r| r.src.clone()).collect();
        routes.clear();
        for r in &lines {
            *routes.entry(r.route.clone()).or_default() += 1;
        }
        Ok(seen.len() >= SPLIT_REQUESTS as usize)
    })?;
    let from_client = seen.iter().filter(|s| *s == CLIENT_ID).count();
    anyhow::ensure!(
        from_client == seen.len(),
        "the waypoint saw other identities: {:?}",
        seen.iter().find(|s| *s != CLIENT_ID)
    );

    // Hop 2: the destination's ztunnel counts connections by peer identity.
    let pod_of = |v: &str| mesh.pods_of(NS, &format!("web-{v}")).into_iter().next();
    let stable = pod_of("stable").context("no web-stable pod")?;
    let canary = pod_of("canary").context("no web-canary pod")?;
    let node = mesh.pod(NS, &stable)?.node;
    let text = metrics(mesh, node)?;
    let opened = |principal: &str| -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for l in text.lines().filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&format!("source_principal=\"{principal}\""))
                && l.contains(&format!("destination_workload_namespace=\"{NS}\""))
        }) {
            let w = label(l, "destination_workload").unwrap_or("?").to_string();
            let v: f64 = l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *m.entry(w).or_default() += v;
        }
        m
    };
    let from_waypoint = opened(WAYPOINT_ID);
    anyhow::ensure!(
        !from_waypoint.is_empty(),
        "node-{node}'s ztunnel counted no connection from {WAYPOINT_ID} to store's workloads"
    );
    let direct = opened(CLIENT_ID);
    anyhow::ensure!(
        direct.is_empty(),
        "node-{node}'s ztunnel saw the frontend connect to store's pods directly: {direct:?}"
    );
    let per_workload: Vec<String> = from_waypoint
        .iter()
        .map(|(w, n)| format!("{w} ×{n}"))
        .collect();
    Ok(vec![
        format!(
            "frontend's ztunnel (node-0): HBONE to the waypoint, peer identity {}",
            field(&out, "dst.identity")
        ),
        format!(
            "waypoint's access log: {}/{} requests from {CLIENT_ID} (route {})",
            from_client,
            seen.len(),
            routes.keys().cloned().collect::<Vec<_>>().join(",")
        ),
        format!(
            "web's ztunnel (node-{node}) metrics: connections from {WAYPOINT_ID} ({}), none from the frontend",
            per_workload.join(", ")
        ),
        format!("served by {stable} (version stable) and {canary} (version canary)"),
    ])
}

/// The waypoint pod's log, without the terminal colours it may carry.
fn waypoint_log(mesh: &LocalMesh, pod: &str) -> String {
    let path = mesh.cluster.dir().join(format!("{NS}-{pod}-0.log"));
    let raw = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One request as the waypoint logged it.
struct Logged {
    path: String,
    route: String,
    /// The client's identity.
    src: String,
}

/// The requests in a waypoint's log: its JSON access-log lines (Envoy's field names), or, from
/// a waypoint without one, its text `request` lines.
fn logged(log: &str) -> Vec<Logged> {
    log.lines()
        .filter_map(|l| {
            if l.starts_with('{') {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                let s = |k: &str| v[k].as_str().unwrap_or("?").to_string();
                return Some(Logged {
                    path: v["path"].as_str()?.to_string(),
                    route: s("route_name"),
                    src: s("downstream_peer_principal"),
                });
            }
            Some(Logged {
                path: kv(l, "path")?.to_string(),
                route: kv(l, "route").unwrap_or("?").to_string(),
                src: kv(l, "src.identity").unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// `key=value` of a text log line (the value up to the next space).
fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    line[start..].split(' ').next()
}

/// A label's value in a Prometheus sample line.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    line[start..].split('"').next()
}

/// Node `i`'s ztunnel metrics.
fn metrics(mesh: &LocalMesh, i: usize) -> anyhow::Result<String> {
    let node = mesh
        .cluster
        .nodes()
        .get(i)
        .cloned()
        .context("no such node")?;
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
    anyhow::ensure!(out.status.success(), "scraping node-{i}'s ztunnel failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The interactive mode's hints for the waypoint and meshctl.
pub(super) fn how_to_poke(mesh: &LocalMesh) -> anyhow::Result<()> {
    let front = mesh.pod("shop", "frontend")?;
    let vip = vip(mesh)?;
    println!("  * The waypoint of namespace {NS} (it routes store/web's canary), with meshctl:");
    println!(
        "      export MESH_CONFIG_DIR={} MESH_STATUS_DIR={}",
        mesh.config_dir.display(),
        mesh.meshd_out.join("status").display()
    );
    println!("      alias meshctl={}", shown(&mesh.bins.meshctl));
    println!("      meshctl waypoint list");
    println!("      meshctl waypoint status -n {NS}");
    println!(
        "      meshctl waypoint delete -n {NS}   (its traffic then goes direct: Istio's fail-open)"
    );
    println!("    Send it requests (add -H x-user-group:beta for the canary):");
    println!(
        "      ip netns exec {} {} client http://{HOST}/ --addr {vip} --count 20 | grep Hostname",
        front.netns.name,
        shown(&mesh.bins.echo)
    );
    println!(
        "    Change the split live: edit the weights in {}",
        mesh.config_dir.join("40-web-routing.yaml").display()
    );
    if let Some(pod) = mesh.pods_of(NS, "waypoint").first() {
        println!(
            "    The waypoint's access log (one line per request): {}",
            mesh.cluster
                .dir()
                .join(format!("{NS}-{pod}-0.log"))
                .display()
        );
    }
    Ok(())
}

/// A binary's path without the `localmesh/..` detour [`crate::bins::Bins`] may take.
fn shown(path: &std::path::Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}
