//! One kind's objects as meshd holds them: what each contributes to the `ResourceSet` (its last
//! good version), kept with the watcher's list semantic — a (re-)list (`Init`, `InitApply`…,
//! `InitDone`) is buffered and replaces the kind's contents at `InitDone` in one step, so an
//! expired (410) or dropped watch never shows as deletions of objects that still exist, and
//! objects deleted while the watch was away do go at that step.
//!
//! Owns parsing each object version once (through the directory source's parser), keeping a
//! refused object's last good version, and logging each object's and each watch's problems
//! once. Holds parsed resources only, never the API's JSON. Not the connection
//! (`source_watch`) nor the merge and publishing (`source`).

use std::collections::BTreeMap;

use kube::api::DynamicObject;
use kube::runtime::watcher;
use serde_json::Value;
use tracing::{debug, error, info, warn};

use crate::kube::kinds::Kind;
use crate::parse;
use crate::resources::Resource;
use crate::waypoints::{Refusal, Waypoint};

/// Where an object came from, in the parser's messages (a file names itself there).
pub const ORIGIN: &str = "Kubernetes API";

/// Where a kind's watch stands: what the first-publish gate and the waiting log read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not listed in full yet; `error` says why the last attempt failed.
    Waiting { error: Option<String> },
    /// Listed in full at least once: the contents are the API's as of the last event.
    Listed,
    /// The API does not serve the kind (404 on list or watch): it has no objects.
    Absent,
}

/// One object: its last good version and what was last reported about it.
#[derive(Debug, Clone, Default)]
struct Entry {
    resource_version: String,
    /// What it contributes (its last good version; empty if it never had one).
    resources: Vec<Resource>,
    /// The error reported for its current version (so one bad version is reported once).
    error: Option<String>,
    warnings: Vec<String>,
}

pub struct KindStore {
    kind: Kind,
    phase: Phase,
    /// By `namespace/name` (`name` for cluster-scoped kinds).
    objects: BTreeMap<String, Entry>,
    /// A list in progress: replaces `objects` at `InitDone`.
    relist: Option<BTreeMap<String, Entry>>,
    /// The watch failure last reported, so a streak of the same failure is reported once.
    reported: Option<String>,
}

impl KindStore {
    pub fn new(kind: Kind) -> Self {
        KindStore {
            kind,
            phase: Phase::Waiting { error: None },
            objects: BTreeMap::new(),
            relist: None,
            reported: None,
        }
    }

    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Whether the kind's contents are known in full: listed, or (an optional CRD) not served.
    /// A CRD that is served but not listed yet is not: its objects may be policies.
    pub fn ready(&self) -> bool {
        match self.phase {
            Phase::Listed => true,
            Phase::Absent => self.kind.optional,
            Phase::Waiting { .. } => false,
        }
    }

    /// Everything the kind contributes to the set.
    pub fn resources(&self) -> impl Iterator<Item = &Resource> {
        self.objects.values().flat_map(|e| e.resources.iter())
    }

