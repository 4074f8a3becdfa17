//! The local-mode demo: a 2-node mesh with sample workloads, real traffic, and a short report.
//!
//! Brings up the cluster, applies `examples/demo/`, sends traffic along each path a user cares
//! about, checks what happened (who served, both identities, what crossed the wire) and prints
//! it. Non-interactive runs return whether every check held; interactive runs stay up and say
//! how to poke the mesh. Owns the scenario and the report only; the waypoint part (a canary
//! release routed by a waypoint that meshctl applies) is [`waypoint`]'s, the resilience and L7
//! policy part behind the same waypoint [`resilience`]'s.

mod jwt;
mod resilience;
mod trace;
mod waypoint;

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::client::field;
use crate::wire::{WireCapture, payload_contains, tls_on_port};
use crate::{LocalMesh, MeshOptions};

/// One line of the report.
struct Check {
    title: String,
    result: anyhow::Result<Vec<String>>,
}

pub struct DemoOptions {
    pub interactive: bool,
    pub examples: PathBuf,
    /// API mode: the Kubernetes API double is meshd's source (`cargo xtask demo --api`); the
    /// waypoint is then created in the API instead of by meshctl.
    pub api: bool,
    /// Only the L4 checks (the first part), e.g. for a test that runs them in API mode.
    pub l4_only: bool,
}

impl DemoOptions {
    /// The full demo, directory mode, as `cargo xtask demo` runs it.
    pub fn new(examples: PathBuf) -> Self {
        DemoOptions {
            interactive: false,
            examples,
            api: false,
            l4_only: false,
        }
    }
}

/// Runs the demo; `Ok(true)` only if every check held.
pub fn run(opts: DemoOptions) -> anyhow::Result<bool> {
    if opts.interactive {
        install_stop_handler()?;
    }
    if opts.api {
        println!(
            "Starting a local-mode mesh with a Kubernetes API (the test double) as meshd's source: 2 nodes (network namespaces), meshd --kubernetes, one ztunnel per node…"
        );
    } else {
        println!(
            "Starting a local-mode mesh: 2 nodes (network namespaces), meshd, one ztunnel per node…"
        );
    }
    let mesh = LocalMesh::start(MeshOptions {
        api: opts.api,
        ..MeshOptions::default()
    })?;
    apply_dir(&mesh, &opts.examples)?;
    for (ns, pod) in [
        ("shop", "frontend"),
        ("billing", "payments"),
        ("legacy", "inventory"),
    ] {
        mesh.wait_listening(ns, pod, 8080)?;
    }
    for (ns, pod) in [("shop", "frontend"), ("billing", "payments")] {
        mesh.wait_enrolled(ns, pod)?;
    }
    // Before any waypoint starts: they are started pointing at it.
    let collector = (!opts.l4_only).then(|| trace::start_collector(&mesh));
    let mut checks = l4_checks(&mesh);
    if let Some(collector) = collector {
        // After the L4 checks: meshctl edits the Namespace in the config directory, and the
        // manifests were applied before it (re-applying 00-namespaces.yaml would drop its label).
        checks.extend(waypoint::checks(&mesh));
        // Behind the same waypoint: resilience, L7 policy and the waypoint's metrics.
        checks.extend(resilience::checks(&mesh));
        checks.push(trace::check(&mesh, &collector));
    }
    let ok = report(&mesh, &checks);
    if opts.interactive {
        interact(&mesh)?;
        wait_for_stop();
    }
    Ok(ok)
}

/// The L4 checks, in report order: pod IPs both families, a Service VIP, mesh ↔ plain, STRICT
/// and a DENY policy.
fn l4_checks(mesh: &LocalMesh) -> Vec<Check> {
    vec![
        Check {
            title: "shop/frontend (node-0) → billing/payments pod IP (node-1), IPv4".into(),
            result: cross_node(mesh, false),
        },
        Check {
            title: "shop/frontend (node-0) → billing/payments pod IP (node-1), IPv6".into(),
            result: cross_node(mesh, true),
        },
        Check {
            title: "shop/frontend → Service payments.billing VIP :80".into(),
            result: via_vip(mesh),
        },
        Check {
            title: "shop/frontend (mesh) → legacy/inventory (not in mesh)".into(),
            result: mesh_to_plain(mesh),
        },
        Check {
            title: "legacy/inventory (not in mesh) → shop/frontend (mesh, PERMISSIVE)".into(),
            result: plain_to_mesh(mesh),
        },
        Check {
            title: "legacy/inventory (not in mesh) → billing/payments (mesh, STRICT)".into(),
            result: strict_refuses(mesh),
        },
        Check {
            title: "shop/frontend → billing/payments admin port :9090 (DENY policy)".into(),
            result: deny_blocks(mesh),
        },
    ]
}

