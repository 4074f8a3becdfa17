//! Parsing of the human-friendly durations used on the command line
//! (`500ms`, `5s`, `2m`).

use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationParseError {
    #[error("empty duration")]
    Empty,
    #[error("duration {0:?} has no unit; use e.g. 500ms, 5s or 2m")]
    MissingUnit(String),
    #[error("duration {0:?} has an unknown unit; use ms, s or m")]
    UnknownUnit(String),
    #[error("duration {0:?} does not start with a whole number")]
    BadNumber(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses `<integer><unit>` where unit is `ms`, `s` or `m` (e.g. `500ms`, `5s`,
/// `2m`). Surrounding whitespace is ignored; a missing unit is an error so that
/// `5` is never silently read as seconds or milliseconds.
pub fn parse_duration(input: &str) -> Result<Duration, DurationParseError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationParseError::Empty);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(DurationParseError::BadNumber(input.to_owned()));
    }
    if unit.is_empty() {
        return Err(DurationParseError::MissingUnit(input.to_owned()));
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| DurationParseError::Overflow(input.to_owned()))?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        _ => return Err(DurationParseError::UnknownUnit(input.to_owned())),
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| DurationParseError::Overflow(input.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_duration(""), Err(DurationParseError::Empty));
        assert!(matches!(
            parse_duration("5"),
            Err(DurationParseError::MissingUnit(_))
        ));
        assert!(matches!(
            parse_duration("5h"),
            Err(DurationParseError::UnknownUnit(_))
        ));
        assert!(matches!(
            parse_duration("s"),
            Err(DurationParseError::BadNumber(_))
        ));
        assert!(matches!(
            parse_duration("1.5s"),
            Err(DurationParseError::UnknownUnit(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999s"),
            Err(DurationParseError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("18446744073709551615m"),
            Err(DurationParseError::Overflow(_))
        ));
    }
}
