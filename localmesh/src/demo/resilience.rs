//! The demo's resilience and L7 policy part, behind the store namespace's waypoint (set up by
//! [`super::waypoint`]): a failing `orders` pod is ejected and comes back (outlierDetection), a
//! retry rule hides the `flaky` backend, a route timeout cuts `slow`, a DENY policy on the
//! waypoint answers 403, and a JWT rule on `secure` admits a valid token and refuses a forged
//! one. The backends are `mesh-echo serve`, broken and healed over its `/control` endpoint.
//! Manifests: examples/demo/50-resilience.yaml and 60-l7-policy.yaml; the JWT policies are
//! written here at run time (fresh key, see [`super::jwt`]). Last, the waypoint's
//! `istio_requests_total` lines for these Services, by code and response flag. Owns these
//! scenarios only; the report's layout is the parent's.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::Check;
use super::jwt::Signer;
use crate::LocalMesh;

pub(super) const NS: &str = "store";
const DEADLINE: Duration = Duration::from_secs(30);
const ISSUER: &str = "https://issuer.demo.local";

/// The resilience and policy checks, in report order.
pub(super) fn checks(mesh: &LocalMesh) -> Vec<Check> {
    let ready = set_up(mesh);
    let run = |f: fn(&LocalMesh) -> anyhow::Result<Vec<String>>| match &ready {
        Ok(()) => f(mesh),
        Err(e) => Err(anyhow::anyhow!("not run: {e:#}")),
    };
    vec![
        Check {
            title: "store/orders: a pod failing with 503 is ejected (outlierDetection), then comes back"
                .into(),
            result: run(ejection),
        },
        Check {
            title: "store/flaky: a retry rule (attempts 3, retryOn 5xx) hides a backend failing every other request"
                .into(),
            result: run(retries),
        },
        Check {
            title: "store/slow: a 1s route timeout cuts a request the backend holds for 3s".into(),
            result: run(timeout),
        },
        Check {
            title: "store/*: DENY AuthorizationPolicy on the waypoint (paths /admin/*) → 403".into(),
            result: run(deny),
        },
        Check {
            title: "store/secure: RequestAuthentication + ALLOW requestPrincipals: valid JWT in, forged JWT out"
                .into(),
            result: run(jwt),
        },
        Check {
            title: "the waypoint's istio_requests_total for these requests, by response_code and response_flags"
                .into(),
            result: run(metrics),
        },
    ]
}

/// The Services of this part, their Deployments and pod counts.
const BACKENDS: [(&str, usize); 4] = [("orders", 2), ("flaky", 1), ("slow", 1), ("secure", 1)];

/// Waits for every backend pod to listen and for node-0's ztunnel to send each Service to the
/// waypoint.
fn set_up(mesh: &LocalMesh) -> anyhow::Result<()> {
    for (name, n) in BACKENDS {
        for pod in mesh.wait_for_pods(NS, name, n)? {
            mesh.wait_listening(NS, &pod, 8080)?;
        }
    }
    for (name, _) in BACKENDS {
        let key = format!("{NS}/{name}");
        crate::wait_for(
            DEADLINE,
            &format!("node-0's ztunnel to bind {key} to the waypoint"),
            || {
                Ok(mesh.config_dump(0)?["services"]
                    .as_array()
                    .is_some_and(|ss| {
                        ss.iter()
                            .any(|s| s["key"] == key && s["waypoint"]["state"] == "ready")
                    }))
            },
        )?;
    }
    Ok(())
}

/// One answer as the client saw it: status (0: none) and the serving pod (echo replies only).
#[derive(Debug)]
pub(super) struct Reply {
    pub code: u16,
    pub pod: Option<String>,
    pub body: String,
}