/// Applies every YAML file in `dir`, in name order.
pub fn apply_dir(mesh: &LocalMesh, dir: &Path) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("manifest.yaml");
        mesh.apply(name, &text)
            .with_context(|| format!("applying {}", f.display()))?;
    }
    Ok(())
}

fn nonce(tag: &str) -> String {
    format!("{tag}-{:x}", rand_u64())
}

fn rand_u64() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}

fn cross_node(mesh: &LocalMesh, v6: bool) -> anyhow::Result<Vec<String>> {
    let payments = mesh.pod("billing", "payments")?;
    let ip = if v6 {
        payments.ip6.context("no IPv6 on this cluster")?.to_string()
    } else {
        payments.ip4.to_string()
    };
    let addr = if v6 {
        format!("[{ip}]:8080")
    } else {
        format!("{ip}:8080")
    };
    let node0 = mesh.cluster.nodes()[0].clone();
    let wire = WireCapture::start(
        &mesh.cluster,
        &node0.netns,
        &node0.fabric_if,
        &format!("demo-{}", if v6 { "v6" } else { "v4" }),
    )?;
    let secret = nonce("plaintext-that-must-not-appear");
    let who = mesh.who("shop", "frontend", &addr, &secret);
    let segments = wire.finish()?;
    let who = who?;
    anyhow::ensure!(
        who.served_by == "payments",
        "served by {:?}, not payments",
        who.served_by
    );
    anyhow::ensure!(who.message == secret, "reply did not echo our message");
    let entry = mesh.wait_access_log(0, "peer", &who.client_local)?;
    anyhow::ensure!(
        field(&entry, "protocol") == "HBONE",
        "ztunnel did not use HBONE: {entry}"
    );
    anyhow::ensure!(
        tls_on_port(&segments, meshcore::HBONE_PORT),
        "no TLS to port 15008 seen on node-0's link"
    );
    anyhow::ensure!(
        !payload_contains(&segments, secret.as_bytes()),
        "the app's plaintext crossed the node link!"
    );
    let frontend = mesh.pod("shop", "frontend")?;
    let frontend_ip = if v6 {
        frontend.ip6.context("no IPv6 on this cluster")?.to_string()
    } else {
        frontend.ip4.to_string()
    };
    let saw: std::net::SocketAddr = who
        .server_saw_peer
        .parse()
        .with_context(|| format!("payments saw peer {:?}", who.server_saw_peer))?;
    anyhow::ensure!(
        saw.ip().to_canonical().to_string() == frontend_ip,
        "payments saw the connection come from {saw}, not from frontend's {frontend_ip}"
    );
    Ok(vec![
        format!(
            "served by payments at {addr}; the app dialled {} and getpeername() says so",
            who.client_peer
        ),
        format!("payments saw the connection come from frontend's own address {frontend_ip}"),
        format!("client identity  {}", field(&entry, "src.identity")),
        format!("server identity  {}", field(&entry, "dst.identity")),
        format!(
            "node link: {} TCP segments, TLS on :15008, the app's plaintext never seen",
            segments.len()
        ),
    ])
}

fn service_vip(mesh: &LocalMesh) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(mesh.config_dir.join("10-workloads.yaml"))?;
    for doc in crate::render::parse_docs("10-workloads.yaml", &text)? {
        if crate::render::kind(&doc) == "Service"
            && crate::render::str_at(&doc, &["metadata", "name"]) == Some("payments")
        {
            return crate::render::str_at(&doc, &["spec", "clusterIP"])
                .map(str::to_string)
                .context("service has no clusterIP");
        }
    }
    anyhow::bail!("service payments not found in rendered manifests")
}

