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

mod cascade;
mod update;

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
    /// Owner uid → its dependents (garbage collection without scanning every object).
    dependents: HashMap<String, HashSet<(ResKey, ObjKey)>>,
    /// Cluster IPs Services hold (allocation without scanning every Service).
    taken_ips: HashSet<IpAddr>,
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
            dependents: HashMap::new(),
            taken_ips: HashSet::new(),
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
                self.ips.on_create(&mut obj, &self.taken_ips)?;
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

    /// Stores `obj` at its key, keeping the uid, owner and cluster IP indexes in step.
    fn insert(&mut self, kind: &Kind, ns: &str, name: &str, obj: Value) {
        let okey = (ns.to_string(), name.to_string());
        if let Some(old) = self
            .objects
            .get(&kind.key())
            .and_then(|m| m.get(&okey))
            .cloned()
        {
            self.unindex(kind, &okey, &old);
        }
        let at = (kind.key(), okey.clone());
        if let Some(uid) = obj["metadata"]["uid"].as_str() {
            self.uids.insert(uid.to_string(), at.clone());
        }
        for owner in owner_uids(&obj) {
            self.dependents.entry(owner).or_default().insert(at.clone());
        }
        if is_service(kind) {
            self.taken_ips.extend(defaults::service_ips(&obj));
        }
        self.objects
            .entry(kind.key())
            .or_default()
            .insert(okey, obj);
    }

    /// Takes an object out of the map and the indexes (no event).
    fn take(&mut self, kind: &Kind, ns: &str, name: &str) -> Option<Value> {
        let okey = (ns.to_string(), name.to_string());
        let obj = self.objects.get_mut(&kind.key())?.remove(&okey)?;
        self.unindex(kind, &okey, &obj);
        if let Some(uid) = obj["metadata"]["uid"].as_str() {
            self.uids.remove(uid);
        }
        Some(obj)
    }

    fn unindex(&mut self, kind: &Kind, okey: &ObjKey, obj: &Value) {
        let at = (kind.key(), okey.clone());
        for owner in owner_uids(obj) {
            if let Some(set) = self.dependents.get_mut(&owner) {
                set.remove(&at);
                if set.is_empty() {
                    self.dependents.remove(&owner);
                }
            }
        }
        if is_service(kind) {
            for ip in defaults::service_ips(obj) {
                self.taken_ips.remove(&ip);
            }
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

fn is_service(kind: &Kind) -> bool {
    kind.group.is_empty() && kind.plural == "services"
}

/// The uids an object names in `metadata.ownerReferences`.
fn owner_uids(obj: &Value) -> Vec<String> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str().map(str::to_string))
        .collect()
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
