//! The CA root in a Secret (`mesh-ca` in meshd's namespace, created if absent) so every
//! replica signs with the same root and a restart keeps it; the root certificates published
//! in a ConfigMap (`mesh-root-cert`, key `root-cert.pem`) for clients to trust meshd's serving
//! certificate.
//!
//! The Secret is the truth: each replica writes it into its own `<state>/ca/` (`ca_files`) at
//! start and whenever it changes, and `roots::watch` (which polls that directory) does the
//! rest, as in local mode. A rotation step is a read-modify-write of the Secret with its
//! resourceVersion as precondition ([`rotate`], `meshd ca … --kubernetes`), so two operators
//! or replicas can never interleave steps. A deleted Secret is recreated from the directory,
//! so a replica restarted later cannot mint a root of its own while others sign with the old.
//! The ConfigMap is written by the leader only, only when its content differs, in meshd's
//! namespace only (ztunnel runs there; it is where Istio's ztunnel reads istiod's root too).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::ca_files::{self, CaData};
use super::{CA_SECRET, KubeError, KubeSettings, ROOT_CONFIGMAP};
use crate::roots::{self, Roots};

/// The ConfigMap key holding every trusted root (PEM, signer first), as Istio's
/// `istio-ca-root-cert` does.
pub const ROOT_CONFIGMAP_KEY: &str = "root-cert.pem";
/// The leader re-checks the ConfigMap this often even without a change (someone may have
/// edited or deleted it).
const RECHECK: Duration = Duration::from_secs(30);
/// Read-modify-write attempts of a rotation step before giving up on conflicts.
const ROTATE_ATTEMPTS: usize = 5;

fn other(e: impl std::fmt::Display) -> KubeError {
    KubeError::Other(e.to_string())
}

