//! A Kubernetes API server double for tests: what meshd, `kubectl` and kube-rs's watcher meet
//! instead of a cluster (none can run on this machine). Served over loopback HTTPS with a
//! kubeconfig, so real processes use it unmodified; also driven directly from Rust
//! ([`ApiServer::create`] etc.) with the same semantics as over HTTP.
//!
//! Faithful, not convenient: list/watch with resourceVersion, bookmarks, an expired version
//! answered as HTTP 200 with an in-stream 410 ERROR event, label/field selectors with
//! selector transitions, the status subresource and generation, optimistic concurrency,
//! merge/JSON/strategic patches, a documented subset of server-side apply, ownerReference
//! garbage collection, Lease, TokenReview/TokenRequest, CRD registration and discovery.
//! RBAC for service-account tokens when a test turns it on ([`ApiServer::enforce_rbac`]).
//! Out of scope: admission, protobuf, HTTP/2, the scheduler, kubelet and controllers
//! (local mode plays those). Test hooks (compaction, dropped watches, outages, injected
//! failures, a request log) are the reason to own it.
//!
//! Modules: `server` (HTTPS, auth, hooks, routing), `handlers` (verbs), `store` (objects,
//! events, write rules), `watch` (streams), `selector`, `kinds` (built-in table, CRDs),
//! `defaults` (cluster IPs, initial status), `discovery`, `tls` (certs, kubeconfigs),
//! `hooks`, `meta`, `errors`; `patch`, `apply`, `tokens` are pure helpers, `synth` generates
//! synthetic clusters.

pub mod apply;
mod defaults;
mod discovery;
mod errors;
mod handlers;
mod hooks;
mod kinds;
mod meta;
pub mod patch;
mod rbac;
mod routing;
mod selector;
mod server;
mod store;
pub mod synth;
mod tls;
pub mod tokens;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use errors::ApiErr;
use server::Shared;
use store::Propagation;

#[derive(Debug, thiserror::Error)]
pub enum KubeApiError {
    #[error("starting the API server double: {0}")]
    Start(String),
    /// An API error as the server would answer it (HTTP code, `Status.reason`, message).
    #[error("{code} {reason}: {message}")]
    Status {
        code: u16,
        reason: String,
        message: String,
    },
}

/// How the double behaves.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// How often an idle watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Events kept for watches resuming from an old resourceVersion; older gives 410.
    pub event_window: usize,
    /// ClusterIPs given to Services created without one (IPv4 range, e.g. "10.97.0.0/16").
    pub service_cidr: String,
    /// IPv6 range for dual-stack Services (`ipFamilyPolicy` other than SingleStack).
    pub service_cidr_v6: Option<String>,
    /// Also serve on this address inside this network namespace (e.g. a testbed fabric's, so
    /// processes in node namespaces reach the double as pods reach a real API server); the
    /// serving certificate names the address. [`ApiServer::go_down`] closes it too.
    pub also_serve_in: Option<(crate::Netns, std::net::SocketAddr)>,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            bookmark_interval: Duration::from_secs(1),
            event_window: 10_000,
            service_cidr: "10.97.0.0/16".into(),
            service_cidr_v6: None,
            also_serve_in: None,
        }
    }
}

/// What a test token proves (TokenRequest's and TokenReview's view of it).
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub namespace: String,
    pub service_account: String,
    pub audiences: Vec<String>,
    /// The pod the token is bound to (name, uid): reviews report it, as a bound token's do.
    pub pod: Option<(String, String)>,
    /// The node that pod runs on (reported as `authentication.kubernetes.io/node-name`).
    pub node: Option<String>,
    /// Unix seconds after which reviews answer `authenticated: false`.
    pub expires_at: u64,
}

/// One request as the double saw it (for "who wrote what" assertions).
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The bearer token's user (`admin`, or a service account's name).
    pub user: String,
    /// The pod the bearer token is bound to, if any (tells replicas sharing a service account
    /// apart).
    pub pod: Option<String>,
    /// `fieldManager` of a write, if given.
    pub field_manager: Option<String>,
    pub code: u16,
}

