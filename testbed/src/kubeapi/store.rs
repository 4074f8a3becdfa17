//! The object store: every object as JSON per (group, resource, namespace, name), the global
//! resourceVersion, the event history watches replay from, and the write rules the real
//! server applies (server-set metadata, optimistic concurrency, the status subresource,
//! generation, finalizers, namespace and ownerReference cascades). Callers hold the lock;
//! nothing here does I/O or knows HTTP.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::apply;
use super::defaults::{self, ServiceIps};
use super::errors::ApiErr;
use super::kinds::{Kind, Registry, ResKey};
use super::meta;
use super::tokens::Tokens;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as watches replay and stream it.
#[derive(Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub key: ResKey,
    pub namespace: String,
    pub etype: EventType,
    pub obj: Value,
    /// The object before a modification (selector transitions need it).
    pub old: Option<Value>,
}

/// Which part of an update the caller may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The main endpoint: everything but `status` on kinds with the status subresource.
    Main,
    /// `/status`: only `status`.
    Status,
    /// Everything (the Rust `put`).
    All,
}

/// How a delete treats dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Propagation {
    Background,
    Orphan,
}

type ObjKey = (String, String);

pub(crate) struct State {
    pub rv: u64,
    pub kinds: Registry,
    objects: BTreeMap<ResKey, BTreeMap<ObjKey, Value>>,
    uids: HashMap<String, (ResKey, ObjKey)>,
    events: VecDeque<Arc<Event>>,
    window: usize,
    /// Watches must resume from at least this RV (events at or before it are forgotten).
    pub horizon: u64,
    pub tx: broadcast::Sender<Arc<Event>>,
    pub tokens: Tokens,
    ips: ServiceIps,
}

impl State {
    pub fn new(window: usize, ips: ServiceIps) -> Self {
        let (tx, _) = broadcast::channel(16_384);
        State {
            rv: 0,
            kinds: Registry::new(),
            objects: BTreeMap::new(),
            uids: HashMap::new(),
            events: VecDeque::new(),
            window: window.max(1),
            horizon: 0,
            tx,
            tokens: Tokens::default(),
            ips,
        }
    }

