//! A connection to a Kubernetes cluster for meshctl's synchronous commands: the client (from
//! `--kubeconfig`, else `$KUBECONFIG` / `~/.kube/config` / the in-cluster service account, as
//! kubectl and meshd find it) on a single-threaded runtime, and whole objects as JSON by
//! `apiVersion` + `kind` (resolved through the API's discovery, so CRD kinds work as soon as the
//! CRD is served). Owns only talking to the API; what objects mean is the commands'.
//!
//! Writes are server-side apply with field manager `meshctl`, or create/replace with the
//! object's resourceVersion (optimistic), never blind overwrites.

mod backend;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::discovery::Scope;
use serde_json::Value;

/// meshctl's field manager in `managedFields`.
pub const FIELD_MANAGER: &str = "meshctl";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error(
        "cannot find a cluster: pass --kubeconfig FILE, set KUBECONFIG, or run inside a pod with a service account ({0})"
    )]
    Infer(String),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("the cluster does not serve {api_version} {kind}: {hint}")]
    NotServed {
        api_version: String,
        kind: String,
        hint: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("starting meshctl's I/O runtime: {0}")]
    Runtime(String),
}

impl ClusterError {
    /// The API said 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClusterError::Api { source: kube::Error::Api(s), .. } if s.code == 404)
    }
}

/// Where an object lives: its resource and whether it is namespaced.
#[derive(Clone)]
struct Resource {
    ar: ApiResource,
    namespaced: bool,
}

pub struct Cluster {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    url: String,
    resources: Mutex<HashMap<(String, String), Resource>>,
}

