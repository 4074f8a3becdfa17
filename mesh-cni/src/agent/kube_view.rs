//! The Kube view: kube-runtime reflectors on this node's pods (field selector
//! `spec.nodeName=<node>`) and on all namespaces; a direct GET of a pod and its namespace on a
//! miss (a sandbox is created before the watch may have shown its pod); annotation patches
//! through `pods/status`; a watch of exactly the agent's own DaemonSet for the uninstall
//! trigger. Owns the agent's API calls; nothing here decides enrollment.
//!
//! The uninstall trigger is the annotation `mesh.dev/uninstall: "true"` on that DaemonSet, not
//! an object anyone could create: an uninstall strips capture from every pod of every node
//! (STRICT and DENY no longer apply), so only a principal that may patch the agent's DaemonSet
//! — who could replace the agent anyway — may start one. A missing or unreadable DaemonSet, or
//! any other value, is not a request (logged once, with what to fix).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::view::{PodFacts, Snapshot, ViewError, namespace_label, pod_facts};

/// On the agent's DaemonSet, `"true"` starts an uninstall on every node.
pub const UNINSTALL_ANNOTATION: &str = "mesh.dev/uninstall";
/// Field manager of the agent's writes.
const MANAGER: &str = "mesh-cni";

pub struct KubeView {
    client: kube::Client,
    node: String,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    tx: Arc<watch::Sender<u64>>,
    trigger: watch::Receiver<Trigger>,
}

/// What the agent's DaemonSet says about an uninstall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Not read yet.
    Unknown,
    /// The first read failed (the error): not a request.
    Unreadable(String),
    /// No such DaemonSet: not a request.
    Absent,
    /// The annotation is absent or `"false"`.
    No,
    /// The annotation holds something else (the value): not a request.
    Garbage(String),
    Requested,
}

/// Whether a watched object is the agent's DaemonSet (the selector is the server's; the
/// decision is ours).
fn is_ours(obj: &DynamicObject, namespace: &str, name: &str) -> bool {
    obj.metadata.name.as_deref() == Some(name)
        && obj.metadata.namespace.as_deref() == Some(namespace)
}

/// The trigger an object of the watch carries.
pub fn trigger_of(obj: &DynamicObject, namespace: &str, name: &str) -> Trigger {
    if !is_ours(obj, namespace, name) {
        return Trigger::Absent;
    }
    match obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(UNINSTALL_ANNOTATION))
        .map(String::as_str)
    {
        None | Some("false") => Trigger::No,
        Some("true") => Trigger::Requested,
        Some(other) => Trigger::Garbage(other.chars().take(64).collect()),
    }
}

impl KubeView {
    /// Starts the watchers (on the current runtime); [`Self::ready`] waits for their lists.
    /// `daemonset` (in `mesh_namespace`) is the agent's own, whose annotation is the uninstall
    /// trigger.
    pub fn start(
        client: kube::Client,
        node: String,
        mesh_namespace: String,
        daemonset: String,
    ) -> KubeView {
        let (tx, _) = watch::channel(0u64);
        let tx = Arc::new(tx);
        let (pods, pod_writer) = reflector::store();
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let stream = reflector::reflector(
            pod_writer,
            watcher(Api::<Pod>::all(client.clone()), cfg).default_backoff(),
        );
        tokio::spawn(drive(stream, tx.clone(), "pods"));
        let (namespaces, ns_writer) = reflector::store();
        let stream = reflector::reflector(
            ns_writer,
            watcher(Api::<Namespace>::all(client.clone()), Default::default()).default_backoff(),
        );
        tokio::spawn(drive(stream, tx.clone(), "namespaces"));
        let (trigger_tx, trigger) = watch::channel(Trigger::Unknown);
        tokio::spawn(watch_trigger(
            client.clone(),
            mesh_namespace,
            daemonset,
            trigger_tx,
        ));
        KubeView {
            client,
            node,
            pods,
            namespaces,
            tx,
            trigger,
        }
    }

