//! How the HTTP echo server misbehaves on demand: the pod-wide behaviour set by `serve` flags or
//! `POST /control`, and the per-request overrides (`x-echo-*` headers, `echo-*` query
//! parameters). Pure data and rules, no I/O: the server (`http_serve`) applies them; tests and
//! demos build the JSON with [`Behaviour::to_json`].
//!
//! Control JSON: `{"fail": 503 | "reset" | "stall" | "ok", "every": N, "delay_ms": N}`; absent
//! fields take their defaults (`ok`, 1, 0), so each POST states the whole behaviour.

use std::time::Duration;

use serde_json::{Value, json};

use crate::parse_duration;

/// What a failing request gets instead of the echo reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Failure {
    /// Answer normally.
    #[default]
    None,
    /// Answer this status (with a short plain-text body).
    Status(u16),
    /// Reset the connection (HTTP/1: TCP RST; HTTP/2: the stream) without answering.
    Reset,
    /// Never answer (bounded by [`STALL_LIMIT`]).
    Stall,
}

/// How long a stalled request is held before the server gives up on it.
pub const STALL_LIMIT: Duration = Duration::from_secs(600);

/// The pod-wide behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behaviour {
    pub fail: Failure,
    /// Only every `every`-th request fails (1 = all of them); counted over the pod's requests.
    pub every: u64,
    /// Added before every answer (failing or not).
    pub delay: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            fail: Failure::None,
            every: 1,
            delay: Duration::ZERO,
        }
    }
}

/// A control request or an override that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BehaviourError {
    #[error("control body is not JSON: {0}")]
    NotJson(String),
    #[error(
        "control body must be a JSON object like {{\"fail\": 503, \"every\": 2, \"delay_ms\": 100}}"
    )]
    NotObject,
    #[error("unknown control field {0:?}: use fail, every, delay_ms")]
    UnknownField(String),
    #[error("fail {0} is not a failure: use a status 100..=599, \"reset\", \"stall\" or \"ok\"")]
    BadFail(String),
    #[error("{field} {value} is not a whole number{extra}")]
    BadNumber {
        field: &'static str,
        value: String,
        extra: &'static str,
    },
    #[error("delay {0:?}: use e.g. 500ms or 2s")]
    BadDelay(String),
}

impl Failure {
    /// `503`, `"reset"`, `"stall"`, `"ok"` (also `"none"`), as text or a JSON number.
    pub fn parse(text: &str) -> Result<Self, BehaviourError> {
        match text.trim() {
            "ok" | "none" => Ok(Failure::None),
            "reset" => Ok(Failure::Reset),
            "stall" => Ok(Failure::Stall),
            code => match code.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => Ok(Failure::Status(c)),
                _ => Err(BehaviourError::BadFail(text.to_owned())),
            },
        }
    }

    fn to_json(self) -> Value {
        match self {
            Failure::None => json!("ok"),
            Failure::Status(c) => json!(c),
            Failure::Reset => json!("reset"),
            Failure::Stall => json!("stall"),
        }
    }
}

