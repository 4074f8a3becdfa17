//! Compiled request matches: string matches (exact / prefix / regex with full-match semantics),
//! Gateway API path matches (segment-aware prefixes), header and query parameter lookups.
//!
//! Owns how one value is compared; which matches form a rule is `compile`'s, the order of rules
//! `decide`'s.

use std::borrow::Cow;

use regex::{Regex, RegexBuilder};

use super::spec_istio::StringMatch;

/// Compiles an RE2-syntax pattern that must match the whole value (Istio and Gateway API both
/// mean full match). The size limit keeps a hostile pattern from costing much memory.
pub(crate) fn full_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
}

/// Compiles an RE2-syntax pattern that may match anywhere (Istio `uriRegexRewrite` replaces
/// every match in the path), under the same size limit.
pub(crate) fn search_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern).size_limit(1 << 20).build()
}

/// One compiled string comparison.
#[derive(Debug, Clone)]
pub(crate) enum StrMatch {
    /// `{}`: any value (for headers and query params: the key is present).
    Any,
    Exact(String),
    Prefix(String),
    /// Case-insensitive (Istio `ignoreUriCase`); the pattern is stored lowercase.
    ExactNoCase(String),
    PrefixNoCase(String),
    Regex(Regex),
}

impl StrMatch {
    /// From a validated Istio StringMatch (`ignore_case` only for `uri`).
    pub(crate) fn istio(m: &StringMatch, ignore_case: bool) -> StrMatch {
        match (m, ignore_case) {
            (StringMatch { exact: Some(e), .. }, false) => StrMatch::Exact(e.clone()),
            (StringMatch { exact: Some(e), .. }, true) => StrMatch::ExactNoCase(e.to_lowercase()),
            (
                StringMatch {
                    prefix: Some(p), ..
                },
                false,
            ) => StrMatch::Prefix(p.clone()),
            (
                StringMatch {
                    prefix: Some(p), ..
                },
                true,
            ) => StrMatch::PrefixNoCase(p.to_lowercase()),
            (StringMatch { regex: Some(r), .. }, _) => match full_regex(r) {
                Ok(re) => StrMatch::Regex(re),
                // Validated before: unreachable in practice; never match rather than panic.
                Err(_) => StrMatch::Regex(Regex::new("$.^").expect("constant regex")),
            },
            _ => StrMatch::Any,
        }
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Any => true,
            StrMatch::Exact(e) => value == e,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::ExactNoCase(e) => value.to_lowercase() == *e,
            StrMatch::PrefixNoCase(p) => value.to_lowercase().starts_with(p.as_str()),
            StrMatch::Regex(re) => re.is_match(value),
        }
    }

    /// The prefix, when this is a prefix match (Istio's `rewrite.uri` replaces only it).
    pub(crate) fn prefix_len(&self) -> Option<usize> {
        match self {
            StrMatch::Prefix(p) | StrMatch::PrefixNoCase(p) => Some(p.len()),
            _ => None,
        }
    }
}

/// A Gateway API path match.
#[derive(Debug, Clone)]
pub(crate) enum PathMatch {
    Exact(String),
    /// Stored without a trailing `/`; `""` is `/` (everything).
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    pub(crate) fn prefix(value: &str) -> PathMatch {
        PathMatch::Prefix(value.trim_end_matches('/').to_string())
    }

    /// Segment-aware: prefix `/v2` matches `/v2`, `/v2/` and `/v2/x`, never `/v2example`.
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(e) => path == e,
            PathMatch::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathMatch::Regex(re) => re.is_match(path),
        }
    }
}

/// Splits `path?query` into its two parts (query without the `?`).
pub(crate) fn split_path(path_and_query: &str) -> (&str, Option<&str>) {
    match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    }
}

/// The value of query parameter `name` (first occurrence, percent-decoded; `?key` alone has
/// the value `""`).
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A header's value as matchers see it: all its values joined by `,` (as Envoy does); `None`
/// when absent.
pub(crate) fn header_value<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<Cow<'a, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.to_str().unwrap_or("");
    let mut rest = values.peekable();
    if rest.peek().is_none() {
        return Some(Cow::Borrowed(first));
    }
    let mut joined = first.to_string();
    for v in rest {
        joined.push(',');
        joined.push_str(v.to_str().unwrap_or(""));
    }
    Some(Cow::Owned(joined))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_is_full_match() {
        let re = full_regex("/v[0-9]+").unwrap();
        assert!(re.is_match("/v12"));
        assert!(!re.is_match("/v12/x"));
        assert!(!re.is_match("x/v1"));
        // Alternation stays inside the anchors.
        let re = full_regex("a|b").unwrap();
        assert!(!re.is_match("ab"));
        assert!(full_regex("(unclosed").is_err());
    }

    #[test]
    fn prefix_is_segment_aware() {
        let m = PathMatch::prefix("/v2");
        assert!(m.matches("/v2"));
        assert!(m.matches("/v2/"));
        assert!(m.matches("/v2/x"));
        assert!(!m.matches("/v2example"));
        assert!(!m.matches("/v"));
        let m = PathMatch::prefix("/v2/");
        assert!(m.matches("/v2") && m.matches("/v2/x") && !m.matches("/v2x"));
        let m = PathMatch::prefix("/");
        assert!(m.matches("/") && m.matches("/anything"));
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("a=1&b=2"), "b").as_deref(), Some("2"));
        assert_eq!(query_param(Some("flag&b=2"), "flag").as_deref(), Some(""));
        assert_eq!(
            query_param(Some("q=a%20b+c"), "q").as_deref(),
            Some("a b c")
        );
        assert_eq!(query_param(Some("q=%zz"), "q").as_deref(), Some("%zz"));
        assert_eq!(query_param(Some("a=1"), "b"), None);
        assert_eq!(query_param(None, "b"), None);
    }
}
