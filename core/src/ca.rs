//! Certificate authority primitives: the mesh root, signing workload CSRs, and making CSRs.
//!
//! Owns: the root key and certificate on disk (`root-cert.pem`, `root-key.pem`), the shape of
//! workload certificates (one SPIFFE URI SAN, not a CA, serverAuth+clientAuth), and CSR
//! generation for workloads.
//!
//! Must not touch: who may ask for which identity (that is the CA service's job, see
//! [`crate::nodeauth`]), transport, or TLS configuration (see [`crate::tls`]).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

use crate::Identity;
use crate::tls::{TlsError, WorkloadCert};

const ROOT_CERT_FILE: &str = "root-cert.pem";
const ROOT_KEY_FILE: &str = "root-key.pem";
/// Roots live about ten years; rotating them is an operator's decision, not a timer's.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so that small clock skew between nodes does not
/// make a fresh certificate "not yet valid".
const BACKDATE: Duration = Duration::from_secs(60);

/// What went wrong running the CA. Messages say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot create CA directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{present} exists but {missing} does not; restore the missing file, or remove both to create a new root (every workload certificate will then need re-issuing)"
    )]
    HalfRoot { present: PathBuf, missing: PathBuf },
    #[error("{path} is not a usable root certificate: {reason}")]
    BadRootCert { path: PathBuf, reason: String },
    #[error("{path} is not a usable private key: {reason}")]
    BadRootKey { path: PathBuf, reason: String },
    #[error("root key {key} does not belong to root certificate {cert}; restore the matching pair")]
    RootKeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("CSR is not a PEM \"CERTIFICATE REQUEST\": {0}")]
    CsrPem(String),
    #[error("CSR does not parse as PKCS#10: {0}")]
    CsrParse(String),
    #[error("CSR signature does not verify: the request was altered or not signed by its key")]
    CsrSignature,
    #[error("CSR public key algorithm is not supported (use ECDSA P-256): {0}")]
    CsrKey(String),
    #[error("validity {0:?} is too long to represent")]
    BadValidity(Duration),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("issued certificate is unusable: {0}")]
    Tls(#[from] TlsError),
}

