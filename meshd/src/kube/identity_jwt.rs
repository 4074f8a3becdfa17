//! What a token says about itself, read without trusting it: a JWT's `exp`, used only to
//! keep a verdict the API gave from outliving the token. Owns nothing else; never decides
//! whether a token is valid (that is the API's TokenReview).

use std::time::{Duration, SystemTime};

use super::identity_cache::MAX_TOKEN_BYTES;

/// How long until the token's own `exp` claim, if it is a JWT that has one; else forever.
/// Read without verifying the signature: it only ever shortens how long a verdict the API
/// gave is kept.
pub fn until_expiry(token: &str) -> Duration {
    let exp = token
        .split('.')
        .nth(1)
        .and_then(base64url)
        .and_then(|claims| serde_json::from_slice::<serde_json::Value>(&claims).ok())
        .and_then(|c| c.get("exp").and_then(serde_json::Value::as_u64));
    let Some(exp) = exp else {
        return Duration::MAX;
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Duration::from_secs(exp.saturating_sub(now))
}

/// Unpadded base64url (RFC 4648 §5), as JWT segments are; `None` on anything else.
fn base64url(s: &str) -> Option<Vec<u8>> {
    if s.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_decodes_jwt_segments() {
        assert_eq!(base64url("eyJleHAiOjF9").unwrap(), br#"{"exp":1}"#);
        assert_eq!(base64url("aGk").unwrap(), b"hi");
        assert!(base64url("a+b").is_none());
    }

    #[test]
    fn a_verdict_is_not_kept_past_the_tokens_expiry() {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let seg = |v: &str| {
            // Encode by hand through the decoder's inverse: a tiny helper for the test.
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let (mut out, mut acc, mut bits) = (String::new(), 0u32, 0u32);
            for b in v.bytes() {
                acc = (acc << 8) | u32::from(b);
                bits += 8;
                while bits >= 6 {
                    bits -= 6;
                    out.push(A[((acc >> bits) & 63) as usize] as char);
                }
            }
            if bits > 0 {
                out.push(A[((acc << (6 - bits)) & 63) as usize] as char);
            }
            out
        };
        let jwt = format!("h.{}.s", seg(&format!("{{\"exp\":{}}}", now + 10)));
        assert!(until_expiry(&jwt) <= Duration::from_secs(10));
        let past = format!("h.{}.s", seg("{\"exp\":5}"));
        assert_eq!(until_expiry(&past), Duration::ZERO);
        assert_eq!(until_expiry("opaque"), Duration::MAX);
    }
}
