//! Command-line-level values meshd is configured with: where it listens and how long
//! certificates live. Owns parsing them from text; does not open sockets or read files.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error(
        "bad listen address {0:?}: use unix:/path/to/meshd.sock or IP:PORT (e.g. 127.0.0.1:15010)"
    )]
    Listen(String),
    #[error("bad duration {0:?}: use a number with a unit, e.g. 500ms, 10s, 5m, 24h, 1d or 1h30m")]
    Duration(String),
    #[error("duration {0:?} must be greater than zero")]
    ZeroDuration(String),
}

/// Where the gRPC API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket path (local mode).
    Unix(PathBuf),
    /// gRPC over TLS on TCP (a server certificate from the mesh CA; never plaintext).
    Tcp(SocketAddr),
}

impl FromStr for Listen {
    type Err = SettingsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(SettingsError::Listen(s.to_string()));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>()
            .map(Listen::Tcp)
            .map_err(|_| SettingsError::Listen(s.to_string()))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Parses `10s`, `5m`, `24h`, `1d`, `500ms` and sums like `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, SettingsError> {
    let bad = || SettingsError::Duration(s.to_string());
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            _ => return Err(bad()),
        };
        let part = unit
            .checked_mul(u32::try_from(n).map_err(|_| bad())?)
            .ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    if total.is_zero() {
        return Err(SettingsError::ZeroDuration(s.to_string()));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "10", "s", "10x", "-5s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_duration("0s"),
            Err(SettingsError::ZeroDuration(_))
        ));
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "unix:/run/m.sock".parse(),
            Ok(Listen::Unix("/run/m.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:15010".parse(),
            Ok(Listen::Tcp("127.0.0.1:15010".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:15010".parse::<Listen>().map(|l| l.to_string()),
            Ok("[::1]:15010".to_string())
        );
        assert!("unix:".parse::<Listen>().is_err());
        assert!("localhost".parse::<Listen>().is_err());
    }
}
