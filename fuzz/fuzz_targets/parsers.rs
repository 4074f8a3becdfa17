//! The small parsers a peer, an operator or a file can feed: SPIFFE identities, a peer
//! certificate's identity (DER, x509-parser), node tokens, and meshd's listen address and
//! duration flags. The first byte picks the parser; the rest is its input. No panics, and:
//! identities and listen addresses print back to what parses to the same value; a token minted
//! for any node name verifies as that name, and none verifies under a secret it was not minted
//! with; a parsed duration is never zero.
#![no_main]

use std::str::FromStr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshcore::Identity;
use meshcore::nodeauth::NodeAuthority;
use meshd::settings::{Listen, parse_duration};
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = std::str::from_utf8(rest).ok();
    match (which % 5, text) {
        (0, Some(s)) => {
            if let Ok(id) = Identity::from_str(s) {
                let again = Identity::from_str(&id.to_string());
                assert_eq!(again.as_ref(), Ok(&id), "{s:?} does not round-trip");
            }
        }
        (1, _) => {
            // What the HBONE server reads from a verified chain; here the DER is unchecked, so
            // the parser itself is what a hostile CA-signed (or pre-verification) cert meets.
            let der = CertificateDer::from(rest);
            if let Ok(id) = meshcore::tls::peer_identity(std::slice::from_ref(&der)) {
                assert_eq!(Identity::from_str(&id.to_string()), Ok(id));
            }
        }
        (2, Some(s)) => {
            let authority = NodeAuthority::new(b"fuzz-secret");
            if authority.verify(Some(s)).is_ok() {
                // A token that also verifies under another secret does not depend on the
                // secret: anyone could mint it.
                let other = NodeAuthority::new(b"another-secret");
                assert!(
                    other.verify(Some(s)).is_err(),
                    "{s:?} verifies under any secret"
                );
            }
            if !s.is_empty() {
                let token = format!("Bearer {}", authority.token(s, Duration::from_secs(3600)));
                assert_eq!(authority.verify(Some(&token)).as_deref(), Ok(s));
            }
        }
        (3, Some(s)) => {
            if let Ok(d) = parse_duration(s) {
                assert!(!d.is_zero(), "{s:?} parsed as a zero duration");
            }
        }
        (4, Some(s)) => {
            if let Ok(l) = Listen::from_str(s) {
                assert_eq!(Listen::from_str(&l.to_string()).as_ref(), Ok(&l), "{s:?}");
            }
        }
        _ => {}
    }
});
