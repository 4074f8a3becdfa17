//! Where an image says it comes from: the source revision (git) and the one timestamp used for
//! every file and the config's `created` (never the clock: same source, same image). Owns
//! asking git only.

use std::path::Path;
use std::process::Command;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// HEAD's commit, `-dirty` when tracked files differ from it; `unknown` outside a checkout.
pub fn git_revision(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        return "unknown".into();
    };
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(s) if s.is_empty() => head,
        _ => format!("{head}-dirty"),
    }
}

/// Every file's mtime and the config's `created`: `$SOURCE_DATE_EPOCH`, else HEAD's commit
/// time, else the epoch — never the clock, so rebuilding the same source gives the same image.
pub fn source_date(root: &Path) -> u64 {
    if let Some(t) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return t;
    }
    Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["log", "-1", "--format=%ct"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// Seconds since the epoch as RFC 3339 UTC (`2025-11-30T10:53:20Z`); past year 9999, which
/// RFC 3339 cannot write, the last second of 9999 (`SOURCE_DATE_EPOCH` is the user's).
pub fn rfc3339(secs: u64) -> String {
    const LAST: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = i64::try_from(secs).map_or(LAST, |s| s.min(LAST));
    let t = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    t.format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_764_500_000), "2025-11-30T10:53:20Z");
        assert_eq!(super::rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(super::rfc3339(1 << 40), "9999-12-31T23:59:59Z");
    }
}