impl Cluster {
    /// Connects (lazily: no request is made until the first call).
    pub fn connect(
        kubeconfig: Option<&Path>,
        context: Option<&str>,
    ) -> Result<Cluster, ClusterError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Runtime(e.to_string()))?;
        let options = kube::config::KubeConfigOptions {
            context: context.map(str::to_string),
            ..Default::default()
        };
        let kubeconfig: Option<PathBuf> = kubeconfig.map(Path::to_path_buf);
        let config = rt.block_on(async {
            match &kubeconfig {
                Some(path) => {
                    let bad = |message: String| ClusterError::Kubeconfig {
                        path: path.display().to_string(),
                        message,
                    };
                    let kc = kube::config::Kubeconfig::read_from(path)
                        .map_err(|e| bad(e.to_string()))?;
                    kube::Config::from_custom_kubeconfig(kc, &options)
                        .await
                        .map_err(|e| bad(e.to_string()))
                }
                None if options.context.is_some() => kube::Config::from_kubeconfig(&options)
                    .await
                    .map_err(|e| ClusterError::Infer(e.to_string())),
                None => kube::Config::infer()
                    .await
                    .map_err(|e| ClusterError::Infer(e.to_string())),
            }
        })?;
        let url = config.cluster_url.to_string();
        // The client's buffer task is spawned on this runtime and runs inside each block_on.
        let client = rt.block_on(async { kube::Client::try_from(config) });
        let client = client.map_err(|e| ClusterError::Api {
            what: format!("connecting to {url}"),
            source: e,
        })?;
        Ok(Cluster {
            rt,
            client,
            url,
            resources: Mutex::new(HashMap::new()),
        })
    }

    pub fn describe(&self) -> String {
        format!("cluster {}", self.url.trim_end_matches('/'))
    }

    /// The resource serving `api_version` `kind`; None when the cluster does not serve it
    /// (yet: a CRD just created). Found ones are remembered.
    fn resource(&self, api_version: &str, kind: &str) -> Result<Option<Resource>, ClusterError> {
        let key = (api_version.to_string(), kind.to_string());
        if let Some(r) = self.lock().get(&key) {
            return Ok(Some(r.clone()));
        }
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let found = self
            .rt
            .block_on(kube::discovery::pinned_kind(&self.client, &gvk));
        match found {
            Ok((ar, caps)) => {
                let r = Resource {
                    ar,
                    namespaced: caps.scope == Scope::Namespaced,
                };
                self.lock().insert(key, r.clone());
                Ok(Some(r))
            }
            // Discovery answers 404 for an unknown group/version, and an error naming the
            // kind for an unknown kind of a served group.
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(kube::Error::Discovery(_)) => Ok(None),
            Err(e) => Err(ClusterError::Api {
                what: format!("discovering {api_version} {kind}"),
                source: e,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Resource>> {
        self.resources.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn served(&self, api_version: &str, kind: &str) -> Result<Resource, ClusterError> {
        self.resource(api_version, kind)?
            .ok_or_else(|| ClusterError::NotServed {
                api_version: api_version.to_string(),
                kind: kind.to_string(),
                hint: "is its CRD installed?".to_string(),
            })
    }

    /// Whether the kind is namespaced, as the API serves it (None: not served). Rendered
    /// manifests cannot tell: kustomize sets a namespace on kinds it does not know, even
    /// cluster-scoped ones (GatewayClass).
    pub fn namespaced(&self, api_version: &str, kind: &str) -> Result<Option<bool>, ClusterError> {
        Ok(self.resource(api_version, kind)?.map(|r| r.namespaced))
    }

    /// Whether the cluster serves the kind.
    pub fn serves(&self, api_version: &str, kind: &str) -> Result<bool, ClusterError> {
        Ok(self.resource(api_version, kind)?.is_some())
    }

    fn api(&self, r: &Resource, namespace: Option<&str>) -> Api<DynamicObject> {
        match (r.namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &r.ar),
            (true, None) => Api::all_with(self.client.clone(), &r.ar),
            (false, _) => Api::all_with(self.client.clone(), &r.ar),
        }
    }

    /// One object; None when absent or its kind is not served.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, ClusterError> {
        let Some(r) = self.resource(api_version, kind)? else {
            return Ok(None);
        };
        let api = self.api(&r, Some(namespace.unwrap_or("default")));
        let got = self.rt.block_on(api.get_opt(name));
        let got = got.map_err(api_err(format!("reading {kind} {}", path(namespace, name))))?;
        got.map(to_value).transpose()
    }

    /// Objects of a kind in a namespace (None: all), optionally by label selector; empty when
    /// the kind is not served.
    pub fn list(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        labels: Option<&str>,
    ) -> Result<Vec<Value>, ClusterError> {
        let Some(r) = self.resource(api_version, kind)? else {
            return Ok(Vec::new());
        };
        let mut lp = ListParams::default();
        if let Some(l) = labels {
            lp = lp.labels(l);
        }
        let api = self.api(&r, namespace);
        let list = self.rt.block_on(api.list(&lp));
        let where_ = namespace.map_or("all namespaces".to_string(), |n| format!("namespace {n}"));
        let list = list.map_err(api_err(format!("listing {kind} in {where_}")))?;
        list.items.into_iter().map(to_value).collect()
    }

    /// Server-side apply of a whole object (field manager meshctl; `force` takes fields other
    /// managers own, as `kubectl apply --server-side --force-conflicts`).
    pub fn apply(&self, obj: &Value, force: bool) -> Result<Value, ClusterError> {
        let (r, ns, name) = self.locate(obj)?;
        let mut params = PatchParams::apply(FIELD_MANAGER);
        if force {
            params = params.force();
        }
        let api = self.api(&r, ns.as_deref());
        let what = format!("applying {} {}", r.ar.kind, path(ns.as_deref(), &name));
        let done = self
            .rt
            .block_on(api.patch(&name, &params, &Patch::Apply(obj)));
        to_value(done.map_err(api_err(what))?)
    }

    /// Creates the object (409 if it exists).
    pub fn create(&self, obj: &Value) -> Result<Value, ClusterError> {
        self.write(obj, Write::Create)
    }

    /// Replaces the object; its `metadata.resourceVersion` makes it fail (409) if the object
    /// changed since it was read.
    pub fn replace(&self, obj: &Value) -> Result<Value, ClusterError> {
        self.write(obj, Write::Replace)
    }

    fn write(&self, obj: &Value, how: Write) -> Result<Value, ClusterError> {
        let (r, ns, name) = self.locate(obj)?;
        let dyn_obj = from_value(obj)?;
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        let api = self.api(&r, ns.as_deref());
        let (verb, done) = match how {
            Write::Create => ("creating", self.rt.block_on(api.create(&pp, &dyn_obj))),
            Write::Replace => (
                "replacing",
                self.rt.block_on(api.replace(&name, &pp, &dyn_obj)),
            ),
        };
        let what = format!("{verb} {} {}", r.ar.kind, path(ns.as_deref(), &name));
        to_value(done.map_err(api_err(what))?)
    }

    /// A JSON merge patch.
    pub fn merge_patch(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ClusterError> {
        let r = self.served(api_version, kind)?;
        let api = self.api(&r, Some(namespace.unwrap_or("default")));
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        let what = format!("patching {kind} {}", path(namespace, name));
        let done = self
            .rt
            .block_on(api.patch(name, &params, &Patch::Merge(patch)));
        to_value(done.map_err(api_err(what))?)
    }

    /// Deletes the object (background propagation); false when there was none.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<bool, ClusterError> {
        let Some(r) = self.resource(api_version, kind)? else {
            return Ok(false);
        };
        let api = self.api(&r, Some(namespace.unwrap_or("default")));
        let done = self
            .rt
            .block_on(api.delete(name, &DeleteParams::background()));
        match done {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(api_err(format!(
                "deleting {kind} {}",
                path(namespace, name)
            ))(e)),
        }
    }

    /// The resource, namespace and name an object names (namespaced kinds default to
    /// `default`, as kubectl).
    fn locate(&self, obj: &Value) -> Result<(Resource, Option<String>, String), ClusterError> {
        let text = |p: &str| obj.pointer(p).and_then(Value::as_str);
        let (Some(api_version), Some(kind), Some(name)) =
            (text("/apiVersion"), text("/kind"), text("/metadata/name"))
        else {
            return Err(ClusterError::Invalid(
                "an object needs apiVersion, kind and metadata.name".into(),
            ));
        };
        let r = self.served(api_version, kind)?;
        let ns = r
            .namespaced
            .then(|| text("/metadata/namespace").unwrap_or("default").to_string());
        Ok((r, ns, name.to_string()))
    }
}

/// How [`Cluster::write`] sends a whole object.
#[derive(Clone, Copy)]
enum Write {
    Create,
    Replace,
}

/// `ns/name`, or `name` for cluster-scoped objects.
pub fn path(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

fn api_err(what: String) -> impl FnOnce(kube::Error) -> ClusterError {
    move |source| ClusterError::Api { what, source }
}

fn to_value(obj: DynamicObject) -> Result<Value, ClusterError> {
    serde_json::to_value(obj).map_err(|e| ClusterError::Invalid(format!("object as JSON: {e}")))
}

fn from_value(obj: &Value) -> Result<DynamicObject, ClusterError> {
    serde_json::from_value(obj.clone())
        .map_err(|e| ClusterError::Invalid(format!("not a Kubernetes object: {e}")))
}
