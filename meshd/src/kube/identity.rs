//! Callers' Kubernetes service-account tokens, verified with TokenReview: a ztunnel's token
//! proves the node its pod runs on (`Principal::Node`), any other pod's proves its service
//! account (`Principal::ServiceAccount`, a waypoint). Runs as a tower layer in front of the
//! gRPC services, because a review is a network call; it sets [`crate::authn::Authenticated`]
//! in the request's extensions (server-side only: nothing a client sends can put it there),
//! which the synchronous interceptor then accepts.
//!
//! Owns which requests are reviewed (a bearer token that is not meshd's own `node:`/`sa:`
//! token, which the interceptor keeps verifying) and the gRPC answer to a refusal
//! (UNAUTHENTICATED, saying what to fix) or to an API that cannot answer (UNAVAILABLE, so the
//! caller retries). What a review means is `identity_review`'s; caching and rate limits are
//! `identity_cache`'s; what a principal may do is each service's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use meshcore::admission::Throttle;
use tokio::sync::watch;
use tonic::codegen::http;
use tracing::{debug, warn};

use super::KubeSettings;
use super::identity_cache::{Limits, Reviews};
use super::identity_review::{Policy, Verdict};
use crate::authn::Authenticated;
use crate::translate::VersionedView;

/// Reviews tokens against the API (with a bounded cache). Clone is cheap.
#[derive(Clone)]
pub struct TokenReviewer {
    reviews: Reviews,
    /// "Cannot verify" lines, at most one per period: anyone can cause them at will.
    unavailable_log: Arc<Throttle>,
}

/// At most one log line per this interval about tokens meshd could not verify.
const UNAVAILABLE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl TokenReviewer {
    /// `_views` is unused: the node a ztunnel runs on is read from its pod in the API, which
    /// (unlike the mesh view) includes pods of namespaces outside the mesh, as ztunnel's is.
    pub fn new(
        client: kube::Client,
        settings: &KubeSettings,
        _views: watch::Receiver<Arc<VersionedView>>,
    ) -> Self {
        let policy = Policy {
            audience: settings.token_audience.clone(),
            ztunnel: settings.ztunnel_service_account.clone(),
        };
        TokenReviewer {
            reviews: Reviews::new(client, policy, Limits::default()),
            unavailable_log: Arc::new(Throttle::new(UNAVAILABLE_LOG_EVERY)),
        }
    }

    /// Who `token` proves, or the gRPC status to answer with.
    pub async fn authenticate(
        &self,
        token: &str,
    ) -> Result<meshcore::nodeauth::Principal, tonic::Status> {
        match self.reviews.verdict(token).await {
            Verdict::Principal(p) => Ok(p),
            Verdict::Refused(why) => {
                // Anyone can send a bad token: debug, not warn (the cache bounds the reviews).
                debug!(reason = %why, "refused a Kubernetes token");
                Err(tonic::Status::unauthenticated(why))
            }
            Verdict::Unavailable(why) => {
                if let Some(suppressed) = self.unavailable_log.hit() {
                    warn!(reason = %why, suppressed_since_last_line = suppressed, "cannot verify a Kubernetes token right now");
                }
                Err(tonic::Status::unavailable(format!(
                    "cannot verify the token now: {why}"
                )))
            }
        }
    }

    fn missing(&self) -> tonic::Status {
        tonic::Status::unauthenticated(format!(
            "no credentials: send `authorization: Bearer <token>` with a projected service-account token for audience {:?}",
            self.reviews.policy().audience
        ))
    }
}

/// The tower layer meshd's gRPC server runs under: with a reviewer, bearer tokens that are not
/// meshd's own (`node:`/`sa:`) are reviewed; without one it passes requests through.
#[derive(Clone, Default)]
pub struct KubeAuthLayer {
    pub reviewer: Option<TokenReviewer>,
}

impl<S> tower::Layer<S> for KubeAuthLayer {
    type Service = KubeAuth<S>;
    fn layer(&self, inner: S) -> KubeAuth<S> {
        KubeAuth {
            inner,
            reviewer: self.reviewer.clone(),
        }
    }
}

/// See [`KubeAuthLayer`].
#[derive(Clone)]
pub struct KubeAuth<S> {
    inner: S,
    reviewer: Option<TokenReviewer>,
}

/// What a request's `authorization` header asks for.
enum Credential {
    /// meshd's own token, or something the interceptor will refuse with its own message.
    Interceptor,
    Missing,
    Kubernetes(String),
}

fn credential<B>(req: &http::Request<B>) -> Credential {
    let Some(value) = req.headers().get(meshcore::nodeauth::AUTH_METADATA) else {
        return Credential::Missing;
    };
    let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return Credential::Interceptor;
    };
    let token = token.trim();
    if token.is_empty() {
        return Credential::Missing;
    }
    if token.starts_with("node:") || token.starts_with("sa:") {
        return Credential::Interceptor;
    }
    Credential::Kubernetes(token.to_string())
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for KubeAuth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // Only this layer sets it; whatever reached here with one did not get it from us.
        req.extensions_mut().remove::<Authenticated>();
        let Some(reviewer) = self.reviewer.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let token = match credential(&req) {
            Credential::Interceptor => return Box::pin(self.inner.call(req)),
            Credential::Missing => {
                let status = reviewer.missing();
                return Box::pin(async move { Ok(status.into_http()) });
            }
            Credential::Kubernetes(t) => t,
        };
        // The service that was made ready is the one that is called, after the review.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            match reviewer.authenticate(&token).await {
                Ok(principal) => {
                    req.extensions_mut().insert(Authenticated(principal));
                    inner.call(req).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}
