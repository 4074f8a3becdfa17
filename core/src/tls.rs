//! rustls configurations for HBONE's mutual TLS, with SPIFFE verification.
//!
//! Owns: [`WorkloadCert`] (a workload's key, chain and trust bundle), the rustls client and
//! server configurations HBONE uses, and the certificate verifiers behind them (chain checks
//! with rustls-webpki, identity checks on the SPIFFE URI SAN).
//!
//! Must not touch: sockets, HTTP/2, or certificate issuance (that is [`crate::ca`]).
//!
//! Why custom verifiers: rustls' stock verifiers match DNS names, but mesh certificates carry
//! only a SPIFFE URI SAN (`spiffe://<td>/ns/<ns>/sa/<sa>`) and HBONE sends no SNI. So the chain
//! is checked with `webpki::EndEntityCert::verify_for_usage`, then the URI SAN is checked
//! against what the caller expects.

use std::fmt;
use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::Identity;

/// A workload's TLS material: who it is, its certificate chain and key, and the roots it trusts.
///
/// Build it with [`WorkloadCert::new`], which checks that the pieces fit together; the fields
/// are public so callers can read them (and tests can forge broken ones on purpose).
#[derive(Clone, Debug)]
pub struct WorkloadCert {
    /// The identity the leaf certificate proves.
    pub identity: Identity,
    /// PEM certificates, leaf first, then intermediates (one certificate per entry).
    pub chain_pem: Vec<String>,
    /// The leaf's private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key_pem: String,
    /// The trust bundle: PEM root certificates peers' chains must lead to.
    pub roots_pem: Vec<String>,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
}

/// What went wrong building TLS material or checking a peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate chain is empty: need at least the leaf certificate")]
    EmptyChain,
    #[error("no PEM certificate found in {what}")]
    NoPem { what: String },
    #[error("cannot parse {what} as PEM: {reason}")]
    Pem { what: String, reason: String },
    #[error("cannot parse certificate ({what}): {reason}")]
    Certificate { what: String, reason: String },
    #[error("cannot use the private key: {0}")]
    Key(String),
    #[error("certificate has no SPIFFE URI SAN (spiffe://<td>/ns/<ns>/sa/<sa>)")]
    NoSpiffeSan,
    #[error("certificate has {0} SPIFFE URI SANs; an SVID must carry exactly one")]
    ManySpiffeSans(usize),
    #[error("certificate URI SAN is not a valid identity: {0}")]
    BadSpiffeSan(#[from] crate::identity::IdentityError),
    #[error("leaf certificate is for {found}, but the caller said it is {expected}")]
    IdentityMismatch {
        expected: Box<Identity>,
        found: Box<Identity>,
    },
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("trust bundle is empty: need at least one root certificate")]
    NoRoots,
    #[error("root certificate is not usable as a trust anchor: {0}")]
    BadRoot(String),
    #[error("rustls rejected the configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

impl WorkloadCert {
    /// Parses and checks the pieces: the leaf parses, its SPIFFE URI SAN equals `identity`,
    /// the key parses, and every root parses. Fills `not_before`/`not_after` from the leaf.
    ///
    /// Each entry of `chain_pem` and `roots_pem` may hold one or several PEM certificates;
    /// they are split so that each entry of the stored vectors is one certificate.
    pub fn new(
        identity: Identity,
        chain_pem: Vec<String>,
        key_pem: String,
        roots_pem: Vec<String>,
    ) -> Result<Self, TlsError> {
        let chain_pem = split_pem_certs(&chain_pem, "certificate chain")?;
        let leaf_pem = chain_pem.first().ok_or(TlsError::EmptyChain)?;
        let leaf_der = pem_to_der(leaf_pem, "leaf certificate")?;
        let (not_before, not_after, found) = {
            let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&leaf_der)
                .map_err(|e| TlsError::Certificate {
                    what: "leaf".into(),
                    reason: e.to_string(),
                })?;
            let validity = leaf.validity();
            (
                asn1_to_system_time(validity.not_before.timestamp()),
                asn1_to_system_time(validity.not_after.timestamp()),
                spiffe_identity_of(&leaf)?,
            )
        };
        if found != identity {
            return Err(TlsError::IdentityMismatch {
                expected: Box::new(identity),
                found: Box::new(found),
            });
        }
        // Parse the key now so that a broken key fails here, not at the first handshake.
        let key = parse_key(&key_pem)?;
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Key(e.to_string()))?;
        let roots_pem = split_pem_certs(&roots_pem, "trust bundle")?;
        if roots_pem.is_empty() {
            return Err(TlsError::NoRoots);
        }
        for root in &roots_pem {
            let der = pem_to_der(root, "root certificate")?;
            webpki::anchor_from_trusted_cert(&der).map_err(|e| TlsError::BadRoot(e.to_string()))?;
        }
        Ok(WorkloadCert {
            identity,
            chain_pem,
            key_pem,
            roots_pem,
            not_before,
            not_after,
        })
    }

    /// The chain as DER, leaf first.
    fn chain_der(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        self.chain_pem
            .iter()
            .map(|p| pem_to_der(p, "certificate chain"))
            .collect()
    }

    /// The roots as owned webpki trust anchors.
    fn trust_anchors(&self) -> Result<Vec<TrustAnchor<'static>>, TlsError> {
        let mut anchors = Vec::with_capacity(self.roots_pem.len());
        for root in &self.roots_pem {
            let der = pem_to_der(root, "root certificate")?;
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| TlsError::BadRoot(e.to_string()))?;
            anchors.push(anchor.to_owned());
        }
        if anchors.is_empty() {
            return Err(TlsError::NoRoots);
        }
        Ok(anchors)
    }
}

