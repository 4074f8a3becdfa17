//! Remembering TokenReview verdicts, so that a caller's many requests cost one review, and so
//! that anyone able to reach meshd's port cannot turn a flood of tokens into a flood of
//! TokenReviews against the API.
//!
//! Owns the cache (keyed by the token's SHA-256, never the token; bounded in size; a verdict
//! kept [`POSITIVE_TTL`] or [`NEGATIVE_TTL`], never past a JWT's `exp`), collapsing concurrent
//! reviews of one token into one, and the budget of reviews meshd starts ([`REVIEWS_PER_SEC`],
//! [`MAX_CONCURRENT_REVIEWS`]). A verdict of "could not find out" is never cached. Does not
//! decide what a review means (`identity_review`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};

use super::identity_jwt::until_expiry;
use super::identity_review::{self, Policy, Verdict};

/// How long a token that proved a principal is believed without asking again.
pub const POSITIVE_TTL: Duration = Duration::from_secs(30);
/// How long a refused token stays refused without asking again: short, so that a caller who
/// fixes its token (or a pod that gets scheduled) is not kept waiting.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// New reviews started per second. Well above what a cluster's ztunnels and waypoints need
/// after a restart of meshd (one per token, their tokens then cached); beyond it callers get
/// UNAVAILABLE and retry.
pub const REVIEWS_PER_SEC: f64 = 50.0;

/// The cache's bounds ([`Limits::default`] is meshd's; tests pick their own).
#[derive(Debug, Clone)]
pub struct Limits {
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
    /// Tokens remembered at once; a full cache drops refusals first.
    pub max_entries: usize,
    /// New reviews per second, and how many may start at once after a quiet spell.
    pub per_sec: f64,
    pub burst: f64,
    /// Reviews in flight against the API at once.
    pub concurrent: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            positive_ttl: POSITIVE_TTL,
            negative_ttl: NEGATIVE_TTL,
            max_entries: 10_000,
            per_sec: REVIEWS_PER_SEC,
            burst: 100.0,
            concurrent: 16,
        }
    }
}
/// Projected tokens are about 1 KiB; anything far larger is not one and is not sent on.
pub const MAX_TOKEN_BYTES: usize = 8 << 10;

type Key = [u8; 32];

enum Entry {
    /// A review under way: its verdict will be sent here.
    Pending(watch::Receiver<Option<Verdict>>),
    Done {
        verdict: Verdict,
        until: Instant,
    },
}

struct State {
    limits: Limits,
    entries: HashMap<Key, Entry>,
    /// Reviews that may start now (a token bucket).
    budget: f64,
    refilled: Instant,
}

/// Verdicts on tokens, asking the API only when needed. Clone is cheap.
#[derive(Clone)]
pub struct Reviews {
    inner: Arc<Inner>,
}

struct Inner {
    client: kube::Client,
    policy: Policy,
    state: Mutex<State>,
    in_flight: Semaphore,
}

impl Reviews {
    pub fn new(client: kube::Client, policy: Policy, limits: Limits) -> Reviews {
        Reviews {
            inner: Arc::new(Inner {
                client,
                policy,
                in_flight: Semaphore::new(limits.concurrent.max(1)),
                state: Mutex::new(State::new(limits, Instant::now())),
            }),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// What `token` proves, from the cache or a review.
    pub async fn verdict(&self, token: &str) -> Verdict {
        if token.len() > MAX_TOKEN_BYTES {
            return Verdict::Refused(format!(
                "the token is longer than {MAX_TOKEN_BYTES} bytes: it is not a service-account token"
            ));
        }
        let key = key(token);
        let mut rx = {
            let Ok(mut st) = self.inner.state.lock() else {
                return Verdict::Unavailable("token cache unusable".into());
            };
            let now = Instant::now();
            match st.entries.get(&key) {
                Some(Entry::Done { verdict, until }) if *until > now => return verdict.clone(),
                // A review whose task died (its sender is gone) is started again.
                Some(Entry::Pending(rx)) if rx.has_changed().is_ok() => rx.clone(),
                _ => {
                    if !st.spend(now) {
                        return Verdict::Unavailable(format!(
                            "meshd is reviewing too many new tokens (more than {}/s); retry shortly",
                            st.limits.per_sec
                        ));
                    }
                    let (tx, rx) = watch::channel(None);
                    st.insert(key, Entry::Pending(rx.clone()), now);
                    // Its own task: a caller that goes away does not abandon the review that
                    // others may be waiting for.
                    tokio::spawn(self.clone().review(key, token.to_string(), tx));
                    rx
                }
            }
        };
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v
                .clone()
                .unwrap_or_else(|| Verdict::Unavailable("no verdict".into())),
            Err(_) => Verdict::Unavailable("the token review was abandoned; retry".into()),
        }
    }

    async fn review(self, key: Key, token: String, tx: watch::Sender<Option<Verdict>>) {
        let verdict = match self.inner.in_flight.acquire().await {
            Ok(_permit) => {
                identity_review::review(&self.inner.client, &self.inner.policy, &token).await
            }
            Err(_) => Verdict::Unavailable("token reviews are shutting down".into()),
        };
        if let Ok(mut st) = self.inner.state.lock() {
            let now = Instant::now();
            let ttl = match &verdict {
                Verdict::Principal(_) => Some(st.limits.positive_ttl.min(until_expiry(&token))),
                Verdict::Refused(_) => Some(st.limits.negative_ttl),
                Verdict::Unavailable(_) => None,
            };
            match ttl {
                Some(ttl) => {
                    let entry = Entry::Done {
                        verdict: verdict.clone(),
                        until: now + ttl,
                    };
                    st.insert(key, entry, now);
                }
                None => {
                    st.entries.remove(&key);
                }
            }
        }
        let _ = tx.send(Some(verdict));
    }
}

impl State {
    fn new(limits: Limits, now: Instant) -> State {
        State {
            budget: limits.burst,
            limits,
            entries: HashMap::new(),
            refilled: now,
        }
    }

