//! API mode's stand-in for `meshctl waypoint apply --enroll-namespace --wait` (meshctl edits
//! only local mode's config directory): the Gateway and the namespace label written to the
//! API, then meshd's status awaited. Owns only that; what meshd renders is the controller's.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::Mesh;

impl Mesh {
    /// What `meshctl waypoint apply -n NS --name NAME --enroll-namespace --wait` does, done in
    /// the API: Gateway `NS/NAME` of class `istio-waypoint` (one HBONE listener on 15008),
    /// namespace NS labelled `istio.io/use-waypoint=NAME`, then wait until meshd's leader
    /// reports the Gateway `Programmed=True`. Returns what a user would see.
    pub fn api_waypoint_apply(&self, ns: &str, name: &str) -> anyhow::Result<Vec<String>> {
        let api = self.api().context("not in API mode")?;
        api.put(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        }))
        .with_context(|| format!("creating Gateway {ns}/{name}"))?;
        let mut namespace = api
            .get("v1", "Namespace", None, ns)
            .with_context(|| format!("no Namespace {ns} in the API"))?;
        let meta = namespace
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .with_context(|| format!("Namespace {ns} has no metadata"))?;
        let labels = meta.entry("labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        labels["istio.io/use-waypoint"] = json!(name);
        api.put(namespace)
            .with_context(|| format!("labelling Namespace {ns}"))?;
        let mut last = Value::Null;
        crate::wait_for(
            Duration::from_secs(60),
            &format!("Gateway {ns}/{name} to be Programmed"),
            || {
                last = api
                    .get("gateway.networking.k8s.io/v1", "Gateway", Some(ns), name)
                    .map(|g| g["status"]["conditions"].clone())
                    .unwrap_or_default();
                Ok(last.as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Programmed" && c["status"] == "True")
                }))
            },
        )
        .with_context(|| format!("last conditions: {last}"))?;
        Ok(vec![
            format!("Gateway {ns}/{name} (class istio-waypoint) created in the API"),
            format!("namespace {ns} labelled istio.io/use-waypoint={name}"),
            format!("meshd reports Gateway {ns}/{name} Programmed=True"),
        ])
    }
}