/// Installs ring as rustls' process-wide default provider.
///
/// Idempotent and safe to call from many places: only the first call does anything, and a
/// provider installed earlier by someone else is left alone. The configurations built here do
/// not need it (they name their provider explicitly); other rustls users in the process might.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means a provider is already installed, which is what we want anyway.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// ring, restricted to the two TLS 1.3 suites HBONE uses.
///
/// Not aws-lc-rs: its AES-GCM is 1.4× ring's here, but sealing and opening are ~11% of a bulk
/// tunnel's ztunnel CPU, so it would save ~3%, and its code costs an idle ztunnel 1.4 MiB of
/// RSS (README, "AES-GCM from aws-lc-rs, tried and reverted").
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256];
    Arc::new(provider)
}

const ALPN_H2: &[u8] = b"h2";

/// The rustls server configuration for an HBONE listener.
///
/// TLS 1.3 only, suites TLS13_AES_256_GCM_SHA384 and TLS13_AES_128_GCM_SHA256, ALPN `h2`, no
/// session resumption or tickets. A client certificate is required: its chain must verify
/// against `cert.roots_pem` for clientAuth, its leaf must carry one SPIFFE URI SAN, and that
/// identity's trust domain must equal `cert.identity.trust_domain`. Anything else fails the
/// handshake. Who may do what is decided later, by policy.
pub fn server_config(cert: &WorkloadCert) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = SpiffeClientVerifier {
        roots: cert.trust_anchors()?,
        trust_domain: cert.identity.trust_domain.clone(),
        algs: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain_der()?, parse_key(&cert.key_pem)?)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Resumption is off, as in Istio: every connection proves its certificate afresh.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    // kTLS ([`crate::hbone`]'s kernel path) takes the traffic keys out of rustls.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The rustls client configuration for dialing an HBONE peer.
///
/// Same versions, suites and ALPN as [`server_config`]; presents `cert`; sends no SNI
/// (`enable_sni = false`, so the `ServerName` given to the connector is never sent — use
/// [`dummy_server_name`]); resumption disabled. The server's chain must verify against
/// `cert.roots_pem` for serverAuth and its SPIFFE URI SAN must be one of `expected`;
/// otherwise the handshake fails with an error naming the identity seen and the ones expected.
pub fn client_config(
    cert: &WorkloadCert,
    expected: &[Identity],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots: cert.trust_anchors()?,
        expected: expected.to_vec(),
        algs: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain_der()?, parse_key(&cert.key_pem)?)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// A placeholder server name for `TlsConnector::connect`: HBONE sends no SNI, and our verifier
/// checks the SPIFFE identity instead of a name, so its value never matters.
pub fn dummy_server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// The SPIFFE identity in a peer's leaf certificate (the first of `certs`).
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<Identity, TlsError> {
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    identity_of_der(leaf)
}

fn identity_of_der(der: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
        TlsError::Certificate {
            what: "peer leaf".into(),
            reason: e.to_string(),
        }
    })?;
    spiffe_identity_of(&cert)
}

/// Reads the one SPIFFE URI SAN of a certificate. Other SANs (DNS, IP) are ignored, but a
/// certificate claiming two SPIFFE identities is refused: which one would it be?
fn spiffe_identity_of(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Identity, TlsError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Certificate {
            what: "subjectAltName".into(),
            reason: e.to_string(),
        })?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(TlsError::NoSpiffeSan),
        [one] => Ok(one.parse()?),
        many => Err(TlsError::ManySpiffeSans(many.len())),
    }
}