/// curl from shop/frontend: one GET per path, in order, on a keep-alive connection to the
/// Service's VIP (Host `<service>.store.svc.cluster.local`).
pub(super) fn get(
    mesh: &LocalMesh,
    service: &str,
    paths: &[String],
    headers: &[String],
) -> anyhow::Result<Vec<Reply>> {
    let vip = vip(mesh, service)?;
    let host = format!("{service}.{NS}.svc.cluster.local");
    let resolve = format!("{host}:80:{}", vip.ip());
    let mut argv: Vec<String> = [
        "curl",
        "-s",
        "--max-time",
        "10",
        "--resolve",
        &resolve,
        "-w",
        "\n@@%{http_code}@@\n",
    ]
    .map(str::to_owned)
    .to_vec();
    for h in headers {
        argv.extend(["-H".to_owned(), h.clone()]);
    }
    argv.extend(paths.iter().map(|p| format!("http://{host}{p}")));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = mesh.exec("shop", "frontend", &argv)?;
    // curl goes on after a failed transfer (status 000) and exits with the last error: read
    // every answer from stdout instead.
    let text = String::from_utf8_lossy(&out.stdout);
    let parts: Vec<&str> = text.split("@@").collect();
    let replies: Vec<Reply> = parts
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| {
            let body = c[0].trim().to_owned();
            let pod = serde_json::from_str::<echo_json::Reply>(&body)
                .ok()
                .map(|r| r.pod);
            Reply {
                code: c[1].parse().unwrap_or(0),
                pod,
                body,
            }
        })
        .collect();
    anyhow::ensure!(
        replies.len() == paths.len(),
        "curl gave {} answers for {} requests: {}",
        replies.len(),
        paths.len(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(replies)
}

/// The field of mesh-echo's JSON reply this part reads.
mod echo_json {
    #[derive(serde::Deserialize)]
    pub struct Reply {
        pub pod: String,
    }
}

/// `n` distinct paths under `tag` (so the waypoint's access log tells the runs apart).
fn paths(tag: &str, n: usize) -> Vec<String> {
    let run = super::nonce(tag);
    (0..n).map(|i| format!("/{run}/{i}")).collect()
}

/// A Service's VIP, port 80, as local mode rendered it.
fn vip(mesh: &LocalMesh, service: &str) -> anyhow::Result<SocketAddr> {
    for file in ["50-resilience.yaml", "60-l7-policy.yaml"] {
        let Ok(text) = std::fs::read_to_string(mesh.config_dir.join(file)) else {
            continue;
        };
        for doc in crate::render::parse_docs(file, &text)? {
            if crate::render::kind(&doc) == "Service"
                && crate::render::str_at(&doc, &["metadata", "name"]) == Some(service)
            {
                let ip = crate::render::str_at(&doc, &["spec", "clusterIP"])
                    .with_context(|| format!("Service {NS}/{service} has no clusterIP"))?;
                return Ok(SocketAddr::new(ip.parse()?, 80));
            }
        }
    }
    bail!("Service {NS}/{service} not found in the rendered manifests")
}

/// `POST /control` on a pod (from inside it); `None` body: `GET`. Returns the pod's report.
fn control(mesh: &LocalMesh, pod: &str, body: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let url = "http://127.0.0.1:8080/control";
    let mut argv = vec!["curl", "-sf", "--max-time", "5"];
    if let Some(b) = body {
        argv.extend(["-X", "POST", "-d", b]);
    }
    argv.push(url);
    let out = mesh.exec(NS, pod, &argv)?;
    anyhow::ensure!(
        out.status.success(),
        "{url} in {NS}/{pod} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("{url} in {NS}/{pod}"))
}

/// Requests a pod has answered so far (its `/control` count).
fn served(mesh: &LocalMesh, pod: &str) -> anyhow::Result<u64> {
    control(mesh, pod, None)?["requests"]
        .as_u64()
        .context("no request count in /control")
}

fn ejection(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let mut pods = mesh.pods_of(NS, "orders");
    pods.sort();
    let [bad, good] = &pods[..] else {
        bail!("expected 2 orders pods, found {pods:?}");
    };
    control(mesh, bad, Some(r#"{"fail": 503}"#))?;
    let result = eject_and_return(mesh, bad, good);
    // Heal it whatever happened, so a rerun or the interactive mode starts clean.
    let healed = control(mesh, bad, Some(r#"{"fail": "ok"}"#));
    let lines = result?;
    healed?;
    Ok(lines)
}

fn eject_and_return(mesh: &LocalMesh, bad: &str, good: &str) -> anyhow::Result<Vec<String>> {
    // Ejected: three rounds of requests in a row that all reach the healthy pod while the
    // failing one is asked nothing. Without outlier detection about half of every round goes
    // to the failing pod (30 in a row by chance: 1 in 10^9).
    let mut seen_503 = 0;
    let mut sent = 0;
    let mut streak = 0;
    crate::wait_for(
        DEADLINE,
        &format!("{bad} to be ejected (3 rounds of 10 requests in a row all served by {good})"),
        || {
            let before = served(mesh, bad)?;
            let replies = get(mesh, "orders", &paths("eject", 10), &[])?;
            sent += replies.len();
            seen_503 += replies.iter().filter(|r| r.code == 503).count();
            let all_good = replies
                .iter()
                .all(|r| r.code == 200 && r.pod.as_deref() == Some(good));
            if all_good && served(mesh, bad)? == before {
                streak += 1;
            } else {
                streak = 0;
            }
            Ok(streak == 3)
        },
    )?;
    let mut lines = vec![
        format!("POST /control {{\"fail\": 503}} to {bad}"),
        format!(
            "{sent} requests: {seen_503} answered 503 before the ejection, then 3 rounds of 10 all served by {good}, none reaching {bad}"
        ),
    ];
    control(mesh, bad, Some(r#"{"fail": "ok"}"#))?;
    let healed = Instant::now();
    crate::wait_for(
        DEADLINE,
        &format!("{bad} to come back after baseEjectionTime"),
        || {
            let replies = get(mesh, "orders", &paths("return", 10), &[])?;
            Ok(replies
                .iter()
                .any(|r| r.code == 200 && r.pod.as_deref() == Some(bad)))
        },
    )?;
    lines.push(format!(
        "POST /control {{\"fail\": \"ok\"}}: the waypoint sends {bad} requests again {:.1}s later, on its own (baseEjectionTime 5s)",
        healed.elapsed().as_secs_f64(),
    ));
    Ok(lines)
}

fn retries(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let pod = mesh
        .pods_of(NS, "flaky")
        .into_iter()
        .next()
        .context("no flaky pod")?;
    const N: usize = 20;
    let before = served(mesh, &pod)?;
    let replies = get(mesh, "flaky", &paths("flaky", N), &[])?;
    let attempts = served(mesh, &pod)? - before;
    let ok = replies.iter().filter(|r| r.code == 200).count();
    let failed: Vec<u16> = replies
        .iter()
        .map(|r| r.code)
        .filter(|c| *c != 200)
        .collect();
    anyhow::ensure!(
        ok == N,
        "{ok}/{N} answered 200, the others {failed:?}; the backend saw {attempts} attempts"
    );
    anyhow::ensure!(
        attempts > N as u64,
        "{N}/{N} answered 200 but the backend saw only {attempts} attempts: was it failing at all?"
    );
    Ok(vec![
        format!("{ok}/{N} requests answered 200 to the client"),
        format!(
            "the backend ({pod}, --fail 500 --fail-every 2) saw {attempts} attempts: {} were retries of a 500",
            attempts - N as u64
        ),
    ])
}

fn timeout(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let slow = get(
        mesh,
        "slow",
        &paths("slow", 1),
        &["x-echo-delay: 3s".into()],
    )?;
    let fast = get(mesh, "slow", &paths("fast", 1), &[])?;
    let (s, f) = (&slow[0], &fast[0]);
    anyhow::ensure!(
        s.code == 504 && s.body.contains("upstream request timeout"),
        "the held request got {} {:?}, not 504 upstream request timeout",
        s.code,
        s.body.lines().next().unwrap_or("")
    );
    anyhow::ensure!(f.code == 200, "a quick request got {}", f.code);
    Ok(vec![
        format!(
            "held 3s by the backend (x-echo-delay: 3s) → {} {}",
            s.code, s.body
        ),
        format!("a quick request → {}", f.code),
    ])
}

fn deny(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let mut last = Vec::new();
    crate::wait_for(DEADLINE, "the waypoint to enforce store/no-admin", || {
        last = get(mesh, "slow", &["/admin/users".to_owned()], &[])?;
        Ok(last[0].code == 403)
    })
    .with_context(|| {
        format!(
            "last answer to /admin/users: {}",
            last.first().map(|r| r.code).unwrap_or(0)
        )
    })?;
    let denied = &last[0];
    anyhow::ensure!(
        denied.body == "RBAC: access denied",
        "403 with body {:?}, not Istio's \"RBAC: access denied\"",
        denied.body
    );
    let other = get(mesh, "orders", &["/admin/orders".to_owned()], &[])?;
    anyhow::ensure!(
        other[0].code == 403,
        "/admin/ on orders got {}",
        other[0].code
    );
    let open = get(mesh, "slow", &["/catalog".to_owned()], &[])?;
    anyhow::ensure!(open[0].code == 200, "/catalog got {}", open[0].code);
    Ok(vec![
        format!(
            "GET /admin/users on slow → 403 {}; on orders → {}",
            denied.body, other[0].code
        ),
        "GET /catalog → 200 (only /admin/* is denied)".into(),
    ])
}

fn jwt(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let signer = Signer::new()?;
    let forger = Signer::new()?;
    mesh.apply("70-jwt.yaml", &jwt_policies(&signer.jwks()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": "alice", "aud": "store", "iat": now, "exp": now + 3600,
    });
    let valid = signer.token(&claims)?;
    let forged = forger.token(&claims)?;
    let bearer = |t: &str| vec![format!("authorization: Bearer {t}")];
    let path = vec!["/orders".to_owned()];
    let mut none = Vec::new();
    crate::wait_for(
        DEADLINE,
        "the waypoint to require a JWT on store/secure",
        || {
            none = get(mesh, "secure", &path, &[])?;
            Ok(none[0].code == 403)
        },
    )
    .with_context(|| {
        format!(
            "a request without a token still got {}",
            none.first().map(|r| r.code).unwrap_or(0)
        )
    })?;
    let ok = get(mesh, "secure", &path, &bearer(&valid))?;
    anyhow::ensure!(
        ok[0].code == 200,
        "the valid token got {}: {}",
        ok[0].code,
        ok[0].body
    );
    let bad = get(mesh, "secure", &path, &bearer(&forged))?;
    anyhow::ensure!(
        bad[0].code == 401,
        "the forged token got {}, not 401: {}",
        bad[0].code,
        bad[0].body
    );
    Ok(vec![
        format!("fresh ES256 key; RequestAuthentication issuer {ISSUER} with its public JWKS"),
        format!("valid token (sub alice) → {}", ok[0].code),
        format!(
            "same claims signed with another key → {} {}",
            bad[0].code, bad[0].body
        ),
        format!("no token → {} {}", none[0].code, none[0].body),
    ])
}

/// RequestAuthentication (inline JWKS) and an ALLOW policy needing a principal of its issuer,
/// both attached to Service store/secure.
fn jwt_policies(jwks: &str) -> String {
    let target = "targetRefs: [{kind: Service, group: \"\", name: secure}]";
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
         metadata: {{name: secure-jwt, namespace: {NS}}}\nspec:\n  {target}\n  jwtRules:\n  \
         - issuer: {ISSUER}\n    audiences: [store]\n    jwks: '{jwks}'\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: secure-needs-jwt, namespace: {NS}}}\nspec:\n  {target}\n  \
         action: ALLOW\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"{ISSUER}/*\"]\n"
    )
}

/// The waypoint's `istio_requests_total` for this part's Services, trimmed to the labels that
/// tell the story; the timeout's 504 must be there with flag UT.
fn metrics(mesh: &LocalMesh) -> anyhow::Result<Vec<String>> {
    let wp = mesh
        .pods_of(NS, "waypoint")
        .into_iter()
        .next()
        .context("no waypoint pod")?;
    let url = format!("http://{}:15020/metrics", mesh.pod(NS, &wp)?.ip4);
    let out = mesh.exec(NS, &wp, &["curl", "-sf", "--max-time", "5", &url])?;
    anyhow::ensure!(out.status.success(), "scraping {url} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let services: Vec<String> = BACKENDS
        .iter()
        .map(|(s, _)| format!("destination_service_name=\"{s}\""))
        .collect();
    let keep = [
        "destination_service_name",
        "destination_workload",
        "response_code",
        "response_flags",
    ];
    let mut lines = Vec::new();
    let mut timeout_seen = false;
    for l in text.lines().filter(|l| {
        l.starts_with("istio_requests_total{") && services.iter().any(|s| l.contains(s.as_str()))
    }) {
        let value = l.rsplit(' ').next().unwrap_or("");
        let picked: Vec<String> = keep
            .iter()
            .map(|k| format!("{k}=\"{}\"", label(l, k).unwrap_or("?")))
            .collect();
        timeout_seen |= label(l, "destination_service_name") == Some("slow")
            && label(l, "response_code") == Some("504")
            && label(l, "response_flags") == Some("UT");
        lines.push(format!(
            "istio_requests_total{{{}}} {value}",
            picked.join(",")
        ));
    }
    anyhow::ensure!(
        timeout_seen,
        "no istio_requests_total line for slow with response_code 504 and response_flags UT among:\n          {}",
        lines.join("\n          ")
    );
    lines.sort();
    lines.insert(0, format!("from {url} (waypoint pod {NS}/{wp}):"));
    Ok(lines)
}

/// A label's value in a Prometheus sample line.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    line[start..].split('"').next()
}

/// The interactive mode's hints for breaking and healing a backend.
pub(super) fn how_to_poke(mesh: &LocalMesh) -> anyhow::Result<()> {
    let pod = mesh
        .pods_of(NS, "orders")
        .into_iter()
        .next()
        .context("no orders pod")?;
    let netns = mesh.pod(NS, &pod)?.netns.name;
    let vip = vip(mesh, "orders")?;
    println!("  * Break a backend and watch the waypoint eject it (store/orders, 2 pods):");
    println!(
        "      ip netns exec {netns} curl -X POST -d '{{\"fail\": 503}}' http://127.0.0.1:8080/control"
    );
    println!("      (then {{\"fail\": \"ok\"}} to heal it; GET /control shows its request count)");
    let front = mesh.pod("shop", "frontend")?;
    println!(
        "      ip netns exec {} curl -s --resolve orders.{NS}.svc.cluster.local:80:{} http://orders.{NS}.svc.cluster.local/ | grep pod",
        front.netns.name,
        vip.ip()
    );
    Ok(())
}
