//! Callers' Kubernetes service-account tokens, verified with TokenReview: a ztunnel's token
//! proves the node its pod runs on (`Principal::Node`), any other pod's proves its service
//! account (`Principal::ServiceAccount`, a waypoint). Runs as a tower layer before the gRPC
//! services, because a review is a network call; it sets [`crate::authn::Authenticated`],
//! which the (synchronous) interceptor then accepts.
//!
//! (Stub: filled in by the identity work; see /work/helpers/s5/design.md.)

use std::sync::Arc;

use tokio::sync::watch;

use super::KubeSettings;
use crate::translate::VersionedView;

/// Reviews tokens against the API (with a bounded cache).
#[derive(Clone)]
pub struct TokenReviewer {
    _client: kube::Client,
}

impl TokenReviewer {
    pub fn new(
        client: kube::Client,
        settings: &KubeSettings,
        views: watch::Receiver<Arc<VersionedView>>,
    ) -> Self {
        let _ = (settings, views);
        TokenReviewer { _client: client }
    }
}

/// The tower layer meshd's gRPC server runs under: with a reviewer, bearer tokens that are not
/// meshd's own (`node:`/`sa:`) are reviewed; without one it passes requests through.
#[derive(Clone, Default)]
pub struct KubeAuthLayer {
    pub reviewer: Option<TokenReviewer>,
}

impl<S> tower::Layer<S> for KubeAuthLayer {
    type Service = S;
    fn layer(&self, inner: S) -> S {
        inner
    }
}