/// Keeps `ca_dir` following the Secret; stops when dropped.
pub struct CaSecretSync {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CaSecretSync {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Makes `ca_dir` hold the CA stored in the Secret (creating the Secret if absent, from the CA
/// already in `ca_dir` if any, else a new root), and keeps it in step with the Secret until
/// the returned guard is dropped (a rotation step changes the Secret; every replica follows).
/// Returns once `ca_dir` holds the Secret's CA.
pub async fn sync(
    client: kube::Client,
    settings: &KubeSettings,
    ca_dir: &Path,
    trust_domain: &str,
) -> Result<CaSecretSync, KubeError> {
    let api: Api<Secret> = Api::namespaced(client, &settings.namespace);
    let where_ = format!("Secret {}/{CA_SECRET}", settings.namespace);
    let secret = match api.get_opt(CA_SECRET).await? {
        Some(s) => s,
        None => create(&api, ca_dir, trust_domain, &where_).await?,
    };
    let data = data_of(&secret).map_err(|e| other(format!("{where_}: {e}")))?;
    if ca_files::write(ca_dir, &data).map_err(other)? {
        info!(secret = %where_, dir = %ca_dir.display(), "CA taken from the Secret");
    }
    let task = tokio::spawn(follow(
        api,
        ca_dir.to_path_buf(),
        trust_domain.to_string(),
        where_,
        data,
    ));
    Ok(CaSecretSync { task })
}

/// Creates the Secret from `ca_dir` (making a root there first if it has none). If another
/// replica created it meanwhile, theirs is returned: everyone ends up on one root.
async fn create(
    api: &Api<Secret>,
    ca_dir: &Path,
    trust_domain: &str,
    where_: &str,
) -> Result<Secret, KubeError> {
    let (dir, td) = (ca_dir.to_path_buf(), trust_domain.to_string());
    let data = tokio::task::spawn_blocking(move || -> Result<CaData, KubeError> {
        roots::load(&dir, &td).map_err(other)?;
        ca_files::read(&dir).map_err(other)
    })
    .await
    .map_err(other)??;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.to_string()),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(s) => {
            info!(secret = %where_, "stored this replica's CA root in a new Secret");
            Ok(s)
        }
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            info!(secret = %where_, "another replica created the CA Secret first; using its root");
            Ok(api.get(CA_SECRET).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// The Secret's CA files, checked.
fn data_of(secret: &Secret) -> Result<CaData, ca_files::CaFilesError> {
    let data: CaData = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    ca_files::validate(&data)?;
    Ok(data)
}

/// Watches the Secret and writes each new version into `ca_dir`.
async fn follow(api: Api<Secret>, ca_dir: PathBuf, td: String, where_: String, mut last: CaData) {
    let config = watcher::Config::default().fields(&format!("metadata.name={CA_SECRET}"));
    let mut events = watcher(api.clone(), config).default_backoff().boxed();
    // Whether the Secret was seen in the current (re)list.
    let mut listed = false;
    while let Some(event) = events.next().await {
        let secret = match event {
            Ok(watcher::Event::Init) => {
                listed = false;
                continue;
            }
            Ok(watcher::Event::InitApply(s)) => {
                listed = true;
                s
            }
            Ok(watcher::Event::Apply(s)) => s,
            Ok(watcher::Event::InitDone) if listed => continue,
            Ok(watcher::Event::InitDone | watcher::Event::Delete(_)) => {
                warn!(secret = %where_, "the CA Secret is gone; storing this replica's CA in it again");
                if let Err(e) = create(&api, &ca_dir, &td, &where_).await {
                    error!(secret = %where_, error = %e, "cannot recreate the CA Secret");
                }
                continue;
            }
            Err(e) => {
                warn!(secret = %where_, error = %e, "watching the CA Secret failed; retrying");
                continue;
            }
        };
        let data = match data_of(&secret) {
            Ok(d) => d,
            Err(e) => {
                error!(secret = %where_, error = %e, "the CA Secret is unusable; keeping the current CA");
                continue;
            }
        };
        if data == last {
            continue;
        }
        let dir = ca_dir.clone();
        let d = data.clone();
        match tokio::task::spawn_blocking(move || ca_files::write(&dir, &d)).await {
            Ok(Ok(_)) => {
                info!(secret = %where_, "the CA Secret changed; CA directory updated");
                last = data;
            }
            Ok(Err(e)) => error!(secret = %where_, error = %e, "cannot write the CA directory"),
            Err(e) => error!(error = %e, "CA write task failed"),
        }
    }
}

/// A rotation step, as `meshd ca` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStep {
    Prepare,
    Activate,
    Retire,
}

/// Applies a rotation step to the CA Secret in `namespace` (read, step in a private scratch
/// directory, write back with the read resourceVersion; retried on conflict). Returns what was
/// done, for the operator. Every replica picks the change up from the Secret.
pub async fn rotate(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
    step: RotationStep,
) -> Result<String, KubeError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let where_ = format!("Secret {namespace}/{CA_SECRET}");
    for _ in 0..ROTATE_ATTEMPTS {
        let Some(mut secret) = api.get_opt(CA_SECRET).await? else {
            return Err(other(format!(
                "{where_} does not exist: start meshd with --kubernetes once first"
            )));
        };
        let data = data_of(&secret).map_err(|e| other(format!("{where_}: {e}")))?;
        let (td, d) = (trust_domain.to_string(), data.clone());
        let (said, new) = tokio::task::spawn_blocking(move || step_in_scratch(&d, &td, step))
            .await
            .map_err(other)??;
        if new == data {
            return Ok(format!("{said} (the Secret already was so: unchanged)"));
        }
        secret.data = Some(new.into_iter().map(|(k, v)| (k, ByteString(v))).collect());
        // metadata.resourceVersion is the one read: a concurrent change makes this a 409.
        match api
            .replace(CA_SECRET, &PostParams::default(), &secret)
            .await
        {
            Ok(_) => {
                return Ok(format!(
                    "{said} in {where_}; every meshd replica follows it"
                ));
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                warn!("{where_} changed while this step ran; reading it again");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(other(format!(
        "{where_} kept changing during {ROTATE_ATTEMPTS} attempts; run the step again"
    )))
}

fn step_in_scratch(
    data: &CaData,
    trust_domain: &str,
    step: RotationStep,
) -> Result<(String, CaData), KubeError> {
    let scratch = Scratch::new()?;
    let ca = scratch.0.join("ca");
    ca_files::write(&ca, data).map_err(other)?;
    let said = match step {
        RotationStep::Prepare => {
            roots::prepare(&ca, trust_domain).map_err(other)?;
            "new root created: trusted now, not yet signing".to_string()
        }
        RotationStep::Activate => {
            roots::activate(&ca).map_err(other)?;
            "new root is signing; the old root stays trusted until `meshd ca retire`".to_string()
        }
        RotationStep::Retire => {
            format!("retired {} old root(s)", roots::retire(&ca).map_err(other)?)
        }
    };
    Ok((said, ca_files::read(&ca).map_err(other)?))
}

/// A private (0700) directory for the CA's keys during a step, removed however the step ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, KubeError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("meshd-ca-{:016x}", rand::random::<u64>()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| other(format!("{}: {e}", path.display())))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Publishes the trusted roots in the root ConfigMap while `leader` is true. Ends when the
/// roots or the leadership channel close (meshd is stopping).
pub fn publish_root(
    client: kube::Client,
    settings: &KubeSettings,
    mut roots: watch::Receiver<Arc<Roots>>,
    mut leader: watch::Receiver<bool>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &settings.namespace);
    let where_ = format!("ConfigMap {}/{ROOT_CONFIGMAP}", settings.namespace);
    tokio::spawn(async move {
        loop {
            if leader.wait_for(|l| *l).await.is_err() {
                return;
            }
            let pem = bundle_pem(&roots.borrow_and_update());
            let pause = match publish(&api, &pem).await {
                Ok(true) => {
                    info!(configmap = %where_, "published the mesh root certificates");
                    RECHECK
                }
                Ok(false) => RECHECK,
                Err(e) => {
                    warn!(configmap = %where_, error = %e, "cannot publish the mesh root; retrying");
                    Duration::from_secs(2)
                }
            };
            tokio::select! {
                r = roots.changed() => if r.is_err() { return },
                r = leader.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(pause) => {}
            }
        }
    });
}

/// Every trusted root, one PEM after another (signer first).
pub fn bundle_pem(roots: &Roots) -> String {
    roots
        .bundle
        .iter()
        .map(|p| format!("{}\n", p.trim_end()))
        .collect()
}

/// Makes the ConfigMap hold `pem`; whether it had to be written.
async fn publish(api: &Api<ConfigMap>, pem: &str) -> Result<bool, kube::Error> {
    let current = api.get_opt(ROOT_CONFIGMAP).await?;
    let holds = |cm: &ConfigMap| {
        cm.data
            .as_ref()
            .and_then(|d| d.get(ROOT_CONFIGMAP_KEY))
            .is_some_and(|v| v == pem)
    };
    let data = Some([(ROOT_CONFIGMAP_KEY.to_string(), pem.to_string())].into());
    match current {
        Some(cm) if holds(&cm) => Ok(false),
        Some(mut cm) => {
            // With the read resourceVersion: a concurrent writer makes this fail, and the next
            // round reads again.
            cm.data = data;
            api.replace(ROOT_CONFIGMAP, &PostParams::default(), &cm)
                .await?;
            Ok(true)
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOT_CONFIGMAP.to_string()),
                    ..Default::default()
                },
                data,
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm).await?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbed::kubeapi::{ApiOptions, ApiServer};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_root_configmap_is_written_only_when_it_differs() {
        let api = ApiServer::start(ApiOptions::default()).unwrap();
        api.create(serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "mesh-system"}}))
            .unwrap();
        let mut settings = KubeSettings::new("mesh-system", "t");
        settings.kubeconfig = Some(api.kubeconfig().to_path_buf());
        let client = super::super::client(&settings).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(client, "mesh-system");
        for (pem, written) in [("A\n", true), ("A\n", false), ("B\n", true), ("B\n", false)] {
            assert_eq!(publish(&cms, pem).await.unwrap(), written, "{pem}");
        }
        let writes = api
            .requests()
            .into_iter()
            .filter(|r| r.method != "GET" && r.path.contains("/configmaps"))
            .count();
        assert_eq!(writes, 2);
        let cm = api
            .get("v1", "ConfigMap", Some("mesh-system"), ROOT_CONFIGMAP)
            .unwrap();
        assert_eq!(cm["data"][ROOT_CONFIGMAP_KEY], "B\n");
    }
}
