//! The policy engine: Istio `AuthorizationPolicy`, `PeerAuthentication` and
//! `RequestAuthentication`, compiled once per config version into a [`PolicySet`] that answers,
//! per inbound connection (ztunnel), "allow or deny?" and "is plaintext acceptable on this
//! port?", and per request at a waypoint (`l7`, policies attached with `targetRefs`), "allow,
//! deny, or is the JWT bad?". L4 and L7 share the spec parsing, the matcher and the evaluation.
//!
//! Owns policy scoping (mesh / namespace / selector), the DENY → ALLOW evaluation order, mTLS
//! mode resolution (mesh → namespace → workload → port), per-policy reports, and the
//! [`DecisionCache`]. Users bring Istio YAML: every accepted field keeps Istio's meaning; what
//! cannot be enforced at L4 is reported in [`PolicySet::reports`], never silently ignored;
//! policies Istio's admission would refuse are rejected (not applied) and listed in
//! [`PolicySet::errors`].
//!
//! Submodules: `spec` (reading JSON with field paths), `authz` (AuthorizationPolicy),
//! `peerauthn` (PeerAuthentication), `matcher` (the match form, L4 and L7), `path` (paths and
//! URI templates), `l7` (waypoint attachment and decisions), `jwt` (RequestAuthentication),
//! `cache`.

mod authz;
mod cache;
pub mod jwt;
mod l7;
mod matcher;
mod path;
mod peerauthn;
mod spec;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

pub use authz::{Action, L4Authorization, Scope};
pub use cache::{CacheStats, DecisionCache};
pub use l7::{GATEWAY_GROUP, L7Authorization, TargetRef, WAYPOINT_CLASS, WaypointTarget};
pub use matcher::{
    KeyedMatch, L4Match, L4Rule, Match, Request, Rule, ServiceAccountMatch, StringMatch,
};
pub use path::{PathMatch, Piece, normalize as normalize_path};
pub use peerauthn::{L4PeerAuthentication, MtlsSetting, PeerAuthnLevel};
pub use spec::PolicyError;

use crate::identity::Identity;
use crate::proto::config::{Policy, Workload};
use matcher::Peer;
use spec::labels_match;