/// Which requests a failure hook applies to.
#[derive(Debug, Clone)]
pub struct RequestMatch {
    /// e.g. "GET"; `None` matches any.
    pub method: Option<String>,
    /// A prefix of the path, e.g. "/apis/security.istio.io/".
    pub path_prefix: String,
}

/// A running double; dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    port: u16,
    tls: tokio_rustls::TlsAcceptor,
    ca_pem: String,
    /// The accept loops (loopback, then [`ApiOptions::also_serve_in`]'s); empty while down.
    accept: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    also_serve_in: Option<(crate::Netns, std::net::SocketAddr)>,
    kubeconfig: PathBuf,
    kubeconfigs: AtomicU64,
    // Last: removed after everything that might write into it.
    dir: tls::PrivateDir,
}

fn start_err(e: impl std::fmt::Display) -> KubeApiError {
    KubeApiError::Start(e.to_string())
}

/// `apiVersion`/`kind` → the kind and version, or the 404 the server would give.
fn kind_of(
    st: &store::State,
    api_version: &str,
    kind: &str,
) -> Result<(kinds::Kind, String), ApiErr> {
    st.kinds
        .by_kind(api_version, kind)
        .map(|(k, v)| (k.clone(), v))
        .ok_or_else(|| {
            ApiErr::new(
                404,
                "NotFound",
                format!("the server doesn't have a resource type for {api_version} {kind}"),
            )
        })
}

