//! The demo's token issuer: a fresh ES256 (P-256) key made with ring, its public half as a JWKS,
//! and compact JWS tokens signed with it. Signing only: verification is the waypoint's (the
//! jsonwebtoken crate), which is what the demo checks.

use anyhow::Context;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

pub(super) struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

/// Every signer uses this key id, so a forged token names the real key and fails on its
/// signature rather than on an unknown `kid`.
const KID: &str = "demo";

impl Signer {
    pub fn new() -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("generating a P-256 key failed"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| anyhow::anyhow!("loading the new P-256 key: {e}"))?;
        Ok(Signer { key, rng })
    }

    /// `{"keys": [the public key]}` (RFC 7517/7518: x and y of the uncompressed point).
    pub fn jwks(&self) -> String {
        let point = self.key.public_key().as_ref();
        // 0x04 || x (32 bytes) || y (32 bytes)
        let (x, y) = point[1..].split_at(32);
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": KID,
            "x": b64url(x), "y": b64url(y),
        }]})
        .to_string()
    }

    /// A compact JWS of `claims` (ES256 signatures are r || s, 64 bytes, as ring makes them).
    pub fn token(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": KID});
        let input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .ok()
            .context("signing the token failed")?;
        Ok(format!("{input}.{}", b64url(sig.as_ref())))
    }
}

/// Base64url without padding (RFC 7515 §2).
fn b64url(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b64url_matches_rfc4648_vectors_without_padding() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64url(plain.as_bytes()), enc);
        }
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn tokens_verify_with_the_public_key_only() {
        let s = Signer::new().unwrap();
        let t = s.token(&serde_json::json!({"sub": "a"})).unwrap();
        let (input, sig) = t.rsplit_once('.').unwrap();
        let point = s.key.public_key().as_ref().to_vec();
        let sig = decode(sig);
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            point,
        );
        assert!(key.verify(input.as_bytes(), &sig).is_ok());
        let other = Signer::new()
            .unwrap()
            .token(&serde_json::json!({"sub": "a"}))
            .unwrap();
        let (input2, sig2) = other.rsplit_once('.').unwrap();
        assert!(key.verify(input2.as_bytes(), &decode(sig2)).is_err());
    }

    fn decode(s: &str) -> Vec<u8> {
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in s.bytes() {
            let v = ABC.iter().position(|a| *a == c).unwrap() as u32;
            bits = bits << 6 | v;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        out
    }
}