    /// The pod and namespace lists are read, and the DaemonSet once (or its read failed: an
    /// agent without that right still enrolls pods).
    pub async fn ready(&self) {
        let _ = self.pods.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        let mut trigger = self.trigger.clone();
        let _ = trigger.wait_for(|t| *t != Trigger::Unknown).await;
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for ns in self.namespaces.state() {
            if let Some((name, label)) = to_value(&*ns).as_ref().and_then(namespace_label) {
                s.namespaces.insert(name, label);
            }
        }
        for pod in self.pods.state() {
            if let Some(facts) = self.facts(&pod) {
                s.pods
                    .insert((facts.namespace.clone(), facts.name.clone()), facts);
            }
        }
        s
    }

    /// A pod's facts if it is on this node (the watch's selector, checked again for GETs).
    fn facts(&self, pod: &Pod) -> Option<PodFacts> {
        let facts = pod_facts(&to_value(pod)?, "default")?;
        (facts.node.as_deref() == Some(self.node.as_str())).then_some(facts)
    }

    /// Direct GETs of the pod and its namespace.
    pub async fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<(PodFacts, Option<String>)>, ViewError> {
        let api = |e: kube::Error| ViewError::Api(e.to_string());
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(api)?;
        let Some(facts) = pod.as_ref().and_then(|p| self.facts(p)) else {
            return Ok(None);
        };
        let ns = Api::<Namespace>::all(self.client.clone())
            .get_opt(namespace)
            .await
            .map_err(api)?;
        let Some((_, label)) = ns
            .as_ref()
            .and_then(to_value)
            .as_ref()
            .and_then(namespace_label)
        else {
            return Ok(None);
        };
        Ok(Some((facts, label)))
    }

    /// Merge-patches one annotation through `pods/status`, retried a few times.
    pub async fn annotate(&self, namespace: &str, name: &str, key: &str, value: Option<&str>) {
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let body = serde_json::json!({"metadata": {"annotations": {key: value}}});
        let params = PatchParams {
            field_manager: Some(MANAGER.to_string()),
            ..Default::default()
        };
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=5 {
            match api.patch_status(name, &params, &Patch::Merge(&body)).await {
                Ok(_) => return,
                Err(kube::Error::Api(s)) if s.code == 404 => return,
                Err(e) => {
                    tracing::warn!(pod = %format!("{namespace}/{name}"), %key, attempt, error = %e, "annotating the pod failed")
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }

    /// What the DaemonSet's watch last said (no request made here).
    pub fn uninstall_requested(&self) -> bool {
        *self.trigger.borrow() == Trigger::Requested
    }

    /// Changes of the trigger, to act on a request without polling.
    pub fn trigger_changes(&self) -> watch::Receiver<Trigger> {
        self.trigger.clone()
    }
}

/// Watches exactly one DaemonSet (field selector `metadata.name`, which `resourceNames` RBAC
/// allows) and publishes its trigger. A failed read keeps what was known (an API blip is not a
/// request nor a cancellation); each new state and each new error is logged once.
async fn watch_trigger(
    client: kube::Client,
    namespace: String,
    name: String,
    tx: watch::Sender<Trigger>,
) {
    let ar = ApiResource::erase::<DaemonSet>(&());
    // Only metadata is parsed: nothing in the DaemonSet's spec can break the trigger's read.
    let api = Api::<DynamicObject>::namespaced_with(client, &namespace, &ar);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(api, cfg).default_backoff());
    let what = format!("DaemonSet {namespace}/{name}");
    // Between Init and InitDone: what the relist has shown so far.
    let mut listing = Trigger::Absent;
    let mut last_error: Option<String> = None;
    let publish = |t: Trigger| {
        if *tx.borrow() != t {
            log_trigger(&what, &namespace, &t);
            tx.send_replace(t);
        }
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Trigger::Absent,
            Ok(watcher::Event::InitApply(obj)) if is_ours(&obj, &namespace, &name) => {
                listing = trigger_of(&obj, &namespace, &name)
            }
            Ok(watcher::Event::InitDone) => {
                last_error = None;
                publish(std::mem::replace(&mut listing, Trigger::Absent));
            }
            Ok(watcher::Event::Apply(obj)) if is_ours(&obj, &namespace, &name) => {
                publish(trigger_of(&obj, &namespace, &name))
            }
            Ok(watcher::Event::Delete(obj)) if is_ours(&obj, &namespace, &name) => {
                publish(Trigger::Absent)
            }
            // Another object, whatever the server sent: not ours to read.
            Ok(_) => {}
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    let hint = match &e {
                        watcher::Error::InitialListFailed(kube::Error::Api(s))
                        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                            if s.code == 403 =>
                        {
                            format!(
                                "give the agent's ServiceAccount get/list/watch on daemonsets named {name} in {namespace} (manifests/base/rbac-mesh-cni.yaml)"
                            )
                        }
                        _ => "retrying".to_string(),
                    };
                    tracing::warn!(daemonset = %what, error = %msg, %hint, "cannot read the uninstall trigger; no uninstall until it can be read");
                    last_error = Some(msg.clone());
                }
                if *tx.borrow() == Trigger::Unknown {
                    publish(Trigger::Unreadable(msg));
                }
            }
        }
    }
}

