//! Cross-resource checks of route resources, and keeping each one's last good version.
//!
//! A route can be valid on its own (`route_check`) and still wrong against the rest of the mesh:
//! a destination naming no Service, a subset no DestinationRule defines. The waypoint's route
//! engine leaves such a resource out entirely, so meshd checks the whole set first (with the
//! same `meshcore::route::compile`) and serves a refused resource's last good version instead,
//! as for a resource refused on its own. Conflicts and warnings are kept for status and logged
//! when they change.
//!
//! Owns the last-good memory across views. Does not read files or decide what a waypoint is sent.

use std::collections::BTreeMap;

use meshcore::proto::config::RouteResource;
use meshcore::route::{self, RouteResourceRef, ServiceInfo, Severity};
use serde_json::Value;
use tracing::{error, warn};

use crate::route_check;
use crate::translate::{MeshView, RouteFindings, RouteRefs};

#[derive(Default)]
pub struct RouteGate {
    /// The last version of each route that passed, by "Kind/ns/name".
    last_good: BTreeMap<String, RouteResource>,
    /// What compiling last found (line → whether it is an error), so a finding is logged
    /// once, not for every view.
    reported: BTreeMap<String, bool>,
}

impl RouteGate {
    /// Checks `view.routes` against each other and `view.services`; a refused route is replaced
    /// by its last good version (or left out if it never had one), and its findings recorded.
    pub fn apply(&mut self, view: &mut MeshView, cluster_domain: &str) {
        let specs: BTreeMap<&str, Value> = view
            .routes
            .iter()
            .map(|(k, r)| {
                let spec = serde_json::from_str(&r.spec_json).unwrap_or(Value::Null);
                (k.as_str(), spec)
            })
            .collect();
        let refs: Vec<RouteResourceRef> = view
            .routes
            .iter()
            .map(|(k, r)| RouteResourceRef {
                kind: &r.kind,
                namespace: &r.namespace,
                name: &r.name,
                spec: &specs[k.as_str()],
                generation_order: r.generation_order,
            })
            .collect();
        let services: Vec<ServiceInfo> = view.services.values().map(ServiceInfo::from).collect();
        let (_, diags) = route::compile(&refs, &services, cluster_domain);
        let mut found = BTreeMap::new();
        let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut notes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in diags {
            // "Kind ns/name" → "Kind/ns/name".
            let key = d.resource.replacen(' ', "/", 1);
            match d.severity {
                Severity::Error => errors
                    .entry(key)
                    .or_default()
                    .push(format!("{}: {}", d.field, d.message)),
                // Unsupported fields were reported when the resource was read.
                Severity::Unsupported => {}
                _ => notes.entry(key).or_default().push(d.to_string()),
            }
        }
        self.last_good.retain(|k, _| view.routes.contains_key(k));
        for key in view.routes.keys().cloned().collect::<Vec<_>>() {
            let Some(errs) = errors.get(&key) else {
                self.last_good
                    .insert(key.clone(), view.routes[&key].clone());
                continue;
            };
            let why = errs.join("; ");
            let kept = self.last_good.get(&key).cloned();
            let current = view.routes.remove(&key);
            let rejected = match kept {
                Some(good) => {
                    if let Some(refs) = refs_of(&good, cluster_domain) {
                        view.route_refs.insert(key.clone(), refs);
                    }
                    view.routes.insert(key.clone(), good);
                    format!("{why}; keeping its last good version")
                }
                None => {
                    view.route_refs.remove(&key);
                    format!("{why}; not applied (no earlier good version)")
                }
            };
            let r = current.unwrap_or_default();
            let f = view
                .route_findings
                .entry(key.clone())
                .or_insert_with(|| RouteFindings {
                    kind: r.kind.clone(),
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    notes: Vec::new(),
                    rejected: None,
                });
            let line = format!("{} {}/{}: {rejected}", r.kind, r.namespace, r.name);
            found.insert(line.clone(), true);
            f.rejected = Some(line);
        }
        for (key, list) in notes {
            let Some(r) = view.routes.get(&key) else {
                continue;
            };
            let f = view
                .route_findings
                .entry(key)
                .or_insert_with(|| RouteFindings {
                    kind: r.kind.clone(),
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    notes: Vec::new(),
                    rejected: None,
                });
            for n in list {
                found.insert(n.clone(), false);
                if !f.notes.contains(&n) {
                    f.notes.push(n);
                }
            }
        }
        self.report(found);
    }

    /// Logs what compiling found that was not found for the last view (what reading a file
    /// found was logged then).
    fn report(&mut self, found: BTreeMap<String, bool>) {
        for (line, is_error) in found
            .iter()
            .filter(|(l, _)| !self.reported.contains_key(*l))
        {
            if *is_error {
                error!("{line}");
            } else {
                warn!("{line}");
            }
        }
        self.reported = found;
    }
}

fn refs_of(r: &RouteResource, cluster_domain: &str) -> Option<RouteRefs> {
    let spec: Value = serde_json::from_str(&r.spec_json).ok()?;
    Some(route_check::references_of(
        &r.kind,
        &r.namespace,
        &spec,
        cluster_domain,
    ))
}