impl Behaviour {
    /// Parses a `POST /control` body.
    pub fn from_json(body: &[u8]) -> Result<Self, BehaviourError> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| BehaviourError::NotJson(e.to_string()))?;
        let obj = v.as_object().ok_or(BehaviourError::NotObject)?;
        let mut b = Behaviour::default();
        for (k, v) in obj {
            match k.as_str() {
                "fail" => {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    b.fail = Failure::parse(&text)?;
                }
                "every" => {
                    b.every = whole(v, "every")?;
                    if b.every == 0 {
                        return Err(BehaviourError::BadNumber {
                            field: "every",
                            value: "0".into(),
                            extra: " ≥ 1",
                        });
                    }
                }
                "delay_ms" => b.delay = Duration::from_millis(whole(v, "delay_ms")?),
                other => return Err(BehaviourError::UnknownField(other.to_owned())),
            }
        }
        Ok(b)
    }

    /// The control JSON for this behaviour (what `GET /control` reports, `requests` aside).
    pub fn to_json(&self) -> Value {
        json!({
            "fail": self.fail.to_json(),
            "every": self.every,
            "delay_ms": u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// What the pod's `n`-th request (1-based) gets: every `every`-th one fails.
    pub fn failure_for(&self, n: u64) -> Failure {
        if self.fail != Failure::None && n.is_multiple_of(self.every.max(1)) {
            self.fail
        } else {
            Failure::None
        }
    }
}

fn whole(v: &Value, field: &'static str) -> Result<u64, BehaviourError> {
    v.as_u64().ok_or_else(|| BehaviourError::BadNumber {
        field,
        value: v.to_string(),
        extra: "",
    })
}

/// One request's own overrides: `x-echo-fail` / `echo-fail` (a [`Failure`]: `503`, `reset`,
/// `stall`) and `x-echo-delay` / `echo-delay` (`300ms`, `2s`). A header wins over the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Overrides {
    pub fail: Option<Failure>,
    pub delay: Option<Duration>,
}

impl Overrides {
    /// From the request's `x-echo-fail`/`x-echo-delay` header values and its query string.
    pub fn parse(
        fail_header: Option<&str>,
        delay_header: Option<&str>,
        query: Option<&str>,
    ) -> Result<Self, BehaviourError> {
        let param = |name: &str| {
            query?
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
        };
        let fail = fail_header.or_else(|| param("echo-fail"));
        let delay = delay_header.or_else(|| param("echo-delay"));
        Ok(Overrides {
            fail: fail.map(Failure::parse).transpose()?,
            delay: delay
                .map(|d| parse_duration(d).map_err(|_| BehaviourError::BadDelay(d.to_owned())))
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_json_round_trips_and_defaults() {
        let b = Behaviour::from_json(br#"{"fail": 503, "every": 2, "delay_ms": 150}"#).unwrap();
        assert_eq!(b.fail, Failure::Status(503));
        assert_eq!(b.every, 2);
        assert_eq!(b.delay, Duration::from_millis(150));
        assert_eq!(
            Behaviour::from_json(b.to_json().to_string().as_bytes()).unwrap(),
            b
        );
        assert_eq!(
            Behaviour::from_json(br#"{"fail": "ok"}"#).unwrap(),
            Behaviour::default()
        );
        assert_eq!(
            Behaviour::from_json(br#"{"fail": "reset"}"#).unwrap().fail,
            Failure::Reset
        );
        assert_eq!(
            Behaviour::from_json(br#"{"fail": "503"}"#).unwrap().fail,
            Failure::Status(503)
        );
    }

    #[test]
    fn control_json_errors_name_the_problem() {
        let err = |b: &[u8]| Behaviour::from_json(b).unwrap_err().to_string();
        assert!(err(br#"{"fial": 503}"#).contains("\"fial\""));
        assert!(err(br#"{"fail": 700}"#).contains("700"));
        assert!(err(br#"{"fail": "boom"}"#).contains("boom"));
        assert!(err(br#"{"every": 0}"#).contains("every"));
        assert!(err(br#"{"delay_ms": -1}"#).contains("delay_ms"));
        assert!(err(b"[1]").contains("object"));
        assert!(err(b"nope").contains("not JSON"));
    }

    #[test]
    fn every_nth_request_fails() {
        let b = Behaviour {
            fail: Failure::Status(500),
            every: 3,
            ..Default::default()
        };
        let failed: Vec<u64> = (1..=9)
            .filter(|n| b.failure_for(*n) != Failure::None)
            .collect();
        assert_eq!(failed, [3, 6, 9]);
        assert_eq!(Behaviour::default().failure_for(1), Failure::None);
    }

    #[test]
    fn overrides_from_headers_and_query() {
        let o = Overrides::parse(None, None, Some("a=1&echo-fail=503&echo-delay=20ms")).unwrap();
        assert_eq!(o.fail, Some(Failure::Status(503)));
        assert_eq!(o.delay, Some(Duration::from_millis(20)));
        let o = Overrides::parse(Some("reset"), None, Some("echo-fail=503")).unwrap();
        assert_eq!(o.fail, Some(Failure::Reset));
        assert_eq!(
            Overrides::parse(None, None, None).unwrap(),
            Overrides::default()
        );
        assert!(Overrides::parse(None, Some("soon"), None).is_err());
    }
}