fn via_vip(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let vip = service_vip(mesh)?;
    let who = mesh.who("shop", "frontend", &format!("{vip}:80"), &nonce("vip"))?;
    anyhow::ensure!(who.served_by == "payments", "served by {:?}", who.served_by);
    let entry = mesh.wait_access_log(0, "peer", &who.client_local)?;
    anyhow::ensure!(
        field(&entry, "protocol") == "HBONE",
        "not carried over HBONE: {entry}"
    );
    Ok(vec![
        format!(
            "{vip}:80 → endpoint {} (targetPort http), served by payments over HBONE",
            field(&entry, "endpoint")
        ),
        format!(
            "the app still sees the VIP: getpeername() = {}",
            who.client_peer
        ),
    ])
}

fn mesh_to_plain(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let inv = mesh.pod("legacy", "inventory")?;
    let who = mesh.who(
        "shop",
        "frontend",
        &format!("{}:8080", inv.ip4),
        &nonce("plain"),
    )?;
    anyhow::ensure!(
        who.served_by == "inventory",
        "served by {:?}",
        who.served_by
    );
    let entry = mesh.wait_access_log(0, "peer", &who.client_local)?;
    anyhow::ensure!(
        field(&entry, "protocol") == "TCP",
        "expected plain TCP passthrough: {entry}"
    );
    Ok(vec![
        "captured by ztunnel and passed through as plain TCP (destination has no mesh identity)"
            .into(),
    ])
}

fn plain_to_mesh(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let front = mesh.pod("shop", "frontend")?;
    let who = mesh.who(
        "legacy",
        "inventory",
        &format!("{}:8080", front.ip4),
        &nonce("in"),
    )?;
    anyhow::ensure!(who.served_by == "frontend", "served by {:?}", who.served_by);
    let entry = mesh.wait_access_log(0, "peer", &who.client_local)?;
    anyhow::ensure!(
        field(&entry, "direction") == "inbound",
        "not seen by the destination ztunnel: {entry}"
    );
    Ok(vec![
        "plaintext accepted by the destination's ztunnel (15006) and delivered".into(),
    ])
}

fn strict_refuses(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let pay = mesh.pod("billing", "payments")?;
    if let Ok(who) = mesh.who(
        "legacy",
        "inventory",
        &format!("{}:8080", pay.ip4),
        &nonce("strict"),
    ) {
        anyhow::bail!("plaintext reached {} despite STRICT mTLS", who.served_by);
    }
    crate::wait_for(
        std::time::Duration::from_secs(10),
        "node-1's ztunnel to log the refusal",
        || {
            Ok(mesh
                .ztunnel_log(1)
                .lines()
                .any(|l| l.contains("PeerAuthentication STRICT")))
        },
    )?;
    // Mesh clients still get in, over mTLS.
    let who = mesh.who(
        "shop",
        "frontend",
        &format!("{}:8080", pay.ip4),
        &nonce("strict-mesh"),
    )?;
    anyhow::ensure!(who.served_by == "payments", "mesh client refused too");
    Ok(vec![
        "refused: PeerAuthentication billing/default is STRICT (examples/demo/20-policies.yaml)"
            .into(),
        "shop/frontend still reaches payments over mTLS".into(),
    ])
}

fn deny_blocks(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let pay = mesh.pod("billing", "payments")?;
    if let Ok(who) = mesh.who(
        "shop",
        "frontend",
        &format!("{}:9090", pay.ip4),
        &nonce("admin"),
    ) {
        anyhow::bail!(
            "the admin port answered ({}) despite the DENY policy",
            who.served_by
        );
    }
    crate::wait_for(
        std::time::Duration::from_secs(10),
        "node-1's ztunnel to log the 401",
        || {
            Ok(mesh
                .ztunnel_log(1)
                .lines()
                .any(|l| l.contains("billing/no-admin-from-frontend") && l.contains("401")))
        },
    )?;
    let who = mesh.who(
        "shop",
        "frontend",
        &format!("{}:8080", pay.ip4),
        &nonce("api"),
    )?;
    anyhow::ensure!(who.served_by == "payments", "the API port must stay open");
    Ok(vec![
        "HBONE CONNECT answered 401 by node-1's ztunnel: AuthorizationPolicy billing/no-admin-from-frontend".into(),
        "the API port :8080 stays open to the frontend".into(),
    ])
}