/// The mesh's certificate authority: a self-signed root that signs workload certificates.
///
/// Keep one per trust domain. Workloads trust [`CertAuthority::root_pem`]; certificates come
/// from [`CertAuthority::sign_csr`] (the workload keeps its key) or, in tests and tools,
/// [`CertAuthority::mint`].
pub struct CertAuthority {
    trust_domain: String,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertAuthority {
    // Hand-written so that the key can never end up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Loads `root-cert.pem` and `root-key.pem` from `dir`, creating them on first start.
    ///
    /// A new root is ECDSA P-256, `CA:true`, valid about ten years, with common name
    /// `mesh root <trust_domain>`. The same files are reused on every later start, so
    /// certificates issued before a restart stay valid. `dir` is created if missing; the key
    /// file is written with mode 0600.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path, trust_domain),
            (false, false) => {
                let ca = Self::new_in_memory(trust_domain)?;
                // Key first: a crash in between leaves a key without a cert, which is
                // reported clearly (HalfRoot) instead of silently minting a second root.
                write_file(&key_path, &ca.issuer.key().serialize_pem(), 0o600)?;
                write_file(&cert_path, &ca.root_pem, 0o644)?;
                tracing::info!(dir = %dir.display(), trust_domain, "created new mesh root CA");
                Ok(ca)
            }
            (true, false) => Err(CaError::HalfRoot {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::HalfRoot {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let root_pem = std::fs::read_to_string(cert_path).map_err(|source| CaError::Read {
            path: cert_path.into(),
            source,
        })?;
        let key_pem = std::fs::read_to_string(key_path).map_err(|source| CaError::Read {
            path: key_path.into(),
            source,
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadRootKey {
            path: key_path.into(),
            reason: e.to_string(),
        })?;
        let bad_cert = |reason: String| CaError::BadRootCert {
            path: cert_path.into(),
            reason,
        };
        let (_, pem) = x509_parser::pem::parse_x509_pem(root_pem.as_bytes())
            .map_err(|e| bad_cert(e.to_string()))?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&pem.contents)
            .map_err(|e| bad_cert(e.to_string()))?;
        if !cert.is_ca() {
            return Err(bad_cert(
                "it is not a CA certificate (basicConstraints CA:true missing)".into(),
            ));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::RootKeyMismatch {
                cert: cert_path.into(),
                key: key_path.into(),
            });
        }
        let expected_cn = root_common_name(trust_domain);
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("");
        if cn != expected_cn {
            // Not fatal: the trust domain lives in workload SANs, not in the root's name.
            tracing::warn!(found = cn, expected = %expected_cn, "root CA common name does not match the trust domain");
        }
        let issuer =
            Issuer::from_ca_cert_pem(&root_pem, key).map_err(|e| bad_cert(e.to_string()))?;
        tracing::info!(path = %cert_path.display(), trust_domain, "loaded mesh root CA");
        Ok(CertAuthority {
            trust_domain: trust_domain.to_string(),
            root_pem,
            issuer,
        })
    }

    /// A throw-away CA held only in memory (tests, tools).
    pub fn new_in_memory(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, root_common_name(trust_domain));
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, ROOT_VALIDITY)?;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(CertAuthority {
            trust_domain: trust_domain.to_string(),
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The trust domain this CA issues identities for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, PEM: the trust bundle every workload needs.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs a workload certificate for `identity` and returns it as PEM.
    ///
    /// Only the CSR's public key is used: whatever names or extensions the CSR asks for are
    /// ignored, because the caller (who authenticated the requester) decides the identity.
    /// The certificate's one SAN is the identity's URI; it is not a CA; its EKU is
    /// serverAuth + clientAuth; it is valid from 60 s ago until now + `validity`.
    ///
    /// A CSR that doesn't parse, or whose self-signature doesn't verify, is rejected.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        validity: Duration,
    ) -> Result<String, CaError> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
            .map_err(|e| CaError::CsrPem(e.to_string()))?;
        if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
            return Err(CaError::CsrPem(format!("found a {:?} block", pem.label)));
        }
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
                .map_err(|e| CaError::CsrParse(e.to_string()))?;
        // Proof of possession: the requester holds the private key of the key it asks us to certify.
        csr.verify_signature().map_err(|_| CaError::CsrSignature)?;
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| CaError::CsrKey(e.to_string()))?;
        let params = workload_params(vec![SanType::URI(identity.to_uri().try_into()?)], validity)?;
        let cert = params.signed_by(&public_key, &self.issuer)?;
        tracing::debug!(%identity, ?validity, "signed workload certificate");
        Ok(cert.pem())
    }

    /// Generates a key and a certificate for `identity` (tests and tools).
    pub fn mint(&self, identity: &Identity, validity: Duration) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = workload_params(vec![SanType::URI(identity.to_uri().try_into()?)], validity)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(WorkloadCert::new(
            identity.clone(),
            vec![cert.pem()],
            key.serialize_pem(),
            vec![self.root_pem.clone()],
        )?)
    }

    /// Test helper: a certificate signed by this CA whose only SAN is the DNS name
    /// `not-spiffe.invalid` — no SPIFFE identity at all. Used to prove such peers are refused.
    ///
    /// [`WorkloadCert::new`] would reject it, so the struct is filled directly; its `identity`
    /// is a dummy (`spiffe://<td>/ns/none/sa/none`) that the certificate does not prove.
    pub fn mint_without_spiffe_san(&self, validity: Duration) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = workload_params(
            vec![SanType::DnsName("not-spiffe.invalid".try_into()?)],
            validity,
        )?;
        let not_before = params.not_before.into();
        let not_after = params.not_after.into();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(WorkloadCert {
            identity: Identity::new(&self.trust_domain, "none", "none"),
            chain_pem: vec![cert.pem()],
            key_pem: key.serialize_pem(),
            roots_pem: vec![self.root_pem.clone()],
            not_before,
            not_after,
        })
    }
}

/// A fresh ECDSA P-256 key and a CSR for it carrying `identity` as URI SAN: `(key PEM, CSR PEM)`.
///
/// The key never leaves the caller; only the CSR goes to the CA.
pub fn generate_csr(identity: &Identity) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_uri().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

fn root_common_name(trust_domain: &str) -> String {
    format!("mesh root {trust_domain}")
}

/// The shape of every workload certificate; only the SANs differ.
fn workload_params(sans: Vec<SanType>, validity: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    // Empty subject, as Istio issues: the identity lives in the SAN (rcgen then marks the SAN
    // critical, as RFC 5280 requires).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, validity)?;
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), CaError> {
    let now = OffsetDateTime::now_utc();
    let too_long = || CaError::BadValidity(validity);
    let ahead = time::Duration::try_from(validity).map_err(|_| too_long())?;
    let back = time::Duration::try_from(BACKDATE).map_err(|_| too_long())?;
    params.not_before = now.checked_sub(back).ok_or_else(too_long)?;
    params.not_after = now.checked_add(ahead).ok_or_else(too_long)?;
    Ok(())
}

/// 128 random bits, top bit clear so the DER INTEGER stays positive.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// Writes `contents` to `path` with `mode`, via a temporary file and a rename so that a crash
/// never leaves a half-written key or certificate behind.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("pem.tmp");
    // A stale temp file from a crash would make create_new fail; it holds nothing we need.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_cert_round_trips_through_workload_cert() {
        let ca = CertAuthority::new_in_memory("td").expect("ca");
        let id = Identity::new("td", "ns", "sa");
        let cert = ca.mint(&id, Duration::from_secs(3600)).expect("mint");
        assert_eq!(cert.identity, id);
        assert!(cert.not_after > cert.not_before);
    }
}
