//! Load balancing from DestinationRule: which [`LbPolicy`] applies (top level, per port, per
//! subset — Istio's merge rules) and the [`Balancer`] that picks an endpoint with it:
//! LEAST_REQUEST (Istio's default: power of two random choices by active requests),
//! ROUND_ROBIN, RANDOM, and consistent hashing on a header, cookie, source IP or query parameter
//! over a hash ring (stable when endpoints are listed in another order; when one goes, only its
//! keys move).
//!
//! Owns the choice among endpoints the caller passes (already filtered to healthy ones in the
//! right subset); knows nothing about connections or health.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use rand::Rng;

use super::spec_istio::{LoadBalancer, TrafficPolicy};
use super::validate::parse_duration;

/// How a destination's endpoints are chosen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LbPolicy {
    /// Two random endpoints, the one with fewer active requests wins (Istio's default).
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    ConsistentHash(HashOn),
}

/// What a consistent hash is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(HeaderName),
    /// With a `ttl`, a request without the cookie gets one (`Set-Cookie` on its response);
    /// ttl 0 makes it a session cookie. Without a ttl, no cookie is generated.
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParam(String),
}

impl LbPolicy {
    /// From a validated `loadBalancer`; `None` (unset) is the default.
    pub(crate) fn from_spec(lb: Option<&LoadBalancer>) -> LbPolicy {
        let Some(lb) = lb else {
            return LbPolicy::LeastRequest;
        };
        if let Some(ch) = &lb.consistent_hash {
            let on = if let Some(h) = &ch.http_header_name {
                HeaderName::from_bytes(h.as_bytes())
                    .ok()
                    .map(HashOn::Header)
            } else if let Some(c) = &ch.http_cookie {
                Some(HashOn::Cookie {
                    name: c.name.clone(),
                    path: c.path.clone(),
                    ttl: c.ttl.as_deref().and_then(parse_duration),
                })
            } else if ch.use_source_ip == Some(true) {
                Some(HashOn::SourceIp)
            } else {
                ch.http_query_parameter_name.clone().map(HashOn::QueryParam)
            };
            return on.map_or(LbPolicy::LeastRequest, LbPolicy::ConsistentHash);
        }
        match lb.simple.as_deref() {
            Some("ROUND_ROBIN") => LbPolicy::RoundRobin,
            Some("RANDOM") => LbPolicy::Random,
            _ => LbPolicy::LeastRequest,
        }
    }

    /// Istio's merge (cluster_traffic_policy.go): the top-level policy, replaced by its
    /// portLevelSettings entry for `port` if any (replace, not merge: an entry without a
    /// loadBalancer means the default); then a subset's loadBalancer if set, replaced in turn by
    /// the subset's portLevelSettings entry for `port` if any.
    pub(crate) fn resolve(
        top: Option<&TrafficPolicy>,
        subset: Option<&TrafficPolicy>,
        port: u16,
    ) -> LbPolicy {
        fn at_port(tp: &TrafficPolicy, port: u16) -> Option<Option<&LoadBalancer>> {
            tp.port_level_settings
                .iter()
                .find(|p| p.port.as_ref().is_some_and(|s| s.number == port as u32))
                .map(|p| p.load_balancer.as_ref())
        }
        let mut lb = top.and_then(|tp| at_port(tp, port).unwrap_or(tp.load_balancer.as_ref()));
        if let Some(st) = subset {
            if st.load_balancer.is_some() {
                lb = st.load_balancer.as_ref();
            }
            if let Some(p) = at_port(st, port) {
                lb = p;
            }
        }
        LbPolicy::from_spec(lb)
    }

    /// The hash key of a request under this policy (`None`: not hashing, or the value is
    /// absent — then any endpoint will do, as in Envoy), and the `Set-Cookie` value to add to
    /// the response when a cookie with a ttl was missing.
    pub fn hash_key(&self, req: &HashRequest<'_>, rng: &mut impl Rng) -> HashKey {
        let LbPolicy::ConsistentHash(on) = self else {
            return HashKey::default();
        };
        let key = |s: &str| HashKey {
            key: Some(hash64(s.as_bytes())),
            set_cookie: None,
        };
        match on {
            HashOn::Header(name) => {
                match super::matcher::header_value(req.headers, name.as_str()) {
                    Some(v) => key(&v),
                    None => HashKey::default(),
                }
            }
            HashOn::SourceIp => match req.source_ip {
                Some(ip) => key(&ip.to_string()),
                None => HashKey::default(),
            },
            HashOn::QueryParam(name) => {
                let (_, query) = super::matcher::split_path(req.path_and_query);
                match super::matcher::query_param(query, name) {
                    Some(v) => key(&v),
                    None => HashKey::default(),
                }
            }
            HashOn::Cookie { name, path, ttl } => {
                if let Some(v) = cookie(req.headers, name) {
                    return key(&v);
                }
                let Some(ttl) = ttl else {
                    return HashKey::default();
                };
                // As Envoy: the generated value derives from the client address, so one client
                // lands on one endpoint even before it sends the cookie back.
                let seed = match req.source_ip {
                    Some(ip) => hash64(ip.to_string().as_bytes()),
                    None => rng.random(),
                };
                let value = format!("{seed:016x}");
                let mut set = format!("{name}=\"{value}\"");
                if !ttl.is_zero() {
                    set.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                }
                if let Some(p) = path {
                    set.push_str(&format!("; Path={p}"));
                }
                set.push_str("; HttpOnly");
                HashKey {
                    key: key(&value).key,
                    set_cookie: Some(set),
                }
            }
        }
    }
}

