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
//! Out of scope: admission, RBAC, protobuf, HTTP/2, the scheduler, kubelet and controllers
//! (local mode plays those). Test hooks (compaction, dropped watches, outages, injected
//! failures, a request log) are the reason to own it.
//!
//! (Skeleton: the public API below is the contract; see /work/helpers/s5/design.md.)

pub mod apply;
pub mod patch;
pub mod synth;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

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
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            bookmark_interval: Duration::from_secs(1),
            event_window: 10_000,
            service_cidr: "10.97.0.0/16".into(),
            service_cidr_v6: None,
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
    _private: (),
}

impl ApiServer {
    /// Starts serving on 127.0.0.1 (a port of its own) on its own runtime thread; usable from
    /// synchronous and asynchronous code alike.
    pub fn start(opts: ApiOptions) -> Result<ApiServer, KubeApiError> {
        let _ = opts;
        Err(KubeApiError::Start("not built yet".into()))
    }
    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        unimplemented!()
    }
    /// A kubeconfig for the admin user (cluster CA included), written in the double's dir.
    pub fn kubeconfig(&self) -> &Path {
        unimplemented!()
    }
    /// A kubeconfig for a given bearer token (e.g. one from [`ApiServer::issue_token`]).
    pub fn kubeconfig_for(&self, token: &str) -> Result<PathBuf, KubeApiError> {
        let _ = token;
        unimplemented!()
    }
    /// PEM of the CA the serving certificate chains to.
    pub fn ca_pem(&self) -> String {
        unimplemented!()
    }
    /// Creates `obj` (POST semantics: 409 AlreadyExists).
    pub fn create(&self, obj: Value) -> Result<Value, KubeApiError> {
        let _ = obj;
        unimplemented!()
    }
    /// Creates or replaces `obj` without a resourceVersion precondition (spec and status both).
    pub fn put(&self, obj: Value) -> Result<Value, KubeApiError> {
        let _ = obj;
        unimplemented!()
    }
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let _ = (api_version, kind, namespace, name);
        unimplemented!()
    }
    /// Every object of a kind, across namespaces.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let _ = (api_version, kind);
        unimplemented!()
    }
    /// DELETE semantics (owner-referenced dependents are collected in the background).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), KubeApiError> {
        let _ = (api_version, kind, namespace, name);
        unimplemented!()
    }
    /// Registers the CRDs of every Istio and Gateway API kind meshd reads (names, groups,
    /// versions and scope as upstream's, no schema), as installing Istio's base chart would.
    pub fn install_mesh_crds(&self) -> Result<(), KubeApiError> {
        unimplemented!()
    }
    /// Mints a token (as TokenRequest does) that TokenReview will report per `spec`.
    pub fn issue_token(&self, spec: TokenSpec) -> String {
        let _ = spec;
        unimplemented!()
    }
    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        unimplemented!()
    }
    /// Hook: forgets the event history, so any watch resuming from before now gets 410.
    pub fn compact(&self) {}
    /// Hook: ends every open watch (`clean`: with a proper chunked end; else the connection is
    /// cut mid-stream).
    pub fn drop_watches(&self, clean: bool) {
        let _ = clean;
    }
    /// Hook: stops listening and cuts every connection (the API is unreachable) until
    /// [`ApiServer::come_back`], which listens again on the same port with the same state.
    pub fn go_down(&self) {}
    pub fn come_back(&self) {}
    /// Hook: answers matching requests with `code` (e.g. 500, 503, 429) until cleared.
    pub fn fail_requests(&self, m: RequestMatch, code: u16) {
        let _ = (m, code);
    }
    /// Hook: holds matching requests (they wait, unanswered) until cleared.
    pub fn hold_requests(&self, m: RequestMatch) {
        let _ = m;
    }
    /// Clears every failure and hold hook (held requests then proceed).
    pub fn clear_hooks(&self) {}
    /// Every request so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        unimplemented!()
    }
}