    fn spend(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.budget = (self.budget + elapsed * self.limits.per_sec).min(self.limits.burst);
        self.refilled = now;
        if self.budget >= 1.0 {
            self.budget -= 1.0;
            true
        } else {
            false
        }
    }

    /// Inserts, making room first: expired entries go, then refusals, then the principals
    /// closest to expiry. Pending reviews stay (they are bounded by the review budget).
    fn insert(&mut self, key: Key, entry: Entry, now: Instant) {
        let max = self.limits.max_entries.max(1);
        if self.entries.len() >= max && !self.entries.contains_key(&key) {
            self.entries.retain(|_, e| match e {
                Entry::Done { until, .. } => *until > now,
                Entry::Pending(rx) => rx.has_changed().is_ok(),
            });
            if self.entries.len() >= max {
                self.entries.retain(|_, e| {
                    !matches!(
                        e,
                        Entry::Done {
                            verdict: Verdict::Refused(_),
                            ..
                        }
                    )
                });
            }
            while self.entries.len() >= max {
                let oldest = self
                    .entries
                    .iter()
                    .filter_map(|(k, e)| match e {
                        Entry::Done { until, .. } => Some((*until, *k)),
                        Entry::Pending(_) => None,
                    })
                    .min();
                match oldest {
                    Some((_, k)) => {
                        self.entries.remove(&k);
                    }
                    None => break,
                }
            }
        }
        self.entries.insert(key, entry);
    }
}

fn key(token: &str) -> Key {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut k = [0u8; 32];
    k.copy_from_slice(digest.as_ref());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_review_budget_refills_at_its_rate() {
        let t0 = Instant::now();
        let limits = Limits::default();
        let mut st = State::new(limits.clone(), t0);
        let granted = (0..1000).filter(|_| st.spend(t0)).count();
        assert_eq!(granted, limits.burst as usize);
        let later = t0 + Duration::from_secs(1);
        let granted = (0..1000).filter(|_| st.spend(later)).count();
        assert_eq!(granted, limits.per_sec as usize);
    }

    #[test]
    fn a_full_cache_drops_refusals_before_principals() {
        let now = Instant::now();
        let limits = Limits {
            max_entries: 100,
            ..Limits::default()
        };
        let mut st = State::new(limits, now);
        let until = now + Duration::from_secs(30);
        let principal = Verdict::Principal(meshcore::nodeauth::Principal::Node("n".into()));
        st.insert(
            [0; 32],
            Entry::Done {
                verdict: principal,
                until,
            },
            now,
        );
        for i in 1..=1000u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            let verdict = Verdict::Refused("no".into());
            st.insert(k, Entry::Done { verdict, until }, now);
            assert!(st.entries.len() <= 100);
        }
        assert!(st.entries.contains_key(&[0; 32]), "the principal survived");
    }

    /// A fake API that answers every TokenReview "not authenticated", counting them.
    fn counting_api() -> (kube::Client, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let c = c.clone();
            async move {
                assert!(req.uri().path().ends_with("/tokenreviews"), "{}", req.uri());
                c.fetch_add(1, Ordering::SeqCst);
                let body = serde_json::json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "status": {"authenticated": false, "error": "invalid bearer token"}
                });
                let body = kube::client::Body::from(serde_json::to_vec(&body).unwrap());
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            }
        });
        (kube::Client::new(svc, "default"), count)
    }

    fn policy() -> Policy {
        Policy {
            audience: "mesh-ca".into(),
            ztunnel: ("mesh-system".into(), "ztunnel".into()),
        }
    }

    #[tokio::test]
    async fn one_token_asked_many_times_is_reviewed_once() {
        let (client, count) = counting_api();
        let limits = Limits {
            negative_ttl: Duration::from_secs(3600),
            ..Limits::default()
        };
        let reviews = Reviews::new(client, policy(), limits);
        let verdicts =
            futures::future::join_all((0..50).map(|_| reviews.verdict("same-bad-token"))).await;
        for _ in 0..50 {
            assert!(matches!(
                reviews.verdict("same-bad-token").await,
                Verdict::Refused(_)
            ));
        }
        assert!(
            verdicts.iter().all(|v| matches!(v, Verdict::Refused(_))),
            "{verdicts:?}"
        );
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_flood_of_new_tokens_costs_at_most_the_review_budget() {
        let (client, count) = counting_api();
        let limits = Limits {
            per_sec: 0.0,
            burst: 20.0,
            ..Limits::default()
        };
        let reviews = Reviews::new(client, policy(), limits);
        let mut unavailable = 0;
        for i in 0..500 {
            match reviews.verdict(&format!("bad-{i}")).await {
                Verdict::Unavailable(why) => {
                    assert!(why.contains("retry"), "{why}");
                    unavailable += 1;
                }
                Verdict::Refused(_) => {}
                Verdict::Principal(p) => panic!("{p}"),
            }
        }
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 20);
        assert_eq!(unavailable, 480);
        // Too long to be a service-account token: refused without asking.
        let huge = "x".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(reviews.verdict(&huge).await, Verdict::Refused(_)));
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 20);
    }
}
