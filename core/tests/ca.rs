//! The CA: what signed certificates contain, CSR validation, and keeping the root on disk.
//!
//! Owns only these tests; writes only to temporary directories.

use std::time::{Duration, SystemTime};

use meshcore::Identity;
use meshcore::ca::{CaError, CertAuthority, generate_csr};
use meshcore::tls::{TlsError, WorkloadCert};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

const HOUR: Duration = Duration::from_secs(3600);

fn der_of(pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
    pem.contents
}

#[test]
fn sign_csr_sets_exactly_the_identity_uri_san() {
    let ca = CertAuthority::new_in_memory("td").expect("ca");
    // The CSR asks for one identity; the CA decides another. Only the CA's choice may appear.
    let asked = Identity::new("td", "ns", "asked");
    let granted = Identity::new("td", "ns", "granted");
    let (key_pem, csr_pem) = generate_csr(&asked).expect("csr");
    let leaf_pem = ca.sign_csr(&csr_pem, &granted, HOUR).expect("sign");

    let der = der_of(&leaf_pem);
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).expect("parse");
    let san = cert
        .subject_alternative_name()
        .expect("san ext")
        .expect("has san");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI("spiffe://td/ns/ns/sa/granted")]
    );
    assert!(!cert.is_ca());
    let eku = cert
        .extended_key_usage()
        .expect("eku ext")
        .expect("has eku")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    // Validity: from about a minute ago to about an hour ahead.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    assert!(
        (now - 70..=now - 50).contains(&nb),
        "not_before {nb} vs now {now}"
    );
    assert!(
        (now + 3590..=now + 3610).contains(&na),
        "not_after {na} vs now {now}"
    );

    // The workload's key and the signed certificate fit together.
    let cert = WorkloadCert::new(
        granted.clone(),
        vec![leaf_pem.clone()],
        key_pem,
        vec![ca.root_pem().to_string()],
    )
    .expect("usable workload cert");
    assert_eq!(cert.identity, granted);
    // And the certificate does not prove the identity the CSR asked for.
    let (key2, _) = generate_csr(&asked).expect("csr");
    let err = WorkloadCert::new(asked, vec![leaf_pem], key2, vec![ca.root_pem().to_string()])
        .expect_err("mismatch");
    assert!(matches!(err, TlsError::IdentityMismatch { .. }), "{err:?}");
}

#[test]
fn garbage_csr_is_refused_clearly() {
    let ca = CertAuthority::new_in_memory("td").expect("ca");
    let id = Identity::new("td", "ns", "sa");
    let err = ca
        .sign_csr("not a csr at all", &id, HOUR)
        .expect_err("garbage");
    assert!(matches!(err, CaError::CsrPem(_)), "{err:?}");
    assert!(err.to_string().contains("CSR"), "{err}");

    let junk = "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE REQUEST-----\n";
    let err = ca.sign_csr(junk, &id, HOUR).expect_err("junk DER");
    assert!(matches!(err, CaError::CsrParse(_)), "{err:?}");

    // A real CSR whose signature no longer matches: flip one byte of the signature.
    let (_, csr_pem) = generate_csr(&id).expect("csr");
    let mut der = der_of(&csr_pem);
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = pem_encode("CERTIFICATE REQUEST", &der);
    let err = ca.sign_csr(&tampered, &id, HOUR).expect_err("tampered");
    assert!(
        matches!(err, CaError::CsrSignature | CaError::CsrParse(_)),
        "{err:?}"
    );
}

#[test]
fn load_or_create_keeps_the_root_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca"); // does not exist yet
    let first = CertAuthority::load_or_create(&ca_dir, "td").expect("create");
    let second = CertAuthority::load_or_create(&ca_dir, "td").expect("load");
    assert_eq!(first.root_pem(), second.root_pem());
    assert_eq!(second.trust_domain(), "td");

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ca_dir.join("root-key.pem"))
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A certificate from the reloaded CA verifies against the original root.
    let id = Identity::new("td", "ns", "sa");
    let cert = second.mint(&id, HOUR).expect("mint");
    WorkloadCert::new(
        id,
        cert.chain_pem,
        cert.key_pem,
        vec![first.root_pem().to_string()],
    )
    .expect("chain");

    let (_, cert) = x509_parser::pem::parse_x509_pem(first.root_pem().as_bytes()).expect("pem");
    let (_, root) =
        x509_parser::certificate::X509Certificate::from_der(&cert.contents).expect("root");
    assert!(root.is_ca());
    let cn = root
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok());
    assert_eq!(cn, Some("mesh root td"));

    // Half a root is an error that says what to do, not a silent new root.
    std::fs::remove_file(ca_dir.join("root-key.pem")).expect("rm");
    let err = CertAuthority::load_or_create(&ca_dir, "td").expect_err("half root");
    assert!(matches!(err, CaError::HalfRoot { .. }), "{err:?}");
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for c in der.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            b64.push(if i <= c.len() {
                A[((n >> shift) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

/// A CSR for `id` signed by a fresh key of `alg`.
fn csr_with(alg: &'static rcgen::SignatureAlgorithm, id: &Identity) -> String {
    let key = rcgen::KeyPair::generate_for(alg).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_uri().try_into().expect("uri"))];
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

#[test]
fn only_p256_keys_are_certified() {
    let ca = CertAuthority::new_in_memory("td").expect("ca");
    let id = Identity::new("td", "ns", "sa");
    let ok = csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, &id);
    ca.sign_csr(&ok, &id, HOUR).expect("P-256 is certified");
    for (alg, what) in [
        (&rcgen::PKCS_ECDSA_P384_SHA384, "elliptic curve"),
        (&rcgen::PKCS_ED25519, "key algorithm"),
    ] {
        let csr = csr_with(alg, &id);
        let err = ca.sign_csr(&csr, &id, HOUR).expect_err("refused");
        assert!(matches!(err, CaError::CsrKey(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(what) && msg.contains("ECDSA P-256"), "{msg}");
    }
}

#[test]
fn existing_ca_dir_and_loose_key_are_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    CertAuthority::load_or_create(&ca_dir, "td").expect("create");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&ca_dir), 0o700, "a new CA dir is private");
    // As an older version (or an operator's `mkdir`) left them.
    let set = |p: &std::path::Path, m| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    set(&ca_dir, 0o755);
    set(&ca_dir.join("root-key.pem"), 0o644);
    CertAuthority::load_or_create(&ca_dir, "td").expect("load");
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&ca_dir.join("root-key.pem")), 0o600);
}