/// Splits PEM text into one string per certificate, failing on text that holds none.
fn split_pem_certs(pems: &[String], what: &str) -> Result<Vec<String>, TlsError> {
    let mut out = Vec::new();
    for text in pems {
        let mut found = 0;
        for item in CertificateDer::pem_slice_iter(text.as_bytes()) {
            let der = item.map_err(|e| TlsError::Pem {
                what: what.into(),
                reason: e.to_string(),
            })?;
            found += 1;
            out.push(encode_pem("CERTIFICATE", &der));
        }
        if found == 0 {
            return Err(TlsError::NoPem { what: what.into() });
        }
    }
    Ok(out)
}

/// Standard PEM encoding (64-column base64), the form rcgen and openssl write.
///
/// A few lines here rather than a dependency on the `pem` crate for one function.
pub(crate) fn encode_pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = match chunk {
            [a, b, c] => (u32::from(*a) << 16) | (u32::from(*b) << 8) | u32::from(*c),
            [a, b] => (u32::from(*a) << 16) | (u32::from(*b) << 8),
            [a] => u32::from(*a) << 16,
            _ => 0,
        };
        let chars = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63]
            .map(|i| ALPHABET[i as usize] as char);
        b64.push(chars[0]);
        b64.push(chars[1]);
        b64.push(if chunk.len() > 1 { chars[2] } else { '=' });
        b64.push(if chunk.len() > 2 { chars[3] } else { '=' });
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so this never loses anything.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_to_der(pem: &str, what: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: what.into(),
        reason: e.to_string(),
    })
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError::Key(format!("cannot parse key PEM: {e}")))
}

fn asn1_to_system_time(unix_secs: i64) -> SystemTime {
    match u64::try_from(unix_secs) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        // Before 1970: clamp; such a certificate is simply "valid since long ago".
        Err(_) => UNIX_EPOCH,
    }
}

/// Verifies a chain for `usage` against `roots` with webpki, mapping failures to rustls errors.
fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[TrustAnchor<'static>],
    algs: &WebPkiSupportedAlgorithms,
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| webpki_to_rustls(&e))?;
    cert.verify_for_usage(algs.all, roots, intermediates, now, usage, None, None)
        .map(|_| ())
        .map_err(|e| webpki_to_rustls(&e))
}

fn webpki_to_rustls(e: &webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(SpiffeError(format!(
            "certificate chain rejected: {other}"
        ))))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// A verification failure with a message meant for humans. Its `Debug` prints the message,
/// because rustls shows `CertificateError::Other` with `{:?}`.
struct SpiffeError(String);

impl fmt::Debug for SpiffeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for SpiffeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpiffeError {}

fn spiffe_reject(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(SpiffeError(
        msg,
    )))))
}

/// Client side: checks the server's chain and that its identity is one we expect.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Vec<TrustAnchor<'static>>,
    expected: Vec<Identity>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(
            end_entity,
            intermediates,
            &self.roots,
            &self.algs,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let seen = identity_of_der(end_entity).map_err(|e| {
            spiffe_reject(format!(
                "server certificate has no usable SPIFFE identity: {e}"
            ))
        })?;
        if !self.expected.contains(&seen) {
            let expected: Vec<String> = self.expected.iter().map(Identity::to_string).collect();
            tracing::debug!(%seen, ?expected, "refusing HBONE server: unexpected identity");
            return Err(spiffe_reject(format!(
                "server identity {seen} is not one of the expected identities [{}]",
                expected.join(", ")
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: checks the client's chain and that it belongs to our trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    roots: Vec<TrustAnchor<'static>>,
    trust_domain: String,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Every peer uses the mesh's bundle; hints would only leak our root names.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(
            end_entity,
            intermediates,
            &self.roots,
            &self.algs,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        let seen = identity_of_der(end_entity).map_err(|e| {
            spiffe_reject(format!(
                "client certificate has no usable SPIFFE identity: {e}"
            ))
        })?;
        if seen.trust_domain != self.trust_domain {
            tracing::debug!(%seen, trust_domain = %self.trust_domain, "refusing HBONE client: foreign trust domain");
            return Err(spiffe_reject(format!(
                "client identity {seen} is not in trust domain {:?}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Turns an error from a TLS handshake into a readable message, unwrapping our own verifier's
/// message when it is the cause (rustls would otherwise show it wrapped in Debug noise).
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    if let Some(inner) = e.get_ref()
        && let Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other)))) =
            inner.downcast_ref::<rustls::Error>()
    {
        return other.to_string();
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encoding_round_trips() {
        let der: Vec<u8> = (0u8..=200).collect();
        let pem = encode_pem("CERTIFICATE", &der);
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).expect("parses");
        assert_eq!(back.as_ref(), der.as_slice());
    }
}