impl ApiServer {
    /// Starts serving on 127.0.0.1 (a port of its own) on its own runtime thread; usable from
    /// synchronous and asynchronous code alike.
    pub fn start(opts: ApiOptions) -> Result<ApiServer, KubeApiError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kubeapi")
            .enable_all()
            .build()
            .map_err(start_err)?;
        let extra_ip = opts.also_serve_in.as_ref().map(|(_, addr)| addr.ip());
        let identity = tls::identity(extra_ip).map_err(KubeApiError::Start)?;
        let ips = defaults::ServiceIps::new(&opts.service_cidr, opts.service_cidr_v6.as_deref());
        if ips.v4.is_none() {
            return Err(KubeApiError::Start(format!(
                "service_cidr {:?} is not an IPv4 CIDR with room for hosts",
                opts.service_cidr
            )));
        }
        let mut state = store::State::new(opts.event_window, ips);
        let admin_token = format!("admin-{}", meta::uid());
        let (ns_kind, ns_version) =
            kind_of(&state, "v1", "Namespace").map_err(|e| start_err(e.message))?;
        // The namespaces every cluster has.
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            state
                .create(&ns_kind, &ns_version, None, obj, None)
                .map_err(|e| start_err(e.message))?;
        }
        let opts_also = opts.also_serve_in.clone();
        let shared = Arc::new(Shared::new(opts, state, admin_token.clone()));
        let tls = tokio_rustls::TlsAcceptor::from(identity.server_config);
        let listener = {
            let _guard = runtime.enter();
            server::bind(0).map_err(|e| start_err(format!("binding 127.0.0.1: {e}")))?
        };
        let port = listener.local_addr().map_err(start_err)?.port();
        let mut accept =
            vec![runtime.spawn(server::accept_loop(shared.clone(), listener, tls.clone()))];
        let also_serve_in = opts_also.clone();
        if let Some((netns, addr)) = &also_serve_in {
            let listener = bind_in(netns, *addr)?;
            let _guard = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener).map_err(start_err)?;
            accept.push(runtime.spawn(server::accept_loop(shared.clone(), listener, tls.clone())));
        }
        let dir = tls::PrivateDir::new().map_err(KubeApiError::Start)?;
        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir
            .write(
                "kubeconfig",
                &tls::kubeconfig(&url, &identity.ca_pem, "admin", &admin_token),
            )
            .map_err(KubeApiError::Start)?;
        tracing::info!(%url, kubeconfig = %kubeconfig.display(), "kubeapi double serving");
        Ok(ApiServer {
            shared,
            runtime: Some(runtime),
            port,
            tls,
            ca_pem: identity.ca_pem,
            accept: Mutex::new(accept),
            also_serve_in,
            kubeconfig,
            kubeconfigs: AtomicU64::new(0),
            dir,
        })
    }
    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
    /// A kubeconfig for the admin user (cluster CA included), written in the double's dir.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
    /// `https://ADDR` of [`ApiOptions::also_serve_in`], if set.
    pub fn also_url(&self) -> Option<String> {
        self.also_serve_in
            .as_ref()
            .map(|(_, addr)| format!("https://{addr}"))
    }
    /// A kubeconfig for a given bearer token (e.g. one from [`ApiServer::issue_token`]).
    pub fn kubeconfig_for(&self, token: &str) -> Result<PathBuf, KubeApiError> {
        self.kubeconfig_at(&self.url(), token)
    }
    /// A kubeconfig for a bearer token at `url` (the loopback [`ApiServer::url`] or
    /// [`ApiServer::also_url`]).
    pub fn kubeconfig_at(&self, url: &str, token: &str) -> Result<PathBuf, KubeApiError> {
        if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(KubeApiError::Start(
                "a bearer token must be non-empty printable ASCII".into(),
            ));
        }
        let n = self.kubeconfigs.fetch_add(1, Ordering::SeqCst);
        let text = tls::kubeconfig(url, &self.ca_pem, "token-user", token);
        self.dir
            .write(&format!("kubeconfig-{n}"), &text)
            .map_err(KubeApiError::Start)
    }
    /// PEM of the CA the serving certificate chains to.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }
    /// Creates `obj` (POST semantics: 409 AlreadyExists).
    pub fn create(&self, obj: Value) -> Result<Value, KubeApiError> {
        let mut st = self.shared.lock_state();
        let (kind, version) = kind_of(
            &st,
            obj["apiVersion"].as_str().unwrap_or_default(),
            obj["kind"].as_str().unwrap_or_default(),
        )?;
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_string);
        let ns = if kind.namespaced {
            Some(ns.unwrap_or_else(|| "default".into()))
        } else {
            None
        };
        Ok(st.create(&kind, &version, ns.as_deref(), obj, Some("testbed"))?)
    }
    /// Creates or replaces `obj` without a resourceVersion precondition (spec and status both).
    pub fn put(&self, obj: Value) -> Result<Value, KubeApiError> {
        let mut st = self.shared.lock_state();
        let (kind, version) = kind_of(
            &st,
            obj["apiVersion"].as_str().unwrap_or_default(),
            obj["kind"].as_str().unwrap_or_default(),
        )?;
        Ok(st.put(&kind, &version, obj)?)
    }
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let st = self.shared.lock_state();
        let (k, version) = kind_of(&st, api_version, kind).ok()?;
        let ns = if k.namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        let mut obj = st.get(&k, ns, name)?.clone();
        obj["apiVersion"] = Value::String(k.api_version(&version));
        Some(obj)
    }
    /// Every object of a kind, across namespaces.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let st = self.shared.lock_state();
        let Ok((k, version)) = kind_of(&st, api_version, kind) else {
            return Vec::new();
        };
        st.list(&k, None)
            .into_iter()
            .map(|o| {
                let mut o = o.clone();
                o["apiVersion"] = Value::String(k.api_version(&version));
                o
            })
            .collect()
    }
    /// DELETE semantics (owner-referenced dependents are collected in the background).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), KubeApiError> {
        let mut st = self.shared.lock_state();
        let (k, _) = kind_of(&st, api_version, kind)?;
        let ns = if k.namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        st.delete(&k, ns, name, Propagation::Background, &Value::Null)?;
        Ok(())
    }
    /// Registers the CRDs of every Istio and Gateway API kind meshd reads (names, groups,
    /// versions and scope as upstream's, no schema), as installing Istio's base chart would.
    /// Already registered ones are left as they are.
    pub fn install_mesh_crds(&self) -> Result<(), KubeApiError> {
        let mut st = self.shared.lock_state();
        let (kind, version) = kind_of(&st, "apiextensions.k8s.io/v1", "CustomResourceDefinition")?;
        for crd in kinds::mesh_crds() {
            match st.create(&kind, &version, None, crd, Some("testbed")) {
                Ok(_) => {}
                Err(e) if e.reason == "AlreadyExists" => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
    /// Turns RBAC on (or off) for service-account tokens: from then on their requests need a
    /// Role/ClusterRole binding as on a real cluster, and get the real 403 otherwise. The admin
    /// kubeconfig is never restricted. Off by default (tests that predate RBAC use bare tokens).
    pub fn enforce_rbac(&self, on: bool) {
        self.shared.rbac.store(on, Ordering::SeqCst);
    }
    /// Mints a token (as TokenRequest does) that TokenReview will report per `spec`.
    pub fn issue_token(&self, spec: TokenSpec) -> String {
        self.shared.lock_state().tokens.issue(spec)
    }
    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock_state().rv
    }
    /// Hook: forgets the event history, so any watch resuming from before now gets 410.
    pub fn compact(&self) {
        self.shared.lock_state().compact();
    }
    /// Hook: ends every open watch (`clean`: with a proper chunked end; else the connection is
    /// cut mid-stream).
    pub fn drop_watches(&self, clean: bool) {
        self.shared.drop_tx.send_modify(|(n, c)| {
            *n += 1;
            *c = clean;
        });
    }
    /// Hook: stops listening and cuts every connection (the API is unreachable) until
    /// [`ApiServer::come_back`], which listens again on the same port with the same state.
    pub fn go_down(&self) {
        let tasks = std::mem::take(&mut *self.accept.lock().unwrap_or_else(|p| p.into_inner()));
        for task in &tasks {
            task.abort();
        }
        self.shared.down_tx.send_modify(|n| *n += 1);
        // Down means down when this returns: the listener closed (the aborted task dropped
        // it) and every connection task gone. The runtime's own threads do that promptly.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while (tasks.iter().any(|t| !t.is_finished())
            || self.shared.connections.load(Ordering::SeqCst) > 0)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    pub fn come_back(&self) {
        let mut accept = self.accept.lock().unwrap_or_else(|p| p.into_inner());
        if !accept.is_empty() {
            return;
        }
        let Some(rt) = &self.runtime else { return };
        let _guard = rt.enter();
        // The aborted accept task may still hold the old socket for a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match server::bind(self.port) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "kubeapi double: rebinding");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    tracing::error!(error = %e, port = self.port, "kubeapi double: cannot listen again");
                    return;
                }
            }
        };
        accept.push(rt.spawn(server::accept_loop(
            self.shared.clone(),
            listener,
            self.tls.clone(),
        )));
        if let Some((netns, addr)) = &self.also_serve_in {
            match bind_in(netns, *addr)
                .and_then(|l| tokio::net::TcpListener::from_std(l).map_err(start_err))
            {
                Ok(l) => accept.push(rt.spawn(server::accept_loop(
                    self.shared.clone(),
                    l,
                    self.tls.clone(),
                ))),
                Err(e) => tracing::error!(error = %e, %addr, "kubeapi double: cannot listen again"),
            }
        }
    }
    /// Hook: answers matching requests with `code` (e.g. 500, 503, 429) until cleared.
    pub fn fail_requests(&self, m: RequestMatch, code: u16) {
        self.shared.hooks.fail(m, code);
    }
    /// Hook: holds matching requests (they wait, unanswered) until cleared.
    pub fn hold_requests(&self, m: RequestMatch) {
        self.shared.hooks.hold(m);
    }
    /// Clears every failure and hold hook (held requests then proceed).
    pub fn clear_hooks(&self) {
        self.shared.hooks.clear();
    }
    /// Every request so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.hooks.records()
    }
}

/// A listening socket on `addr` created inside `netns` (it stays there), non-blocking for tokio.
/// Retries briefly: after [`ApiServer::go_down`] the aborted loop may still hold the port.
fn bind_in(
    netns: &crate::Netns,
    addr: std::net::SocketAddr,
) -> Result<std::net::TcpListener, KubeApiError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let bound = netns
            .enter(move || -> std::io::Result<std::net::TcpListener> {
                // std sets SO_REUSEADDR on listeners.
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .map_err(start_err)?;
        match bound {
            Ok(l) => return Ok(l),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, %addr, "kubeapi double: binding in a netns");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(start_err(format!("binding {addr} in {}: {e}", netns.name))),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Allowed inside an async context too (a plain drop of a Runtime is not).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