fn log_trigger(what: &str, namespace: &str, t: &Trigger) {
    match t {
        Trigger::Requested => {
            tracing::info!(daemonset = %what, "{UNINSTALL_ANNOTATION}: \"true\": uninstall requested")
        }
        // Also the end of every uninstall (meshctl deletes the DaemonSet): not a warning.
        Trigger::Absent => tracing::info!(
            daemonset = %what,
            "no such DaemonSet: no uninstall can be requested through it (if the agent runs from another DaemonSet, pass its name with --daemonset and its namespace with --mesh-namespace / POD_NAMESPACE, {namespace} now)"
        ),
        Trigger::Garbage(v) => tracing::warn!(
            daemonset = %what, value = %v,
            "{UNINSTALL_ANNOTATION} is neither \"true\" nor \"false\": not an uninstall request (set it to \"true\" to uninstall, e.g. with `meshctl uninstall`, or remove it)"
        ),
        Trigger::No => tracing::debug!(daemonset = %what, "no uninstall requested"),
        Trigger::Unknown | Trigger::Unreadable(_) => {}
    }
}

fn to_value<T: serde::Serialize>(obj: &T) -> Option<serde_json::Value> {
    serde_json::to_value(obj).ok()
}

/// Runs a reflector stream for ever, bumping `tx` on every change it applies.
async fn drive<S, K>(stream: S, tx: Arc<watch::Sender<u64>>, what: &'static str)
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(_) => tx.send_modify(|v| *v += 1),
            Err(e) => tracing::warn!(%what, error = %e, "watch failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(namespace: &str, name: &str, annotations: serde_json::Value) -> DynamicObject {
        serde_json::from_value(
            serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations}}),
        )
        .expect("a DaemonSet")
    }

    #[test]
    fn only_true_on_our_own_daemonset_is_a_request() {
        let t = |o: &DynamicObject| trigger_of(o, "mesh-system", "mesh-cni");
        let on = serde_json::json!({UNINSTALL_ANNOTATION: "true"});
        assert_eq!(
            t(&ds("mesh-system", "mesh-cni", on.clone())),
            Trigger::Requested
        );
        assert_eq!(t(&ds("mesh-system", "other", on.clone())), Trigger::Absent);
        assert_eq!(t(&ds("default", "mesh-cni", on)), Trigger::Absent);
        let with = |v: &str| {
            ds(
                "mesh-system",
                "mesh-cni",
                serde_json::json!({UNINSTALL_ANNOTATION: v}),
            )
        };
        assert_eq!(t(&with("false")), Trigger::No);
        assert_eq!(t(&with("True")), Trigger::Garbage("True".into()));
        assert_eq!(t(&with(" true")), Trigger::Garbage(" true".into()));
        let long = "x".repeat(10_000);
        assert_eq!(t(&with(&long)), Trigger::Garbage("x".repeat(64)));
        assert_eq!(
            t(&ds("mesh-system", "mesh-cni", serde_json::json!({}))),
            Trigger::No
        );
    }
}
