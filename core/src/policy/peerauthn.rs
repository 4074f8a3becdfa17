//! PeerAuthentication: validating the user's spec and compiling it to the mTLS settings the L4
//! proxy resolves per workload and port.
//!
//! Owns parsing (`selector`, `mtls.mode`, `portLevelMtls`) and the per-level L4 form. The
//! mesh → namespace → workload → port resolution lives in `mod.rs`, next to the index.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use super::spec::{
    Diag, as_object, check_known_fields, field, join, parse_selector, parse_spec, string_field,
};
use super::{Effective, MtlsMode, PolicyReport, PolicyStatus};
use crate::proto::config::Policy;

pub(crate) const KIND: &str = "PeerAuthentication";

/// `mtls.mode` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsSetting {
    /// Inherit from the parent level.
    Unset,
    /// Ignored in ambient (mesh traffic is always mTLS): behaves as PERMISSIVE.
    Disable,
    Permissive,
    Strict,
}

impl MtlsSetting {
    /// The mode this setting imposes, or `None` to inherit.
    pub fn effective(self) -> Option<MtlsMode> {
        match self {
            MtlsSetting::Unset => None,
            MtlsSetting::Disable | MtlsSetting::Permissive => Some(MtlsMode::Permissive),
            MtlsSetting::Strict => Some(MtlsMode::Strict),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PeerAuthnLevel {
    /// Root namespace, no selector.
    Mesh,
    /// Another namespace, no selector.
    Namespace,
    /// `selector.matchLabels` in a non-root namespace.
    Workload(BTreeMap<String, String>),
}

/// The effective L4 form of one PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct L4PeerAuthentication {
    /// `ns/name`.
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub level: PeerAuthnLevel,
    pub mode: MtlsSetting,
    /// Only for workload-level policies.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u16, MtlsSetting>,
}

pub(crate) fn compile(
    p: &Policy,
    root_namespace: &str,
) -> (Option<L4PeerAuthentication>, PolicyReport) {
    let mut d = Diag::new(KIND, &p.namespace, &p.name);
    let compiled = parse_spec(&p.spec_json, &mut d)
        .and_then(|spec| compile_spec(&spec, p, root_namespace, &mut d));
    let (status, effective) = match compiled {
        _ if d.has_errors() => (PolicyStatus::Rejected, None),
        None => (PolicyStatus::Rejected, None),
        Some(Some(pa)) => (PolicyStatus::Enforced, Some(pa)),
        Some(None) => (PolicyStatus::NotEnforced, None),
    };
    let report = d.into_report(
        &p.key,
        status,
        effective.clone().map(Effective::PeerAuthentication),
    );
    (effective, report)
}

fn parse_mode(m: &Map<String, Value>, path: &str, d: &mut Diag) -> MtlsSetting {
    check_known_fields(m, path, &["mode"], d);
    let setting = match string_field(m, "mode", path, d).as_deref() {
        None | Some("UNSET") => MtlsSetting::Unset,
        Some("DISABLE") => MtlsSetting::Disable,
        Some("PERMISSIVE") => MtlsSetting::Permissive,
        Some("STRICT") => MtlsSetting::Strict,
        Some(other) => {
            d.error(
                &join(path, "mode"),
                format!("unknown mode {other:?} (expected UNSET, DISABLE, PERMISSIVE or STRICT)"),
            );
            MtlsSetting::Unset
        }
    };
    if setting == MtlsSetting::Disable {
        d.warn(
            &join(path, "mode"),
            "DISABLE is ignored in ambient (traffic between mesh workloads is always mTLS): \
             behaves as PERMISSIVE",
        );
    }
    setting
}

/// `Some(Some(_))` enforced, `Some(None)` accepted but not enforced, `None` rejected.
fn compile_spec(
    spec: &Map<String, Value>,
    p: &Policy,
    root_namespace: &str,
    d: &mut Diag,
) -> Option<Option<L4PeerAuthentication>> {
    check_known_fields(spec, "spec", &["selector", "mtls", "portLevelMtls"], d);
    let selector = parse_selector(spec, d);
    let mode = match field(spec, "mtls") {
        None => MtlsSetting::Unset,
        Some(v) => as_object(v, "spec.mtls", d)
            .map(|m| parse_mode(m, "spec.mtls", d))
            .unwrap_or(MtlsSetting::Unset),
    };

    let mut port_level_mtls = BTreeMap::new();
    if let Some(v) = field(spec, "portLevelMtls")
        && let Some(ports) = as_object(v, "spec.portLevelMtls", d)
    {
        if ports.is_empty() {
            d.error(
                "spec.portLevelMtls",
                "port level mTLS, if defined, must have at least one element",
            );
        }
        for (port, setting) in ports {
            let ppath = format!("spec.portLevelMtls[{port:?}]");
            let Some(obj) = as_object(setting, &ppath, d) else {
                continue;
            };
            let setting = parse_mode(obj, &ppath, d);
            match port.parse::<u16>() {
                Ok(n) if n > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {
                    port_level_mtls.insert(n, setting);
                }
                _ => d.error(&ppath, "port must be in range 1..65535"),
            }
        }
    }
    if d.has_errors() {
        return None;
    }

    let level = match selector {
        Some(_) if p.namespace == root_namespace => {
            d.warn(
                "spec.selector",
                "a PeerAuthentication with a selector in the root namespace is ignored by Istio \
                 ambient: NOT applied",
            );
            return Some(None);
        }
        Some(labels) => PeerAuthnLevel::Workload(labels),
        None if p.namespace == root_namespace => PeerAuthnLevel::Mesh,
        None => PeerAuthnLevel::Namespace,
    };
    if !port_level_mtls.is_empty() && !matches!(level, PeerAuthnLevel::Workload(_)) {
        d.warn(
            "spec.portLevelMtls",
            "portLevelMtls is only meaningful with a workload selector (Istio's admission \
             refuses it on mesh/namespace policies): ignored",
        );
        port_level_mtls.clear();
    }
    Some(Some(L4PeerAuthentication {
        key: format!("{}/{}", p.namespace, p.name),
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        level,
        mode,
        port_level_mtls,
    }))
}
