//! Small helpers for server-set metadata: timestamps in the API's RFC 3339 form, uids,
//! generateName suffixes, and the "did anything but metadata/status change" test that drives
//! `metadata.generation`. Pure functions only.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2026-11-30T07:43:47Z` (seconds precision, UTC), as `metav1.Time` serializes; past year
/// 9999, which RFC 3339 cannot write (a client's expirationSeconds may ask), the last second of it.
pub(crate) fn rfc3339(unix: u64) -> String {
    const LAST: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = i64::try_from(unix).map_or(LAST, |s| s.min(LAST));
    let t = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    t.format(&Rfc3339).unwrap_or_default()
}

pub(crate) fn now_rfc3339() -> String {
    rfc3339(now_unix())
}

/// A random v4-style uid.
pub(crate) fn uid() -> String {
    let b: [u8; 16] = rand::rng().random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Five characters from the alphabet the real server uses for `generateName`.
pub(crate) fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Whether `a` and `b` differ in anything but `metadata` (and `status`, when `skip_status`).
pub(crate) fn spec_changed(a: &Value, b: &Value, skip_status: bool) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("metadata");
            o.remove("apiVersion");
            if skip_status {
                o.remove("status");
            }
        }
        v
    };
    strip(a) != strip(b)
}

/// Whether two stored forms are the same write (ignoring resourceVersion, managedFields and
/// apiVersion, which a no-op write may carry differently).
pub(crate) fn same_object(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("apiVersion");
        }
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        v
    };
    strip(a) == strip(b)
}

/// Object names the server accepts: 1–253 characters, lowercase alphanumerics, `-` and `.`
/// (DNS subdomain), which covers every kind the double serves.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_024_627), "2026-11-30T07:43:47Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(1 << 40), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn uids_look_like_uuids() {
        let u = uid();
        assert_eq!(u.len(), 36);
        assert_ne!(u, uid());
    }
}
