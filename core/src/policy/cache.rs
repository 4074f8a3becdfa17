//! A per-node cache of authorization verdicts, so repeated connections cost one hash lookup even
//! with many policies.
//!
//! Owns the cache key, its bound, and invalidation (by the [`PolicySet`] generation). The
//! decisions themselves come from [`PolicySet::authorize_verbose`].

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Connection, Decision, PolicySet, Verdict};
use crate::identity::Identity;
use crate::proto::config::Workload;
use crate::store::canonical;

/// Everything a verdict depends on. The destination workload is identified by uid *and* a
/// fingerprint of what policy selection looks at (namespace, trust domain, labels), so a
/// relabelled pod does not reuse a stale verdict even when the policies did not change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    src_identity: Option<Arc<Identity>>,
    src_ip: IpAddr,
    dst_uid: String,
    dst_fingerprint: u64,
    dst_ip: IpAddr,
    dst_port: u16,
}

impl Key {
    fn new(conn: &Connection, dst: &Workload) -> Key {
        let mut labels: Vec<(&String, &String)> = dst.labels.iter().collect();
        labels.sort();
        let mut h = DefaultHasher::new();
        dst.namespace.hash(&mut h);
        dst.trust_domain.hash(&mut h);
        labels.hash(&mut h);
        Key {
            src_identity: conn.src_identity.clone(),
            src_ip: canonical(conn.src_ip),
            dst_uid: dst.uid.clone(),
            dst_fingerprint: h.finish(),
            dst_ip: canonical(conn.dst_ip),
            dst_port: conn.dst_port,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// The [`PolicySet::generation`] the cached entries were computed with.
    pub generation: u64,
    pub entries: usize,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Default)]
struct Inner {
    generation: u64,
    map: HashMap<Key, Verdict>,
    hits: u64,
    misses: u64,
}

/// Caches [`Verdict`]s keyed by (source identity, source IP, destination workload, destination
/// IP, destination port). All entries are dropped as soon as it is used with a different
/// [`PolicySet`] (a new compile), and when it reaches its capacity (simple, bounded memory).
pub struct DecisionCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl Default for DecisionCache {
    fn default() -> Self {
        DecisionCache::new(DecisionCache::DEFAULT_CAPACITY)
    }
}

impl DecisionCache {
    pub const DEFAULT_CAPACITY: usize = 65_536;

    pub fn new(capacity: usize) -> DecisionCache {
        DecisionCache {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map inconsistent; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`PolicySet::authorize`], cached.
    pub fn authorize(&self, set: &PolicySet, conn: &Connection, dst: &Workload) -> Decision {
        self.authorize_verbose(set, conn, dst).decision
    }

    /// [`PolicySet::authorize_verbose`], cached (audit matches are cached with the decision).
    pub fn authorize_verbose(&self, set: &PolicySet, conn: &Connection, dst: &Workload) -> Verdict {
        let key = Key::new(conn, dst);
        {
            let mut inner = self.lock();
            if inner.generation != set.generation() {
                inner.map.clear();
                inner.generation = set.generation();
            }
            let hit = inner.map.get(&key).cloned();
            if let Some(v) = hit {
                inner.hits += 1;
                return v;
            }
            inner.misses += 1;
        }
        // Evaluate without holding the lock.
        let verdict = set.authorize_verbose(conn, dst);
        let mut inner = self.lock();
        if inner.generation == set.generation() {
            if inner.map.len() >= self.capacity {
                inner.map.clear();
            }
            inner.map.insert(key, verdict.clone());
        }
        verdict
    }

    /// Drops every entry (e.g. when workloads change in ways the key does not capture).
    pub fn clear(&self) {
        self.lock().map.clear();
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats {
            generation: inner.generation,
            entries: inner.map.len(),
            hits: inner.hits,
            misses: inner.misses,
        }
    }
}