/// What [`LbPolicy::hash_key`] needs from a request.
pub struct HashRequest<'a> {
    pub headers: &'a HeaderMap,
    pub path_and_query: &'a str,
    pub source_ip: Option<IpAddr>,
}

/// A request's hash key, and the cookie to set on its response if one was generated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashKey {
    pub key: Option<u64>,
    pub set_cookie: Option<String>,
}

/// A cookie's value from the `cookie` headers (quotes stripped).
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(http::header::COOKIE).iter().find_map(|h| {
        h.to_str().ok()?.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"').to_string())
        })
    })
}

/// 64-bit FNV-1a with a splitmix64 finish: stable across processes and versions, so every
/// waypoint replica maps a key to the same endpoint.
pub(crate) fn hash64(bytes: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.write(bytes);
    h.finish()
}

/// Streaming FNV-1a (no allocation to hash several pieces).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 30;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 27;
        h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }
}

/// An endpoint as the balancer sees it: a stable key (e.g. the pod IP) and its requests in flight.
#[derive(Debug, Clone, Copy)]
pub struct EndpointView<'a> {
    pub key: &'a str,
    pub active: u32,
}

/// Ring points per endpoint. A fixed count (Envoy spreads a 1024-point minimum over the hosts
/// instead) keeps every other endpoint's points in place when one comes or goes, so only that
/// endpoint's keys move; 256 arcs each keep shares within a few percent.
const POINTS_PER_ENDPOINT: usize = 256;

struct Ring {
    /// Hash of the endpoint keys in the order they were given (indices below refer to it).
    fingerprint: u64,
    /// (point hash, endpoint index), sorted by hash.
    points: Vec<(u64, usize)>,
}

/// Picks endpoints for one destination (service, port, subset); keeps the round-robin position
/// and the hash ring between calls. Share it across requests.
#[derive(Default)]
pub struct Balancer {
    next: AtomicUsize,
    ring: Mutex<Option<Ring>>,
}

impl Balancer {
    pub fn new() -> Balancer {
        Balancer::default()
    }

    /// The index in `endpoints` to send to; `None` when there are none. `hash` is the request's
    /// [`HashKey::key`] (consistent hashing without one picks at random).
    pub fn pick(
        &self,
        policy: &LbPolicy,
        endpoints: &[EndpointView<'_>],
        hash: Option<u64>,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        let n = endpoints.len();
        if n <= 1 {
            return (n == 1).then_some(0);
        }
        match policy {
            LbPolicy::RoundRobin => Some(self.next.fetch_add(1, Ordering::Relaxed) % n),
            LbPolicy::Random => Some(rng.random_range(0..n)),
            LbPolicy::ConsistentHash(_) => match hash {
                Some(h) => Some(self.ring_lookup(endpoints, h)),
                None => Some(rng.random_range(0..n)),
            },
            LbPolicy::LeastRequest => {
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                Some(if endpoints[b].active < endpoints[a].active {
                    b
                } else {
                    a
                })
            }
        }
    }

    fn ring_lookup(&self, endpoints: &[EndpointView<'_>], h: u64) -> usize {
        let mut fp = Fnv::new();
        for e in endpoints {
            fp.write(e.key.as_bytes());
            fp.write(&[0]);
        }
        let fp = fp.finish();
        // A poisoned lock only means another pick panicked mid-build: rebuild.
        let mut guard = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|r| r.fingerprint != fp) {
            *guard = Some(build_ring(endpoints, fp));
        }
        let points = &guard
            .as_ref()
            .map(|r| r.points.as_slice())
            .unwrap_or_default();
        let i = points.partition_point(|(p, _)| *p < h);
        points.get(i).or(points.first()).map_or(0, |(_, idx)| *idx)
    }
}

fn build_ring(endpoints: &[EndpointView<'_>], fingerprint: u64) -> Ring {
    let mut points = Vec::with_capacity(POINTS_PER_ENDPOINT * endpoints.len());
    for (idx, e) in endpoints.iter().enumerate() {
        for i in 0..POINTS_PER_ENDPOINT {
            points.push((hash64(format!("{}_{i}", e.key).as_bytes()), idx));
        }
    }
    // Ties broken by key so the ring does not depend on the order endpoints came in.
    points.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| endpoints[a.1].key.cmp(endpoints[b.1].key))
    });
    Ring {
        fingerprint,
        points,
    }
}