    /// Takes one watcher event; true when the kind's contents or readiness may have changed.
    pub fn handle(&mut self, event: watcher::Event<DynamicObject>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                let (key, entry) = self.accept(obj);
                self.relist.get_or_insert_default().insert(key, entry);
                false
            }
            watcher::Event::InitDone => self.listed(),
            watcher::Event::Apply(obj) => {
                self.recovered();
                let (key, entry) = self.accept(obj);
                let old = self.objects.insert(key, entry.clone());
                old.map(|o| o.resources).unwrap_or_default() != entry.resources
            }
            watcher::Event::Delete(obj) => {
                self.recovered();
                let key = key(&obj);
                debug!("{} {key} deleted", self.kind.name());
                self.objects
                    .remove(&key)
                    .is_some_and(|o| !o.resources.is_empty())
            }
        }
    }

    /// A full list ended: its objects replace the kind's contents.
    fn listed(&mut self) -> bool {
        let new = self.relist.take().unwrap_or_default();
        let first = self.phase != Phase::Listed;
        self.recovered();
        if first {
            info!("{}: listed {} objects", self.kind.describe(), new.len());
        } else {
            debug!("{}: re-listed {} objects", self.kind.describe(), new.len());
        }
        for (key, _) in self.objects.iter().filter(|(k, _)| !new.contains_key(*k)) {
            debug!("{} {key} is gone (not in the new list)", self.kind.name());
        }
        let same = self.objects.len() == new.len()
            && self
                .objects
                .iter()
                .zip(&new)
                .all(|((ka, a), (kb, b))| ka == kb && a.resources == b.resources);
        self.objects = new;
        self.phase = Phase::Listed;
        first || !same
    }

    /// The watch works again after a reported failure.
    fn recovered(&mut self) {
        if let Some(e) = self.reported.take() {
            info!("{}: watching again (after: {e})", self.kind.describe());
        }
    }

    /// Takes one watcher error; true when the kind's contents or readiness changed (only a
    /// kind found not served does: its objects are gone with its CRD).
    pub fn failed(&mut self, err: &watcher::Error) -> bool {
        let not_found = match err {
            watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => {
                s.is_not_found() || s.code == 404
            }
            _ => false,
        };
        if not_found && self.kind.optional {
            self.relist = None;
            if self.phase == Phase::Absent {
                return false;
            }
            if self.phase == Phase::Listed {
                warn!(
                    "{} is no longer served (its CRD was removed?); dropping its {} objects. {}",
                    self.kind.describe(),
                    self.objects.len(),
                    self.kind.when_missing()
                );
            } else {
                warn!("{}", self.kind.when_missing());
            }
            self.reported = None;
            self.objects.clear();
            self.phase = Phase::Absent;
            return true;
        }
        let (routine, message) = describe_error(&self.kind, err);
        if self.reported.as_ref() != Some(&message) {
            if routine {
                info!("{message}");
            } else {
                warn!("{message}; meshd keeps serving what it last read");
            }
            self.reported = Some(message.clone());
        }
        if let Phase::Waiting { error } = &mut self.phase {
            *error = Some(message);
        }
        false
    }

    /// Parses one object version against what the store holds for it.
    fn accept(&self, obj: DynamicObject) -> (String, Entry) {
        let key = key(&obj);
        let prev = self.objects.get(&key).cloned().unwrap_or_default();
        let rv = obj.metadata.resource_version.clone().unwrap_or_default();
        if !rv.is_empty() && prev.resource_version == rv {
            return (key, prev); // a re-list of an unchanged object: nothing to parse or say
        }
        let what = format!("{} {key}", self.kind.name());
        let mut entry = Entry {
            resource_version: rv,
            ..Entry::default()
        };
        match parse::parse_object(ORIGIN, self.json(obj)) {
            Ok(parsed) => {
                for w in parsed
                    .warnings
                    .iter()
                    .filter(|w| !prev.warnings.contains(w))
                {
                    if self.kind.written_by_cluster() {
                        debug!("{w}");
                    } else {
                        warn!("{w}");
                    }
                }
                entry.warnings = parsed.warnings;
                entry.resources = parsed.resources;
                for r in parsed.rejected {
                    match last_good_route(&prev.resources, &r.key) {
                        Some(mut route) => {
                            route.rejected = Some(r.error.clone());
                            entry.resources.push(Resource::Route(route));
                            entry.error =
                                Some(format!("{}; keeping its last good version", r.error));
                        }
                        None => {
                            entry.error = Some(format!(
                                "{}; not applied (no earlier good version)",
                                r.error
                            ))
                        }
                    }
                }
                if let Some(e) = keep_last_accepted_waypoint(&mut entry.resources, &prev.resources)
                {
                    entry.error = Some(e);
                }
            }
            Err(e) if prev.resources.is_empty() => {
                entry.error = Some(format!("{e}; not applied (no earlier good version)"));
            }
            Err(e) => {
                entry.error = Some(format!("{e}; keeping its last good version"));
                entry.resources = prev.resources.clone();
            }
        }
        match (&entry.error, &prev.error) {
            (Some(now), before) if Some(now) != before.as_ref() => error!("{now}"),
            (None, Some(_)) => info!("{what} is valid again"),
            _ => {}
        }
        (key, entry)
    }

    /// The object as the parser reads it. List items may come without `apiVersion`/`kind`
    /// (the API leaves them out of built-in lists), so they are set from the kind watched.
    fn json(&self, obj: DynamicObject) -> Value {
        let mut value = serde_json::to_value(obj).unwrap_or(Value::Null);
        if let Some(map) = value.as_object_mut() {
            let r = &self.kind.resource;
            map.insert("apiVersion".into(), Value::String(r.api_version.clone()));
            map.insert("kind".into(), Value::String(r.kind.clone()));
        }
        value
    }
}