/// The destination-reported istio_tcp_connections_closed_total lines for billing/payments (the
/// closed counter carries each connection's final response flags, e.g. DENY).
fn metric_lines(mesh: &LocalMesh) -> Vec<String> {
    let Some(node) = mesh.cluster.nodes().get(1).cloned() else {
        return vec![];
    };
    let Ok(out) = mesh.cluster.run(
        &node.netns,
        &[
            "curl",
            "-sf",
            "--max-time",
            "5",
            "http://127.0.0.1:15020/metrics",
        ],
    ) else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_closed_total")
                && l.contains("destination_workload=\"payments\"")
        })
        .map(|l| {
            // Keep the labels a reader cares about; the full set is on :15020/metrics.
            let keep = [
                "reporter",
                "source_workload",
                "source_principal",
                "destination_workload",
                "response_flags",
                "connection_security_policy",
            ];
            let (labels, value) = l.rsplit_once(' ').unwrap_or((l, ""));
            let inner = labels
                .split_once('{')
                .map(|(_, r)| r.trim_end_matches('}'))
                .unwrap_or("");
            let picked: Vec<&str> = inner
                .split("\",")
                .map(|kv| kv.trim_end_matches('"'))
                .filter(|kv| keep.iter().any(|k| kv.starts_with(&format!("{k}="))))
                .collect();
            format!(
                "istio_tcp_connections_closed_total{{{}\"}} {value}",
                picked.join("\",")
            )
        })
        .collect()
}

fn report(mesh: &LocalMesh, checks: &[Check]) -> bool {
    println!();
    println!(
        "Local-mode mesh: {} nodes, trust domain {}, capture {}",
        mesh.cluster.nodes().len(),
        mesh.opts.trust_domain,
        mesh.opts.capture
    );
    println!();
    let mut passed = 0;
    for c in checks {
        match &c.result {
            Ok(lines) => {
                passed += 1;
                println!("  PASS  {}", c.title);
                for l in lines {
                    println!("          {l}");
                }
            }
            Err(e) => println!("  FAIL  {}\n          {e:#}", c.title),
        }
    }
    let metrics = metric_lines(mesh);
    if !metrics.is_empty() {
        println!();
        println!("  Metrics from node-1's ztunnel (http://127.0.0.1:15020/metrics in its netns):");
        for m in metrics {
            println!("    {m}");
        }
    }
    println!();
    println!("{passed} passed, {} failed", checks.len() - passed);
    passed == checks.len()
}

fn interact(mesh: &LocalMesh) -> anyhow::Result<()> {
    let pods = ["shop-frontend", "billing-payments", "legacy-inventory"];
    let pay = mesh.pod("billing", "payments")?;
    println!();
    println!("The mesh stays up until you press Ctrl-C. Things to try:");
    println!("  * Talk from a pod (every pod is a network namespace):");
    for p in mesh
        .cluster
        .pods()
        .iter()
        .filter(|p| pods.contains(&p.name.as_str()))
    {
        println!("      {}: ip netns exec {} <command>", p.name, p.netns.name);
    }
    let front = mesh.pod("shop", "frontend")?;
    println!(
        "      ip netns exec {} {} who --addr {}:8080",
        front.netns.name,
        mesh.bins.echo.display(),
        pay.ip4
    );
    if let Some(api) = mesh.api() {
        println!(
            "  * Edit the live config in the API (meshd watches it): kubectl --kubeconfig {}",
            api.kubeconfig().display()
        );
        println!("      e.g. kubectl label namespace billing istio.io/dataplane-mode-");
    } else {
        println!(
            "  * Edit the live config (meshd applies changes without restarts): {}",
            mesh.config_dir.display()
        );
        println!(
            "      e.g. remove the istio.io/dataplane-mode label from namespace billing in 00-namespaces.yaml"
        );
    }
    if let Err(e) = waypoint::how_to_poke(mesh) {
        println!("  * (the waypoint's part is not up: {e:#})");
    }
    if let Err(e) = resilience::how_to_poke(mesh) {
        println!("  * (the resilience part is not up: {e:#})");
    }
    println!(
        "  * Logs of meshd, each ztunnel and each pod: {}/*.log",
        mesh.dir().display()
    );
    Ok(())
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM request a clean stop instead of killing this process, so the
/// caller tears everything down. A handler, not a blocked mask: children inherit a signal mask,
/// and a mesh process started with SIGTERM blocked could never be stopped gracefully.
pub fn install_stop_handler() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

/// Waits until SIGINT or SIGTERM arrives (after [`install_stop_handler`]).
pub fn wait_for_stop() {
    // An interactive wait, polled: nothing here races on it.
    while !STOP.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("Stopping; removing every namespace, process and rule of this run…");
}
