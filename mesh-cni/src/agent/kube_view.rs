//! The Kube view: kube-runtime reflectors on this node's pods (field selector
//! `spec.nodeName=<node>`) and on all namespaces; a direct GET of a pod and its namespace on a
//! miss (a sandbox is created before the watch may have shown its pod); annotation patches
//! through `pods/status`; the uninstall ConfigMap. Owns the agent's API calls; nothing here
//! decides enrollment.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::view::{PodFacts, Snapshot, ViewError, namespace_label, pod_facts};

/// The ConfigMap whose appearance in the mesh namespace starts an uninstall.
pub const UNINSTALL_CONFIGMAP: &str = "mesh-uninstall";
/// Field manager of the agent's writes.
const MANAGER: &str = "mesh-cni";

pub struct KubeView {
    client: kube::Client,
    node: String,
    mesh_namespace: String,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    tx: Arc<watch::Sender<u64>>,
}

impl KubeView {
    /// Starts the watchers (on the current runtime); [`Self::ready`] waits for their lists.
    pub fn start(client: kube::Client, node: String, mesh_namespace: String) -> KubeView {
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
        KubeView {
            client,
            node,
            mesh_namespace,
            pods,
            namespaces,
            tx,
        }
    }

    pub async fn ready(&self) {
        let _ = self.pods.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
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

    pub async fn uninstall_requested(&self) -> bool {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.mesh_namespace);
        matches!(api.get_opt(UNINSTALL_CONFIGMAP).await, Ok(Some(_)))
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
