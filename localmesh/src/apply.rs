//! Applying and removing manifest files: pods scheduled, Services given VIPs, Deployments
//! reconciled, the result written where meshd reads it. Running pods is the kubelet's
//! (`kubelet`, `workloads`); this module must not start processes itself.

use std::sync::atomic::Ordering;

use anyhow::Context;
use serde_json::Value;

use crate::{Mesh, render, write_atomically};

impl Mesh {
    /// Applies a manifest file: schedules its pods (each runs once the node's CNI chain has
    /// set it up), gives its Services VIPs, runs its Deployments' pods, and writes the result
    /// where meshd watches. Re-applying the same file keeps pods that are still listed and
    /// removes those that are not; a Deployment scales or rolls out to its new template (new
    /// pods up before old ones go). An invalid Deployment refuses the whole file and changes
    /// nothing. A pod whose CNI chain fails does not run and is left out of the file; the
    /// rest is applied and the chain's error returned.
    pub fn apply(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut docs = render::parse_docs(file, yaml)?;
        let deployments = self.validate_deployments(file, &docs)?;
        let mut listed = Vec::new();
        let mut services = Vec::new();
        let mut new_pods: Vec<render::PodDoc> = Vec::new();
        let rendered = docs.iter_mut().try_for_each(|doc| {
            match render::kind(doc) {
                "Pod" => {
                    let spec = render::pod_doc(doc).with_context(|| file.to_string())?;
                    let key = format!("{}/{}", spec.namespace, spec.name);
                    listed.push(key.clone());
                    let placed = self.create_sandbox(file, &spec, None)?;
                    render::set_pod_status(doc, &placed.node, &placed.ips, &placed.netns);
                    render::set_pod_uid(doc, &placed.uid);
                    if placed.new {
                        new_pods.push(spec);
                    }
                }
                "Service" => {
                    let key = format!(
                        "{}/{}",
                        render::str_at(doc, &["metadata", "namespace"]).unwrap_or("default"),
                        render::str_at(doc, &["metadata", "name"]).unwrap_or("")
                    );
                    render::assign_cluster_ips(doc, &self.service_vips(&key));
                    services.push(key);
                }
                _ => {}
            }
            anyhow::Ok(())
        });
        if let Err(e) = rendered {
            for spec in &new_pods {
                self.discard(&format!("{}/{}", spec.namespace, spec.name), None);
            }
            return Err(e);
        }
        let gone: Vec<String> = {
            let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
            pods.values()
                .filter(|p| p.file == file && p.owner.is_none())
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .filter(|k| !listed.contains(k))
                .collect()
        };
        for key in gone {
            self.delete_pod(&key)?;
        }
        let previous = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(file.to_string(), docs);
        self.forget_services(previous.as_deref(), &services);
        let started = self.run_new_pods(file, &new_pods);
        let reconciled = self.reconcile_deployments(file, &deployments);
        started.and(reconciled)
    }

    /// Runs pods just sandboxed for `file` (already in its documents): the file is written
    /// first, so the cluster knows them when their CNI chain asks. Pods that fail are taken
    /// out of the file's documents; the first failure is returned.
    fn run_new_pods(&self, file: &str, pods: &[render::PodDoc]) -> anyhow::Result<()> {
        if pods.is_empty() {
            return Ok(());
        }
        let failed = match self.write_file(file) {
            Ok(()) => self.run_pods(file, pods),
            Err(e) => {
                for spec in pods {
                    self.discard(&format!("{}/{}", spec.namespace, spec.name), None);
                }
                pods.iter()
                    .map(|s| {
                        (
                            format!("{}/{}", s.namespace, s.name),
                            anyhow::anyhow!("{e:#}"),
                        )
                    })
                    .collect()
            }
        };
        let Some((_, first)) = failed.first() else {
            return Ok(());
        };
        let err = anyhow::anyhow!("{first:#}");
        let keys: Vec<&String> = failed.iter().map(|(k, _)| k).collect();
        if let Some(docs) = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(file)
        {
            docs.retain(|d| {
                render::kind(d) != "Pod"
                    || !keys.contains(&&format!(
                        "{}/{}",
                        render::str_at(d, &["metadata", "namespace"]).unwrap_or("default"),
                        render::str_at(d, &["metadata", "name"]).unwrap_or("")
                    ))
            });
        }
        Err(err)
    }

    /// The VIPs of Service `key` ("ns/name"): those it already has, else new ones.
    fn service_vips(&self, key: &str) -> Vec<String> {
        let mut vips = self.vips.lock().unwrap_or_else(|p| p.into_inner());
        vips.entry(key.to_string())
            .or_insert_with(|| {
                let n = self.next_vip.fetch_add(1, Ordering::Relaxed);
                let mut v = vec![format!("10.96.{}.{}", n / 250, n % 250 + 1)];
                if self.opts.ipv6 {
                    v.push(format!("fd00:96::{n:x}"));
                }
                v
            })
            .clone()
    }

    /// Releases the VIPs of Services a file no longer lists (a later Service gets new ones).
    fn forget_services(&self, previous: Option<&[Value]>, still: &[String]) {
        let mut vips = self.vips.lock().unwrap_or_else(|p| p.into_inner());
        for doc in previous.unwrap_or_default() {
            if render::kind(doc) == "Service" {
                let key = format!(
                    "{}/{}",
                    render::str_at(doc, &["metadata", "namespace"]).unwrap_or("default"),
                    render::str_at(doc, &["metadata", "name"]).unwrap_or("")
                );
                if !still.contains(&key) {
                    vips.remove(&key);
                }
            }
        }
    }

    /// Writes a file into meshd's config directory exactly as given (no rendering).
    pub fn write_raw(&self, file: &str, text: &str) -> anyhow::Result<()> {
        write_atomically(&self.config_dir.join(file), text)
    }

    /// Removes a manifest file and the pods it scheduled (its Deployments' pods leave the
    /// config before they stop, as in a scale-down).
    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<String> = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| p.file == file && p.owner.is_none())
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        let previous = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(file);
        self.forget_services(previous.as_deref(), &[]);
        let owned = self.take_pods(|p| p.file == file && p.owner.is_some());
        let _ = std::fs::remove_file(self.config_dir.join(file));
        if let Some(api) = &self.api
            && let Err(e) = api.sync_file(file, &mut [])
        {
            tracing::warn!("{e:#}");
        }
        for k in keys {
            self.delete_pod(&k)?;
        }
        self.retire(owned);
        Ok(())
    }

    fn delete_pod(&self, key: &str) -> anyhow::Result<()> {
        let taken = self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if let Some(p) = taken {
            self.stop_pod(p)?;
        }
        Ok(())
    }
}