    fn emit(&mut self, key: &ResKey, etype: EventType, obj: Value, old: Option<Value>) {
        let ev = Arc::new(Event {
            rv: self.rv,
            key: key.clone(),
            namespace: obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            etype,
            obj,
            old,
        });
        self.events.push_back(ev.clone());
        while self.events.len() > self.window {
            if let Some(e) = self.events.pop_front() {
                self.horizon = e.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(ev);
    }

    /// Events after `rv` (the caller checked `rv >= horizon`).
    pub fn events_after(&self, rv: u64) -> Vec<Arc<Event>> {
        let start = self.events.partition_point(|e| e.rv <= rv);
        self.events.iter().skip(start).cloned().collect()
    }

    pub fn compact(&mut self) {
        self.events.clear();
        self.horizon = self.rv;
    }

    pub fn get(&self, kind: &Kind, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&kind.key())?
            .get(&(ns.to_string(), name.to_string()))
    }

    /// Objects of a kind in `ns` (all namespaces: `None`), in key order, after `after`.
    pub fn list(&self, kind: &Kind, ns: Option<&str>) -> Vec<&Value> {
        let Some(objs) = self.objects.get(&kind.key()) else {
            return Vec::new();
        };
        match ns {
            Some(ns) => objs
                .range((ns.to_string(), String::new())..)
                .take_while(|((n, _), _)| n == ns)
                .map(|(_, v)| v)
                .collect(),
            None => objs.values().collect(),
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn taken_ips(&self) -> HashSet<IpAddr> {
        let svc = ("".to_string(), "services".to_string());
        self.objects
            .get(&svc)
            .into_iter()
            .flat_map(|m| m.values())
            .flat_map(defaults::service_ips)
            .collect()
    }

    /// POST semantics. `ns`: the request's namespace (namespaced kinds). `manager`: records
    /// an Update entry in managedFields (apply passes `None`, having recorded its own).
    pub fn create(
        &mut self,
        kind: &Kind,
        version: &str,
        ns: Option<&str>,
        mut obj: Value,
        manager: Option<&str>,
    ) -> Result<Value, ApiErr> {
        if !obj.is_object() || !obj["metadata"].is_object() && !obj["metadata"].is_null() {
            return Err(ApiErr::bad_request(
                "the body must be a JSON object with metadata",
            ));
        }
        let ns = self.check_namespace(kind, ns, &mut obj)?;
        let meta = obj["metadata"].as_object().cloned().unwrap_or_default();
        let name = match (
            meta.get("name").and_then(Value::as_str),
            meta.get("generateName"),
        ) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(Value::String(prefix))) => {
                let mut n;
                loop {
                    n = format!("{prefix}{}", meta::name_suffix());
                    if !self.exists(kind, &ns, &n) {
                        break;
                    }
                }
                n
            }
            _ => {
                return Err(ApiErr::invalid(
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
        };
        if !meta::valid_name(&name) {
            return Err(ApiErr::invalid(format!(
                "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
            )));
        }
        if kind.namespaced && !self.namespace_exists(&ns) {
            return Err(ApiErr::not_found("namespaces", &ns));
        }
        if self.exists(kind, &ns, &name) {
            return Err(ApiErr::already_exists(&kind.resource_name(), &name));
        }
        obj["apiVersion"] = json!(kind.api_version(version));
        obj["kind"] = json!(kind.kind);
        let now = meta::now_rfc3339();
        let m = &mut obj["metadata"];
        m["name"] = json!(name);
        for server_set in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "resourceVersion",
        ] {
            if let Some(o) = m.as_object_mut() {
                o.remove(server_set);
            }
        }
        m["uid"] = json!(meta::uid());
        m["creationTimestamp"] = json!(now);
        m["generation"] = json!(1);
        defaults::initial_status(&kind.kind, &mut obj);
        match kind.kind.as_str() {
            "Service" if kind.group.is_empty() => {
                let taken = self.taken_ips();
                self.ips.on_create(&mut obj, &taken)?;
            }
            "CustomResourceDefinition" => {
                let crd = super::kinds::crd_kind(&obj).map_err(ApiErr::invalid)?;
                if let Some(k) = self.kinds.by_key(&crd.key())
                    && !k.from_crd
                {
                    return Err(ApiErr::invalid(format!(
                        "spec.names.plural: {} is a built-in resource",
                        crd.plural
                    )));
                }
                defaults::crd_status(&mut obj, &crd.versions[0], &now);
            }
            _ => {}
        }
        if let Some(mgr) = manager {
            apply::record_update(None, &mut obj, mgr, &now);
        }
        if kind.kind == "CustomResourceDefinition" {
            self.kinds.register_crd(&obj).map_err(ApiErr::invalid)?;
        }
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.insert(kind, &ns, &name, obj.clone());
        self.emit(&kind.key(), EventType::Added, obj.clone(), None);
        Ok(obj)
    }

    /// The namespace a write lands in; refuses a body naming another one.
    fn check_namespace(
        &self,
        kind: &Kind,
        ns: Option<&str>,
        obj: &mut Value,
    ) -> Result<String, ApiErr> {
        if !kind.namespaced {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            return Ok(String::new());
        }
        let body_ns = obj["metadata"]["namespace"].as_str().map(str::to_string);
        let ns = match (ns, body_ns) {
            (Some(u), Some(b)) if !b.is_empty() && u != b => {
                return Err(ApiErr::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(u), _) => u.to_string(),
            (None, Some(b)) if !b.is_empty() => b,
            _ => "default".to_string(),
        };
        obj["metadata"]["namespace"] = json!(ns);
        Ok(ns)
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.objects
            .get(&(String::new(), "namespaces".to_string()))
            .is_some_and(|m| m.contains_key(&(String::new(), ns.to_string())))
    }

    fn exists(&self, kind: &Kind, ns: &str, name: &str) -> bool {
        self.get(kind, ns, name).is_some()
    }

    fn insert(&mut self, kind: &Kind, ns: &str, name: &str, obj: Value) {
        if let Some(uid) = obj["metadata"]["uid"].as_str() {
            self.uids.insert(
                uid.to_string(),
                (kind.key(), (ns.to_string(), name.to_string())),
            );
        }
        self.objects
            .entry(kind.key())
            .or_default()
            .insert((ns.to_string(), name.to_string()), obj);
    }

    /// PUT semantics (and the last step of PATCH and apply). `precondition`: a non-empty
    /// `metadata.resourceVersion` in `new` must be the current one.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        kind: &Kind,
        version: &str,
        ns: &str,
        name: &str,
        mut new: Value,
        part: Part,
        manager: Option<&str>,
    ) -> Result<Value, ApiErr> {
        let Some(old) = self.get(kind, ns, name).cloned() else {
            return Err(ApiErr::not_found(&kind.resource_name(), name));
        };
        if !new.is_object() {
            return Err(ApiErr::bad_request("the body must be a JSON object"));
        }
        if let Some(given) = new["metadata"]["resourceVersion"].as_str()
            && !given.is_empty()
            && Some(given) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiErr::stale(&kind.resource_name(), name));
        }
        match new["metadata"]["name"].as_str() {
            Some(n) if n != name => {
                return Err(ApiErr::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        if kind.namespaced
            && let Some(n) = new["metadata"]["namespace"].as_str()
            && !n.is_empty()
            && n != ns
        {
            return Err(ApiErr::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut merged = match part {
            Part::Status => {
                let mut m = old.clone();
                m["status"] = new["status"].take();
                m
            }
            Part::Main if kind.status => {
                new["status"] = old["status"].clone();
                new
            }
            _ => new,
        };
        if merged["status"].is_null()
            && let Some(o) = merged.as_object_mut()
        {
            o.remove("status");
        }
        merged["apiVersion"] = json!(kind.api_version(version));
        merged["kind"] = json!(kind.kind);
        if !merged["metadata"].is_object() {
            merged["metadata"] = json!({});
        }
        let om = &old["metadata"];
        let m = &mut merged["metadata"];
        m["name"] = json!(name);
        if kind.namespaced {
            m["namespace"] = json!(ns);
        }
        for kept in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match om.get(kept) {
                Some(v) => m[kept] = v.clone(),
                None => {
                    if let Some(o) = m.as_object_mut() {
                        o.remove(kept);
                    }
                }
            }
        }
        if kind.kind == "Service" && kind.group.is_empty() {
            defaults::service_on_update(&old, &mut merged)?;
        }
        if meta::spec_changed(&old, &merged, kind.status) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            merged["metadata"]["generation"] = json!(g);
        }
        if kind.kind == "CustomResourceDefinition" && part != Part::Status {
            let crd = super::kinds::crd_kind(&merged).map_err(ApiErr::invalid)?;
            if crd.key() != kind_key_of_crd(&old) {
                return Err(ApiErr::invalid("spec.names and spec.group are immutable"));
            }
        }
        if meta::same_object(&old, &merged) {
            return Ok(old);
        }
        let now = meta::now_rfc3339();
        if let Some(mgr) = manager {
            apply::record_update(Some(&old), &mut merged, mgr, &now);
        }
        if kind.kind == "CustomResourceDefinition" {
            self.kinds.register_crd(&merged).map_err(ApiErr::invalid)?;
        }
        let rv = self.next_rv();
        merged["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.insert(kind, ns, name, merged.clone());
        if finalizable(&merged) {
            // The write that drops the last finalizer deletes the object (one DELETED event,
            // as the real server does it in the same transaction).
            return Ok(self.remove(kind, ns, name).unwrap_or(merged));
        }
        self.emit(&kind.key(), EventType::Modified, merged.clone(), Some(old));
        Ok(merged)
    }

    /// DELETE semantics: with finalizers, marks the object (deletionTimestamp) and returns it;
    /// otherwise removes it and collects dependents.
    pub fn delete(
        &mut self,
        kind: &Kind,
        ns: &str,
        name: &str,
        propagation: Propagation,
        precondition: &Value,
    ) -> Result<Value, ApiErr> {
        let Some(obj) = self.get(kind, ns, name).cloned() else {
            return Err(ApiErr::not_found(&kind.resource_name(), name));
        };
        for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = precondition[field].as_str()
                && Some(want) != obj["metadata"][field].as_str()
            {
                return Err(ApiErr::conflict(
                    &kind.resource_name(),
                    name,
                    &format!(
                        "Precondition failed: {what} in precondition: {want}, {what} in object meta: {}",
                        obj["metadata"][field].as_str().unwrap_or_default()
                    ),
                ));
            }
        }
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if propagation == Propagation::Orphan {
            self.orphan_dependents(&uid);
        }
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if !obj["metadata"]["deletionTimestamp"].is_null() {
                return Ok(obj);
            }
            let mut marked = obj.clone();
            marked["metadata"]["deletionTimestamp"] = json!(meta::now_rfc3339());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            let g = obj["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            marked["metadata"]["generation"] = json!(g);
            let rv = self.next_rv();
            marked["metadata"]["resourceVersion"] = json!(rv.to_string());
            self.insert(kind, ns, name, marked.clone());
            self.emit(&kind.key(), EventType::Modified, marked.clone(), Some(obj));
            return Ok(marked);
        }
        Ok(self.remove(kind, ns, name).unwrap_or(obj))
    }

    /// Takes an object out for good (DELETED with a new RV) and runs the cascades: a
    /// namespace's contents, a CRD's objects, dependents whose every owner is gone.
    fn remove(&mut self, kind: &Kind, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self
            .objects
            .get_mut(&kind.key())?
            .remove(&(ns.to_string(), name.to_string()))?;
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.uids.remove(&uid);
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit(&kind.key(), EventType::Deleted, obj.clone(), None);
        if kind.group.is_empty() && kind.plural == "namespaces" {
            self.delete_namespace_contents(name);
        }
        if kind.kind == "CustomResourceDefinition" {
            let key = kind_key_of_crd(&obj);
            if let Some(crd_kind) = self.kinds.by_key(&key).cloned() {
                let all: Vec<ObjKey> = self
                    .objects
                    .get(&key)
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                for (ons, oname) in all {
                    self.remove(&crd_kind, &ons, &oname);
                }
            }
            self.kinds.unregister_crd(&key);
        }
        self.collect_dependents(&uid);
        Some(obj)
    }

    fn delete_namespace_contents(&mut self, ns: &str) {
        let kinds: Vec<Kind> = self
            .objects
            .keys()
            .filter_map(|k| self.kinds.by_key(k).filter(|k| k.namespaced).cloned())
            .collect();
        for kind in kinds {
            let names: Vec<String> = self
                .list(&kind, Some(ns))
                .iter()
                .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
                .collect();
            for name in names {
                let _ = self.delete(&kind, ns, &name, Propagation::Background, &Value::Null);
            }
        }
    }

    /// Objects that name `uid` as an owner: (kind, namespace, name, object).
    fn dependents(&self, uid: &str) -> Vec<(Kind, String, String, Value)> {
        let mut out = Vec::new();
        for (key, objs) in &self.objects {
            let Some(kind) = self.kinds.by_key(key) else {
                continue;
            };
            for ((ns, name), obj) in objs {
                let owned = obj["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid));
                if owned {
                    out.push((kind.clone(), ns.clone(), name.clone(), obj.clone()));
                }
            }
        }
        out
    }

    /// Background garbage collection: dependents whose every owner is gone are deleted.
    fn collect_dependents(&mut self, uid: &str) {
        if uid.is_empty() {
            return;
        }
        for (kind, ns, name, obj) in self.dependents(uid) {
            let orphaned = obj["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|r| r["uid"].as_str().is_none_or(|u| !self.uids.contains_key(u)));
            if orphaned {
                let _ = self.delete(&kind, &ns, &name, Propagation::Background, &Value::Null);
            }
        }
    }

    /// Orphan propagation: dependents lose their reference to `uid` and stay.
    fn orphan_dependents(&mut self, uid: &str) {
        for (kind, ns, name, mut obj) in self.dependents(uid) {
            if let Some(refs) = obj["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| r["uid"] != uid);
            }
            let version = kind.versions[0].clone();
            let _ = self.update(&kind, &version, &ns, &name, obj, Part::All, None);
        }
    }

    /// Direct `put`: create, or replace everything without a precondition.
    pub fn put(&mut self, kind: &Kind, version: &str, mut obj: Value) -> Result<Value, ApiErr> {
        let ns = if kind.namespaced {
            obj["metadata"]["namespace"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if self.exists(kind, &ns, &name) {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            self.update(kind, version, &ns, &name, obj, Part::All, None)
        } else {
            self.create(
                kind,
                version,
                Some(&ns).filter(|_| kind.namespaced).map(|s| s.as_str()),
                obj,
                None,
            )
        }
    }
}

/// Deleting and no finalizer left: the object goes.
fn finalizable(obj: &Value) -> bool {
    !obj["metadata"]["deletionTimestamp"].is_null()
        && obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty())
}

/// The (group, plural) a CRD object registers.
fn kind_key_of_crd(crd: &Value) -> ResKey {
    (
        crd["spec"]["group"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        crd["spec"]["names"]["plural"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}
