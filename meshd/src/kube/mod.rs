//! Kubernetes mode: meshd reads the cluster's API instead of a directory, and writes back what
//! it renders (waypoint objects, status), as the leader of its replicas.
//!
//! Owns the connection settings ([`KubeSettings`], [`client`]) and the table of kinds meshd
//! reads ([`kinds`]). The pieces: `source` (reflectors → the same `ResourceSet` channel the
//! directory source publishes), `leader` (Lease election), `writer` (waypoint objects and
//! status, leader only), `identity` (callers' service-account tokens through TokenReview) and
//! `ca_secret` (the CA root in a Secret, the root certificate in a ConfigMap). Translation,
//! the config stream and the CA itself do not know which source is in use.

pub mod ca_files;
pub mod ca_secret;
pub mod identity;
pub mod identity_cache;
pub mod identity_jwt;
pub mod identity_review;
pub mod kinds;
pub mod leader;
pub mod source;
pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

/// Istio's audience for the tokens ztunnel presents to its CA is `istio-ca`; ours is our own,
/// so a token minted for Istio's control plane is not accepted by meshd, nor the reverse.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "mesh-ca";
/// The Lease the leader holds (in meshd's namespace).
pub const LEASE_NAME: &str = "meshd-leader";
/// The field manager meshd writes with (server-side apply and updates).
pub const FIELD_MANAGER: &str = "meshd";
/// The ConfigMap (in every namespace meshd's clients read it from) holding the mesh root.
pub const ROOT_CONFIGMAP: &str = "mesh-root-cert";
/// The Secret in meshd's namespace holding the CA (created if absent).
pub const CA_SECRET: &str = "mesh-ca";

/// client-go's leader-election timings (leaseDuration, renewDeadline, retryPeriod).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long a lease is valid after its last renewal: a dead leader is replaced after it.
    pub duration: Duration,
    /// A leader that could not renew within this stops acting as leader (before `duration`
    /// runs out, so two never act at once).
    pub renew_deadline: Duration,
    /// How often a leader renews and a candidate retries.
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// How meshd talks to the Kubernetes API (`meshd run --kubernetes`).
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// A kubeconfig file; `None` infers (`$KUBECONFIG`, `~/.kube/config`, in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// meshd's own namespace: its Lease, CA Secret and root ConfigMap live there.
    pub namespace: String,
    /// This replica's name in the Lease (the pod name in a cluster).
    pub identity: String,
    pub lease: LeaseTimings,
    /// The audience callers' tokens must be minted for.
    pub token_audience: String,
    /// ztunnel's service account ("namespace", "name"): its tokens prove the node the ztunnel
    /// pod runs on; any other service account proves only itself (a waypoint).
    pub ztunnel_service_account: (String, String),
    /// How long the source waits for more changes before publishing (a burst is one rebuild).
    pub debounce: Duration,
    /// Istio's root namespace (meshd's `--root-namespace`; set from it by `daemon`).
    pub root_namespace: String,
}

impl KubeSettings {
    /// Defaults for a replica named `identity` in `namespace`.
    pub fn new(namespace: &str, identity: &str) -> Self {
        KubeSettings {
            kubeconfig: None,
            namespace: namespace.to_string(),
            identity: identity.to_string(),
            lease: LeaseTimings::default(),
            token_audience: DEFAULT_TOKEN_AUDIENCE.to_string(),
            ztunnel_service_account: (namespace.to_string(), "ztunnel".to_string()),
            debounce: Duration::from_millis(100),
            root_namespace: meshcore::policy::DEFAULT_ROOT_NAMESPACE.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error(
        "cannot find Kubernetes credentials (no --kubeconfig, $KUBECONFIG, ~/.kube/config or in-cluster service account): {0}"
    )]
    Infer(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

/// A client for the API `settings` name.
pub async fn client(settings: &KubeSettings) -> Result<kube::Client, KubeError> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let bad = |message: String| KubeError::Kubeconfig {
                path: path.display().to_string(),
                message,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| bad(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Infer(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(KubeError::from)
}
