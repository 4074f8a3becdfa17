//! The waypoint's own certificate: the one it serves HBONE with and dials endpoints with.
//!
//! Owns which identity that is (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`, the trust domain
//! from meshd's trust bundle) and getting it: from `dataplane::certs::CertManager`, or given
//! directly (tests). Does not issue or verify certificates.

use std::sync::Arc;

use dataplane::certs::{CertEntry, CertManager};
use dataplane::subscription::ConfigRx;
use meshcore::Identity;
use meshcore::tls::WorkloadCert;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("running without meshd (standalone): no certificate, so no HBONE")]
    Standalone,
    #[error("no config from meshd yet, so no trust domain to ask a certificate in")]
    NoConfig,
    #[error(transparent)]
    Manager(#[from] dataplane::certs::CertError),
    #[error("certificate unusable: {0}")]
    Tls(#[from] meshcore::tls::TlsError),
}

/// Where the certificate comes from.
#[derive(Clone)]
pub enum OwnCert {
    None,
    Static(Arc<CertEntry>),
    Managed {
        manager: Arc<CertManager>,
        config: ConfigRx,
        namespace: String,
        service_account: String,
    },
}

impl OwnCert {
    pub fn fixed(cert: Arc<WorkloadCert>) -> Result<OwnCert, CertError> {
        let server_tls = meshcore::tls::server_config(&cert)?;
        Ok(OwnCert::Static(Arc::new(CertEntry { cert, server_tls })))
    }

    /// Our identity, once known (the trust domain comes with the first config).
    pub fn identity(&self) -> Option<Identity> {
        match self {
            OwnCert::None => None,
            OwnCert::Static(e) => Some(e.cert.identity.clone()),
            OwnCert::Managed {
                config,
                namespace,
                service_account,
                ..
            } => {
                let store = config.borrow().clone()?;
                let td = store
                    .trust_bundle()
                    .map(|t| t.trust_domain.clone())
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| "cluster.local".to_string());
                Some(Identity::new(&td, namespace, service_account))
            }
        }
    }

    /// The current certificate (waiting, bounded, for the first one).
    pub async fn get(&self) -> Result<Arc<CertEntry>, CertError> {
        match self {
            OwnCert::None => Err(CertError::Standalone),
            OwnCert::Static(e) => Ok(e.clone()),
            OwnCert::Managed { manager, .. } => {
                let id = self.identity().ok_or(CertError::NoConfig)?;
                Ok(manager.get(&id).await?)
            }
        }
    }

    /// Whether a certificate is in hand now (readiness).
    pub fn is_ready(&self) -> bool {
        match self {
            OwnCert::None | OwnCert::Static(_) => true,
            OwnCert::Managed { manager, .. } => {
                self.identity().is_some_and(|id| manager.is_ready(&id))
            }
        }
    }

    /// For `/config_dump`.
    pub fn status(&self) -> serde_json::Value {
        match self {
            OwnCert::None => serde_json::json!([]),
            OwnCert::Static(e) => {
                serde_json::json!([{"identity": e.cert.identity.to_string(), "state": "static"}])
            }
            OwnCert::Managed { manager, .. } => serde_json::Value::Array(manager.status()),
        }
    }
}