/// Istio's default mesh root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// One inbound connection to a workload of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The peer's verified identity; `None` for plaintext. Shared: an open connection keeps
    /// its `Connection` (to be checked again when policy changes), and the identity is the
    /// same for every stream of an HBONE connection.
    pub src_identity: Option<Arc<Identity>>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy`: the denying AuthorizationPolicy as `"ns/name"`; or `"no ALLOW policy matched"`;
    /// or, for plaintext refused by STRICT mTLS,
    /// `"ns/name (PeerAuthentication STRICT: plaintext refused)"`.
    Deny {
        policy: String,
    },
}

/// The reason string of [`Decision::Deny`] when ALLOW policies apply but none matched.
pub const NO_ALLOW_MATCHED: &str = "no ALLOW policy matched";

/// A decision plus the AUDIT policies (`"ns/name"`, sorted) that matched, for logging. AUDIT
/// never changes the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub audited: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MtlsMode {
    Strict,
    Permissive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PolicyStatus {
    /// Enforced at L4 (possibly partially: see the report's warnings).
    Enforced,
    /// Valid, but not enforced here (waypoint policy, CUSTOM action, ignored PeerAuthentication,
    /// unknown kind): see the warnings.
    NotEnforced,
    /// Invalid (Istio would refuse it at admission): not applied at all. See the errors.
    Rejected,
}

/// The effective L4 form of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Effective {
    Authorization(L4Authorization),
    PeerAuthentication(L4PeerAuthentication),
}

/// What became of one policy: for logs and the admin config dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    /// The config key, `Kind/ns/name`.
    pub key: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub status: PolicyStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective: Option<Effective>,
    /// What was dropped, changed or not enforced, as `Kind ns/name: field: message`.
    pub warnings: Vec<String>,
    /// Why it was rejected, as `Kind ns/name: field: message`.
    pub errors: Vec<String>,
}

/// Selector policies are indexed by their first label, so evaluating a workload only looks at
/// policies that can select it.
#[derive(Default)]
struct NsIndex {
    /// Mesh- and namespace-wide policies.
    wide: Vec<usize>,
    /// label key → label value → selector policies whose first selector label is that.
    by_label: HashMap<String, HashMap<String, Vec<usize>>>,
}

static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// All policies compiled for fast L4 decisions. Build once per config version.
pub struct PolicySet {
    generation: u64,
    root_namespace: String,
    /// Sorted by `ns/name`.
    authz: Vec<L4Authorization>,
    authz_index: HashMap<String, NsIndex>,
    /// Sorted by `ns/name`.
    peer_authn: Vec<L4PeerAuthentication>,
    mesh_pa: Option<usize>,
    namespace_pa: HashMap<String, usize>,
    /// Per namespace, workload-level policies in name order (first matching wins).
    workload_pa: HashMap<String, Vec<usize>>,
    /// AuthorizationPolicies with `targetRefs`, for waypoints; sorted by `ns/name`.
    waypoint_authz: Vec<L7Authorization>,
    /// RequestAuthentications, for waypoints; sorted by `ns/name`.
    jwt: Vec<jwt::JwtPolicy>,
    reports: Vec<PolicyReport>,
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySet::compile(std::iter::empty(), DEFAULT_ROOT_NAMESPACE)
    }
}

impl PolicySet {
    /// `root_namespace`: Istio's mesh config root (default `istio-system`): policies there
    /// without selector apply mesh-wide.
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a Policy>,
        root_namespace: &str,
    ) -> PolicySet {
        let mut input: Vec<&Policy> = policies.into_iter().collect();
        input.sort_by(|a, b| {
            (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name))
        });
        let mut set = PolicySet {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            root_namespace: root_namespace.to_string(),
            authz: Vec::new(),
            authz_index: HashMap::new(),
            peer_authn: Vec::new(),
            mesh_pa: None,
            namespace_pa: HashMap::new(),
            workload_pa: HashMap::new(),
            waypoint_authz: Vec::new(),
            jwt: Vec::new(),
            reports: Vec::with_capacity(input.len()),
        };
        // Report index of each compiled PeerAuthentication, to attach conflict warnings.
        let mut pa_reports = Vec::new();
        for p in input {
            match p.kind.as_str() {
                authz::KIND => {
                    let (effective, waypoint, report) = authz::compile(p, root_namespace);
                    set.authz.extend(effective);
                    set.waypoint_authz.extend(waypoint);
                    set.reports.push(report);
                }
                jwt::KIND => {
                    let (compiled, report) = jwt::compile(p);
                    set.jwt.extend(compiled);
                    set.reports.push(report);
                }
                peerauthn::KIND => {
                    let (effective, report) = peerauthn::compile(p, root_namespace);
                    if let Some(pa) = effective {
                        pa_reports.push(set.reports.len());
                        set.peer_authn.push(pa);
                    }
                    set.reports.push(report);
                }
                other => {
                    let warning = format!(
                        "{other} {}/{}: kind: not handled by the L4 policy engine: NOT enforced",
                        p.namespace, p.name
                    );
                    tracing::debug!(policy = %p.key, "{warning}");
                    set.reports.push(PolicyReport {
                        key: p.key.clone(),
                        kind: other.to_string(),
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        status: PolicyStatus::NotEnforced,
                        effective: None,
                        warnings: vec![warning],
                        errors: Vec::new(),
                    });
                }
            }
        }
        set.index_authz();
        set.index_peer_authn(&pa_reports);
        set
    }

    fn index_authz(&mut self) {
        for (i, a) in self.authz.iter().enumerate() {
            let ns = self.authz_index.entry(a.namespace.clone()).or_default();
            match &a.scope {
                Scope::WorkloadSelector(sel) => match sel.iter().next() {
                    Some((k, v)) => ns
                        .by_label
                        .entry(k.clone())
                        .or_default()
                        .entry(v.clone())
                        .or_default()
                        .push(i),
                    None => ns.wide.push(i),
                },
                Scope::Mesh | Scope::Namespace => ns.wide.push(i),
            }
        }
    }

    /// Istio applies the oldest of several mesh-level (or namespace-level) policies; we have no
    /// creation times, so the first by name wins and the others are reported as ignored.
    fn index_peer_authn(&mut self, pa_reports: &[usize]) {
        for (i, pa) in self.peer_authn.iter().enumerate() {
            let winner = match &pa.level {
                PeerAuthnLevel::Mesh => *self.mesh_pa.get_or_insert(i),
                PeerAuthnLevel::Namespace => {
                    *self.namespace_pa.entry(pa.namespace.clone()).or_insert(i)
                }
                PeerAuthnLevel::Workload(_) => {
                    self.workload_pa
                        .entry(pa.namespace.clone())
                        .or_default()
                        .push(i);
                    i
                }
            };
            if winner != i
                && let Some(report) = pa_reports.get(i).and_then(|r| self.reports.get_mut(*r))
            {
                let w = format!(
                    "PeerAuthentication {}: spec: another policy at the same level applies ({}): \
                     Istio applies the oldest; without creation times the first by name wins; \
                     this one is ignored",
                    pa.key, self.peer_authn[winner].key
                );
                tracing::debug!(policy = %pa.key, "{w}");
                report.warnings.push(w);
                report.status = PolicyStatus::NotEnforced;
            }
        }
    }

    /// Changes on every compile; [`DecisionCache`] uses it to invalidate.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Per policy (sorted by kind, namespace, name): its effective L4 form and what was
    /// dropped/unsupported.
    pub fn reports(&self) -> &[PolicyReport] {
        &self.reports
    }

    /// Every rejected policy's errors, each naming the resource and the field, e.g.
    /// `AuthorizationPolicy ns/name: spec.action: unknown action "ALOW" (...)`.
    pub fn errors(&self) -> Vec<String> {
        self.reports
            .iter()
            .flat_map(|r| r.errors.iter().cloned())
            .collect()
    }

    /// The enforced AuthorizationPolicies that apply to `dst`, in `ns/name` order.
    pub fn applicable(&self, dst: &Workload) -> impl Iterator<Item = &L4Authorization> {
        self.applicable_indexes(dst)
            .into_iter()
            .filter_map(|i| self.authz.get(i))
    }

    fn applicable_indexes(&self, dst: &Workload) -> Vec<usize> {
        let mut out = Vec::new();
        self.collect_from(&self.root_namespace, dst, &mut out);
        if dst.namespace != self.root_namespace {
            self.collect_from(&dst.namespace, dst, &mut out);
        }
        out.sort_unstable();
        out
    }

    fn collect_from(&self, namespace: &str, dst: &Workload, out: &mut Vec<usize>) {
        let Some(idx) = self.authz_index.get(namespace) else {
            return;
        };
        out.extend_from_slice(&idx.wide);
        for (k, v) in &dst.labels {
            let Some(candidates) = idx.by_label.get(k).and_then(|m| m.get(v)) else {
                continue;
            };
            for &i in candidates {
                if let Some(Scope::WorkloadSelector(sel)) = self.authz.get(i).map(|a| &a.scope)
                    && labels_match(sel, &dst.labels)
                {
                    out.push(i);
                }
            }
        }
    }

    /// The L4 authorization decision for one connection to `dst` (a workload of this node).
    pub fn authorize(&self, conn: &Connection, dst: &Workload) -> Decision {
        self.authorize_verbose(conn, dst).decision
    }

    /// Like [`PolicySet::authorize`], also naming the AUDIT policies that matched.
    ///
    /// Order: plaintext under STRICT mTLS → deny (as ztunnel's converted PeerAuthentication);
    /// any matching DENY → deny; no ALLOW policy applies → allow; any matching ALLOW → allow;
    /// else deny. CUSTOM policies are not enforced (see reports).
    pub fn authorize_verbose(&self, conn: &Connection, dst: &Workload) -> Verdict {
        let peer = Peer::of(conn, None);
        let mut tally = Tally::default();
        for i in self.applicable_indexes(dst) {
            let Some(a) = self.authz.get(i) else { continue };
            tally.add(a.action, &a.key, || a.matches(&peer));
        }
        let strict = match conn.src_identity {
            Some(_) => None,
            None => match self.mtls_mode_verbose(dst, conn.dst_port) {
                (MtlsMode::Strict, by) => Some(by.unwrap_or("mesh")),
                (MtlsMode::Permissive, _) => None,
            },
        };
        tally.verdict(strict.map(|by| Decision::Deny {
            policy: format!("{by} (PeerAuthentication STRICT: plaintext refused)"),
        }))
    }

    /// The mTLS mode in force for `dst` on `port`.
    pub fn mtls_mode(&self, dst: &Workload, port: u16) -> MtlsMode {
        self.mtls_mode_verbose(dst, port).0
    }

    /// The mTLS mode and the PeerAuthentication (`ns/name`) that decided it (`None`: default).
    ///
    /// Mesh → namespace → workload selector, most specific wins; `portLevelMtls` of the workload
    /// policy overrides for its port; UNSET inherits from the parent level; DISABLE behaves as
    /// PERMISSIVE; the default is PERMISSIVE.
    pub fn mtls_mode_verbose(&self, dst: &Workload, port: u16) -> (MtlsMode, Option<&str>) {
        let mesh = self.mesh_pa.and_then(|i| self.peer_authn.get(i));
        let namespace = if dst.namespace == self.root_namespace {
            None
        } else {
            self.namespace_pa
                .get(&dst.namespace)
                .and_then(|i| self.peer_authn.get(*i))
        };
        let workload = self.workload_pa.get(&dst.namespace).and_then(|list| {
            list.iter()
                .filter_map(|i| self.peer_authn.get(*i))
                .find(|pa| match &pa.level {
                    PeerAuthnLevel::Workload(sel) => labels_match(sel, &dst.labels),
                    PeerAuthnLevel::Mesh | PeerAuthnLevel::Namespace => false,
                })
        });
        let port_level =
            workload.and_then(|pa| pa.port_level_mtls.get(&port).map(|s| (*s, pa.key.as_str())));
        let levels = [
            mesh.map(|pa| (pa.mode, pa.key.as_str())),
            namespace.map(|pa| (pa.mode, pa.key.as_str())),
            workload.map(|pa| (pa.mode, pa.key.as_str())),
            port_level,
        ];
        let mut mode = MtlsMode::Permissive;
        let mut by = None;
        for (setting, key) in levels.into_iter().flatten() {
            if let Some(m) = setting.effective() {
                mode = m;
                by = Some(key);
            }
        }
        (mode, by)
    }
}

/// Combines the policies that apply, L4 or L7: any matching DENY → deny; no ALLOW policy →
/// allow; any matching ALLOW → allow; else deny. AUDIT never decides; CUSTOM is not enforced.
#[derive(Default)]
pub(crate) struct Tally<'a> {
    deny: Option<&'a str>,
    any_allow: bool,
    allowed: bool,
    audited: Vec<String>,
}

impl<'a> Tally<'a> {
    /// `matches` is only evaluated when its answer can change the outcome.
    pub(crate) fn add(&mut self, action: Action, key: &'a str, matches: impl FnOnce() -> bool) {
        match action {
            Action::Deny => {
                if self.deny.is_none() && matches() {
                    self.deny = Some(key);
                }
            }
            Action::Allow => {
                self.any_allow = true;
                if !self.allowed && matches() {
                    self.allowed = true;
                }
            }
            Action::Audit => {
                if matches() {
                    self.audited.push(key.to_string());
                }
            }
            Action::Custom => {}
        }
    }

    /// `first`: a decision that takes precedence over every policy (STRICT mTLS at L4).
    pub(crate) fn verdict(self, first: Option<Decision>) -> Verdict {
        let decision = if let Some(d) = first {
            d
        } else if let Some(policy) = self.deny {
            Decision::Deny {
                policy: policy.to_string(),
            }
        } else if !self.any_allow || self.allowed {
            Decision::Allow
        } else {
            Decision::Deny {
                policy: NO_ALLOW_MATCHED.to_string(),
            }
        };
        Verdict {
            decision,
            audited: self.audited,
        }
    }
}
