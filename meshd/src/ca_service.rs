//! The certificate service (`mesh.ca.v1.CertificateService`): signs workload certificates for
//! authenticated nodes, only for identities of pods scheduled on the calling node, and for
//! authenticated service accounts (waypoints), only for their own identity.
//!
//! Owns the authorization rule and the validity policy. Certificate contents and the accepted
//! key types (ECDSA P-256 only) are meshcore's (`ca::CertAuthority`); which pods exist is the
//! mesh view's; who the caller is, `authn`'s (its interceptor runs before this service).

use std::sync::Arc;
use std::time::Duration;

use meshcore::Identity;
use meshcore::ca::CaError;
use meshcore::nodeauth::Principal;
use meshcore::proto::ca::certificate_service_server::CertificateService;
use meshcore::proto::ca::{CertificateRequest, CertificateResponse};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::authn::principal_of;
use crate::roots::Roots;
use crate::translate::VersionedView;

pub struct CaService {
    roots: watch::Receiver<Arc<Roots>>,
    views: watch::Receiver<Arc<VersionedView>>,
    /// Default and maximum certificate lifetime.
    lifetime: Duration,
}

impl CaService {
    pub fn new(
        roots: watch::Receiver<Arc<Roots>>,
        views: watch::Receiver<Arc<VersionedView>>,
        lifetime: Duration,
    ) -> Self {
        CaService {
            roots,
            views,
            lifetime,
        }
    }

    /// The request's lifetime if positive, never beyond the configured one.
    fn validity(&self, requested_secs: i64) -> Duration {
        match u64::try_from(requested_secs) {
            Ok(s) if s > 0 => Duration::from_secs(s).min(self.lifetime),
            _ => self.lifetime,
        }
    }
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        req: Request<CertificateRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let principal = principal_of(&req)?;
        let req = req.into_inner();
        // One consistent view of the roots for this request, even mid-rotation.
        let roots = self.roots.borrow().clone();
        let identity: Identity = req
            .identity
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        if identity.trust_domain != roots.signer.trust_domain() {
            return Err(Status::invalid_argument(format!(
                "identity {identity} is not in this mesh's trust domain {:?}",
                roots.signer.trust_domain()
            )));
        }
        match &principal {
            Principal::Node(node) => {
                let runs_here = {
                    let view = self.views.borrow();
                    let wanted = (identity.namespace.clone(), identity.service_account.clone());
                    view.view
                        .identities_by_node
                        .get(node)
                        .is_some_and(|ids| ids.contains(&wanted))
                };
                if !runs_here {
                    warn!(%node, %identity, "refused certificate: no such pod on the node");
                    return Err(Status::permission_denied(format!(
                        "node {node} may not obtain identity {identity}: no pod on node {node} runs as it"
                    )));
                }
            }
            Principal::ServiceAccount(ns, sa) => {
                if identity.namespace != *ns || identity.service_account != *sa {
                    warn!(caller = %principal, %identity, "refused certificate: not its own identity");
                    return Err(Status::permission_denied(format!(
                        "service account {ns}/{sa} may obtain only its own identity spiffe://{}/ns/{ns}/sa/{sa}, not {identity}",
                        identity.trust_domain
                    )));
                }
            }
        }
        let validity = self.validity(req.validity_seconds);
        let leaf = roots
            .signer
            .sign_csr(&req.csr_pem, &identity, validity)
            .map_err(|e| match e {
                CaError::CsrPem(_)
                | CaError::CsrParse(_)
                | CaError::CsrSignature
                | CaError::CsrKey(_)
                | CaError::BadValidity(_) => Status::invalid_argument(e.to_string()),
                other => Status::internal(format!("signing failed: {other}")),
            })?;
        info!(caller = %principal, %identity, ?validity, "issued certificate");
        Ok(Response::new(CertificateResponse {
            cert_chain_pem: vec![leaf],
            trust_bundle_pem: roots.bundle.clone(),
        }))
    }
}
