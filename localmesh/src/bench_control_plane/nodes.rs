//! The bench's subscribers, one per node: each applies meshd's updates to its own copy and
//! marks the pending changes it now holds. Also what a view's bytes are made of, and the
//! whole mesh as one message (the yardstick for "each node gets only what it needs").

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshcore::proto::config::config_service_client::ConfigServiceClient;
use meshcore::proto::config::{ConfigUpdate, Policy, RouteResource, SubscribeRequest};
use meshcore::store::ConfigStore;
use prost::Message;
use serde_json::Value;
use testbed::kubeapi::synth::{self, Effect, Synth};

/// Bytes of a view by what they carry.
#[derive(Debug, Default, Clone, Copy)]
pub struct Parts {
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
    /// Policies ztunnel does not enforce: attached to a waypoint (`targetRef(s)`), and
    /// RequestAuthentications (JWT is checked by waypoints only).
    pub waypoint_policies: usize,
    pub waypoint_policy_count: usize,
}

impl Parts {
    fn of(u: &ConfigUpdate) -> Parts {
        let sum = |v: &mut dyn Iterator<Item = usize>| v.sum::<usize>();
        let waypoint_only: Vec<&Policy> = u
            .policies
            .iter()
            .filter(|p| {
                p.kind == "RequestAuthentication"
                    || serde_json::from_str::<Value>(&p.spec_json)
                        .is_ok_and(|s| !s["targetRef"].is_null() || !s["targetRefs"].is_null())
            })
            .collect();
        Parts {
            workloads: sum(&mut u.workloads.iter().map(Message::encoded_len)),
            services: sum(&mut u.services.iter().map(Message::encoded_len)),
            policies: sum(&mut u.policies.iter().map(Message::encoded_len)),
            waypoint_policies: sum(&mut waypoint_only.iter().map(|p| p.encoded_len())),
            waypoint_policy_count: waypoint_only.len(),
        }
    }
}

/// One node's subscriber: its copy of the config, and what it has received.
pub(super) struct Node {
    pub(super) name: String,
    pub(super) store: Mutex<ConfigStore>,
    pub(super) first_view: Mutex<Option<(Instant, usize, Parts)>>,
    pub(super) bytes: Mutex<usize>,
    pub(super) failed: Mutex<Option<String>>,
}

/// Changes on their way, and (kind, delay) of those every affected node has seen.
pub(super) type PendingList = Arc<Mutex<Vec<Pending>>>;
pub(super) type Seen = Arc<Mutex<Vec<(&'static str, Duration)>>>;

/// A change waiting to be seen by every affected node.
pub(super) struct Pending {
    pub(super) effect: Effect,
    pub(super) kind: &'static str,
    pub(super) written: Instant,
    pub(super) waiting: BTreeSet<String>,
}

/// Subscribes (retrying until meshd listens) and applies every update, checking which pending
/// changes this node now holds.
pub(super) async fn subscribe(
    sock: PathBuf,
    token: String,
    (node, pending, done): (Arc<Node>, PendingList, Seen),
) {
    let fail = |why: String| *node.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    let channel = loop {
        match connect(&sock).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let mut client = ConfigServiceClient::new(channel).max_decoding_message_size(1 << 30);
    let mut req = tonic::Request::new(SubscribeRequest {
        node: node.name.clone(),
        ..Default::default()
    });
    match format!("Bearer {token}").parse() {
        Ok(v) => req.metadata_mut().insert("authorization", v),
        Err(_) => return fail("token is not a header value".into()),
    };
    let mut stream = match client.subscribe(req).await {
        Ok(s) => s.into_inner(),
        Err(e) => return fail(format!("subscribe: {e}")),
    };
    loop {
        let update = match stream.message().await {
            Ok(Some(u)) => u,
            Ok(None) => return fail("stream ended".into()),
            Err(e) => return fail(format!("stream: {e}")),
        };
        let now = Instant::now();
        let bytes = update.encoded_len();
        *node.bytes.lock().unwrap_or_else(|p| p.into_inner()) += bytes;
        {
            let mut first = node.first_view.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some((now, bytes, Parts::of(&update)));
            }
        }
        let mut store = node.store.lock().unwrap_or_else(|p| p.into_inner());
        store.apply(update);
        let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
        p.retain_mut(|c| {
            if c.waiting.contains(&node.name) && holds(&store, &c.effect) {
                c.waiting.remove(&node.name);
            }
            if c.waiting.is_empty() {
                done.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((c.kind, now.duration_since(c.written)));
                return false;
            }
            true
        });
    }
}

async fn connect(sock: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = sock.to_path_buf();
    tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
}

/// Whether a node's store shows the change.
fn holds(store: &ConfigStore, effect: &Effect) -> bool {
    match effect {
        Effect::Workload {
            uid,
            present,
            marker,
        } => match (store.workload(uid), present) {
            (None, false) => true,
            (Some(w), true) => marker
                .as_ref()
                .is_none_or(|m| w.labels.get(synth::CHURN_LABEL) == Some(m)),
            _ => false,
        },
        Effect::Policy {
            key,
            present,
            marker,
            ..
        } => {
            let p = store.policies().find(|p| &p.key == key);
            match (p, present) {
                (None, false) => true,
                (Some(p), true) => marker.as_ref().is_none_or(|m| p.spec_json.contains(m)),
                _ => false,
            }
        }
    }
}

pub(super) fn same_object(a: &Effect, b: &Effect) -> bool {
    match (a, b) {
        (Effect::Workload { uid: x, .. }, Effect::Workload { uid: y, .. }) => x == y,
        (Effect::Policy { key: x, .. }, Effect::Policy { key: y, .. }) => x == y,
        _ => false,
    }
}

/// The whole mesh as one snapshot: every workload as its own node holds it (annotations
/// included), every Service, every policy and route resource of the cluster. What a node
/// would get if meshd did not narrow the view per node.
pub(super) fn whole_mesh(nodes: &[Arc<Node>], synth: &Synth) -> ConfigUpdate {
    let mut workloads = BTreeMap::new();
    let mut services = BTreeMap::new();
    let mut trust_bundle = None;
    for n in nodes {
        let s = n.store.lock().unwrap_or_else(|p| p.into_inner());
        for w in s.workloads() {
            let own = w.node == n.name;
            if own || !workloads.contains_key(&w.uid) {
                workloads.insert(w.uid.clone(), (**w).clone());
            }
        }
        for svc in s.services() {
            services.insert(svc.key.clone(), (**svc).clone());
        }
        if trust_bundle.is_none() {
            trust_bundle = s.trust_bundle().cloned();
        }
    }
    let policies = synth
        .policies
        .values()
        .map(|p| Policy {
            key: p.key(),
            kind: p.kind.to_string(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            spec_json: p.spec.to_string(),
        })
        .collect();
    let routes = synth
        .others
        .iter()
        .filter(|o| o["kind"] != "Gateway")
        .enumerate()
        .map(|(i, o)| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            let (kind, ns, name) = (
                s(&o["kind"]),
                s(&o["metadata"]["namespace"]),
                s(&o["metadata"]["name"]),
            );
            RouteResource {
                key: format!("{kind}/{ns}/{name}"),
                kind,
                namespace: ns,
                name,
                spec_json: o["spec"].to_string(),
                generation_order: i as i64,
            }
        })
        .collect();
    ConfigUpdate {
        snapshot: true,
        workloads: workloads.into_values().collect(),
        services: services.into_values().collect(),
        policies,
        routes,
        trust_bundle,
        ..Default::default()
    }
}