/// `namespace/name`, or `name` for a cluster-scoped object.
fn key(obj: &DynamicObject) -> String {
    let name = obj.metadata.name.as_deref().unwrap_or_default();
    match obj.metadata.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

fn last_good_route(before: &[Resource], key: &str) -> Option<crate::resources::Route> {
    before.iter().find_map(|r| match r {
        Resource::Route(route) if route.key() == key => Some(route.clone()),
        _ => None,
    })
}

/// A waypoint Gateway whose new version is refused keeps its last accepted version (marked
/// with why), so a bad edit does not take a running waypoint away, as in the directory source.
/// Returns the error to report.
fn keep_last_accepted_waypoint(resources: &mut [Resource], before: &[Resource]) -> Option<String> {
    for r in resources.iter_mut() {
        let what = r.describe();
        let Resource::Gateway(g) = r else { continue };
        let Some(refusal) = Waypoint::from_gateway(g).and_then(|w| w.refusal) else {
            continue;
        };
        let message = format!("{ORIGIN} ({what}): {}", refusal.message);
        let last_accepted = before.iter().find_map(|old| match old {
            Resource::Gateway(o) if Waypoint::from_gateway(o).is_some_and(|w| w.accepted()) => {
                Some(o.clone())
            }
            _ => None,
        });
        let Some(mut old) = last_accepted else {
            return Some(format!(
                "{message}; not accepted (no earlier accepted version)"
            ));
        };
        old.refused_edit = Some(Refusal {
            reason: refusal.reason,
            message: message.clone(),
        });
        *r = Resource::Gateway(old);
        return Some(format!(
            "{message}; keeping its last accepted version in force"
        ));
    }
    None
}

/// What a watch failure means, and whether it is routine (a watch the API ended or expired,
/// which the watcher resumes on its own) rather than a problem to warn about.
fn describe_error(kind: &Kind, err: &watcher::Error) -> (bool, String) {
    let k = kind.describe();
    match err {
        watcher::Error::InitialListFailed(e) => (false, format!("cannot list {k}: {e}")),
        watcher::Error::WatchStartFailed(e) => (false, format!("cannot watch {k}: {e}")),
        watcher::Error::WatchError(s) if s.code == 410 => (
            true,
            format!(
                "the watch of {k} expired (410 Gone: {}); re-listing, keeping its objects until the list is complete",
                s.message
            ),
        ),
        watcher::Error::WatchError(s) => (
            false,
            format!("the API ended the watch of {k}: {} ({})", s.message, s.code),
        ),
        watcher::Error::WatchFailed(e) => (true, format!("the watch of {k} broke ({e}); resuming")),
        watcher::Error::NoResourceVersion => (
            false,
            format!("the API sent {k} objects without metadata.resourceVersion; re-listing"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::kinds;
    use kube::core::Status;
    use serde_json::json;
    use watcher::Event;

    fn store(name: &str) -> KindStore {
        let kind = kinds::watched()
            .into_iter()
            .find(|k| k.name() == name)
            .unwrap();
        KindStore::new(kind)
    }

    /// A policy as the API lists it (no apiVersion/kind on list items).
    fn policy(name: &str, rv: &str, action: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": rv,
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"action": action, "rules": [{}]}
        }))
        .unwrap()
    }

    fn route(name: &str, rv: &str, port: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": rv},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                     "rules": [{"backendRefs": [{"name": "web", "port": port}]}]}
        }))
        .unwrap()
    }

    fn names(s: &KindStore) -> Vec<String> {
        s.resources().map(Resource::describe).collect()
    }

    fn list(s: &mut KindStore, objs: Vec<DynamicObject>) -> bool {
        s.handle(Event::Init);
        for o in objs {
            s.handle(Event::InitApply(o));
        }
        s.handle(Event::InitDone)
    }

    #[test]
    fn a_relist_replaces_contents_only_when_complete() {
        let mut s = store("AuthorizationPolicy");
        assert!(!s.ready());
        assert!(list(
            &mut s,
            vec![policy("a", "1", "DENY"), policy("b", "2", "DENY")]
        ));
        assert!(s.ready());
        // A re-list in progress (after a 410) changes nothing that is published...
        s.handle(Event::Init);
        s.handle(Event::InitApply(policy("a", "1", "DENY")));
        assert_eq!(
            names(&s),
            ["AuthorizationPolicy shop/a", "AuthorizationPolicy shop/b"]
        );
        // ...and at its end, what the list no longer has is gone.
        assert!(s.handle(Event::InitDone));
        assert_eq!(names(&s), ["AuthorizationPolicy shop/a"]);
        // An identical re-list is no change.
        assert!(!list(&mut s, vec![policy("a", "1", "DENY")]));
    }

    #[test]
    fn a_refused_version_keeps_the_last_good_one() {
        let mut s = store("AuthorizationPolicy");
        list(&mut s, vec![policy("a", "1", "DENY")]);
        assert!(!s.handle(Event::Apply(policy("a", "2", "REJECT"))));
        assert_eq!(names(&s), ["AuthorizationPolicy shop/a"]);
        let e = s.objects["shop/a"].error.clone().unwrap();
        assert!(
            e.starts_with("Kubernetes API (AuthorizationPolicy shop/a): spec.action")
                && e.ends_with("keeping its last good version"),
            "{e}"
        );
        // One never good is not applied.
        assert!(!s.handle(Event::Apply(policy("new", "3", "REJECT"))));
        assert_eq!(names(&s), ["AuthorizationPolicy shop/a"]);
        // Fixed: the new version applies.
        assert!(s.handle(Event::Apply(policy("a", "4", "ALLOW"))));
        assert!(s.objects["shop/a"].error.is_none());
    }

    #[test]
    fn a_refused_route_edit_keeps_the_last_good_route_marked() {
        let mut s = store("HTTPRoute");
        list(&mut s, vec![route("r", "1", json!(80))]);
        s.handle(Event::Apply(route("r", "2", json!(0))));
        let kept: Vec<_> = s.resources().collect();
        let [Resource::Route(r)] = kept.as_slice() else {
            panic!("{kept:?}")
        };
        assert_eq!(r.spec["rules"][0]["backendRefs"][0]["port"], 80);
        assert!(
            r.rejected
                .as_deref()
                .is_some_and(|e| e.contains("HTTPRoute shop/r"))
        );
    }

    #[test]
    fn an_absent_crd_has_no_objects_but_a_required_kind_waits() {
        let not_found = || {
            watcher::Error::InitialListFailed(kube::Error::Api(
                Status::failure(
                    "the server could not find the requested resource",
                    "NotFound",
                )
                .with_code(404)
                .boxed(),
            ))
        };
        let mut ap = store("AuthorizationPolicy");
        assert!(ap.failed(&not_found()));
        assert!(ap.ready() && *ap.phase() == Phase::Absent);
        assert!(!ap.failed(&not_found()), "reported and changed once");
        list(&mut ap, vec![policy("a", "1", "DENY")]);
        assert_eq!(*ap.phase(), Phase::Listed);
        // The CRD removed: its objects go with it.
        assert!(ap.failed(&not_found()));
        assert_eq!(names(&ap), Vec::<String>::new());
        let mut pods = store("Pod");
        assert!(!pods.failed(&not_found()));
        assert!(!pods.ready());
        let unreachable = watcher::Error::InitialListFailed(kube::Error::Api(
            Status::failure("down", "ServiceUnavailable")
                .with_code(503)
                .boxed(),
        ));
        assert!(!ap.failed(&unreachable) || ap.ready());
    }
}
