//! What a matched rule does to a request: header edits, path rewrites (Istio's prefix and regex
//! rewrites, Gateway API's ReplaceFullPath / ReplacePrefixMatch) and redirect `Location`s.
//!
//! Owns string surgery on paths and authorities; which rule applies is `decide`'s.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

/// One header edit.
#[derive(Debug, Clone)]
enum HeaderOp {
    Remove(HeaderName),
    Set(HeaderName, HeaderValue),
    Add(HeaderName, HeaderValue),
}

/// The header edits of one level (a rule, or one destination of it), applied as Envoy does:
/// removals first, then sets (overwrite), then adds (append).
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    ops: Vec<HeaderOp>,
}

impl HeaderOps {
    /// From validated (name, value) lists; entries that are not valid headers are skipped
    /// (validation refuses them before).
    pub(crate) fn new<'a>(
        set: impl IntoIterator<Item = (&'a str, &'a str)>,
        add: impl IntoIterator<Item = (&'a str, &'a str)>,
        remove: impl IntoIterator<Item = &'a str>,
    ) -> HeaderOps {
        let pair = |(n, v): (&str, &str)| {
            Some((
                HeaderName::from_bytes(n.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            ))
        };
        let mut ops: Vec<HeaderOp> = remove
            .into_iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .map(HeaderOp::Remove)
            .collect();
        ops.extend(
            set.into_iter()
                .filter_map(pair)
                .map(|(n, v)| HeaderOp::Set(n, v)),
        );
        ops.extend(
            add.into_iter()
                .filter_map(pair)
                .map(|(n, v)| HeaderOp::Add(n, v)),
        );
        HeaderOps { ops }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for op in &self.ops {
            match op {
                HeaderOp::Remove(n) => {
                    headers.remove(n);
                }
                HeaderOp::Set(n, v) => {
                    headers.insert(n.clone(), v.clone());
                }
                HeaderOp::Add(n, v) => {
                    headers.append(n.clone(), v.clone());
                }
            }
        }
    }
}

/// Header edits of several levels (rule, then destination), applied in order.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits(pub(crate) Vec<Arc<HeaderOps>>);

impl HeaderEdits {
    pub(crate) fn of(levels: &[&Arc<HeaderOps>]) -> HeaderEdits {
        HeaderEdits(
            levels
                .iter()
                .filter(|o| !o.is_empty())
                .map(|o| Arc::clone(o))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for ops in &self.0 {
            ops.apply(headers);
        }
    }
}

/// How a path is rewritten (for forwarding or in a redirect).
#[derive(Debug, Clone)]
pub(crate) enum PathRewrite {
    /// Istio `rewrite.uri`: replaces the matched prefix when the match was a prefix, else the
    /// whole path.
    IstioUri(String),
    /// Istio `uriRegexRewrite`: every match of the pattern in the path is replaced
    /// (`\1` captures).
    IstioRegex(Regex, String),
    /// Istio `redirect.uri`: the path (and the query, if it has one) is replaced.
    IstioRedirect(String),
    /// Gateway API `ReplaceFullPath`.
    Full(String),
    /// Gateway API `ReplacePrefixMatch` (segment-aware; the rule's prefix is known at match).
    Prefix(String),
}

/// Rewrites `path?query` given how the path was matched: `matched_prefix` is the matched prefix
/// (Istio: as written; Gateway API: without a trailing `/`), if the match was a prefix match.
pub(crate) fn rewrite_path(
    rw: &PathRewrite,
    path_and_query: &str,
    matched_prefix: Option<usize>,
) -> String {
    let (path, query) = super::matcher::split_path(path_and_query);
    let with_query = |p: String| match query {
        Some(q) => format!("{p}?{q}"),
        None => p,
    };
    match rw {
        // `get` rather than slicing: a case-insensitive prefix may differ in byte length.
        PathRewrite::IstioUri(to) => match matched_prefix.and_then(|n| path.get(n..)) {
            Some(rest) => with_query(format!("{to}{rest}")),
            None => with_query(to.clone()),
        },
        PathRewrite::IstioRegex(re, to) => {
            with_query(re.replace_all(path, to.as_str()).into_owned())
        }
        PathRewrite::IstioRedirect(to) if to.contains('?') => to.clone(),
        PathRewrite::IstioRedirect(to) | PathRewrite::Full(to) => with_query(to.clone()),
        PathRewrite::Prefix(to) => {
            let rest = matched_prefix.and_then(|n| path.get(n..)).unwrap_or("");
            let joined = format!("{}{rest}", to.trim_end_matches('/'));
            with_query(if joined.is_empty() {
                "/".to_string()
            } else {
                joined
            })
        }
    }
}

/// Converts Istio/RE2 `\1` capture references to the regex crate's `${1}`.
pub(crate) fn re2_replacement(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

/// Where a redirect's port comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RedirectPort {
    /// Istio default: the request's authority as it was (host redirect replaces it whole).
    AsIs,
    Explicit(u16),
    /// Istio `derivePort: FROM_REQUEST_PORT`: the port the request came in on.
    FromRequest,
    /// Istio `FROM_PROTOCOL_DEFAULT`; Gateway API when the scheme is set: the scheme's default.
    SchemeDefault,
    /// Gateway API with neither port nor scheme: the "listener" port, here the Service port.
    Listener,
}

/// A compiled redirect.
#[derive(Debug, Clone)]
pub(crate) struct Redirect {
    pub scheme: Option<String>,
    /// Istio: a whole authority; Gateway API: a host name.
    pub host: Option<String>,
    pub port: RedirectPort,
    pub path: Option<PathRewrite>,
    pub status: u16,
}

/// Splits an authority into host and optional port (`[v6]:port` aware).
pub(crate) fn split_authority(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.find("]:") {
            Some(i) => (&authority[..=i], Some(&authority[i + 2..])),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (authority, None),
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// The `Location` of a redirect for a request (`scheme`, `authority`, `path_and_query`, the
/// Service `port` it came in on).
pub(crate) fn location(
    r: &Redirect,
    scheme: &str,
    authority: &str,
    port: u16,
    path_and_query: &str,
    matched_prefix: Option<usize>,
) -> String {
    let final_scheme = r.scheme.as_deref().unwrap_or(scheme);
    let base = r.host.as_deref().unwrap_or(authority);
    let (host, base_port) = split_authority(base);
    let port = match r.port {
        RedirectPort::AsIs => base_port.and_then(|p| p.parse().ok()),
        RedirectPort::Explicit(p) => Some(p),
        RedirectPort::FromRequest | RedirectPort::Listener => Some(port),
        RedirectPort::SchemeDefault => None,
    };
    let port = port.filter(|p| Some(*p) != default_port(final_scheme));
    let path = match &r.path {
        Some(rw) => rewrite_path(rw, path_and_query, matched_prefix),
        None => path_and_query.to_string(),
    };
    match port {
        Some(p) => format!("{final_scheme}://{host}:{p}{path}"),
        None => format!("{final_scheme}://{host}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(to: &str, path: &str, matched: &str) -> String {
        let m = matched.trim_end_matches('/').len();
        rewrite_path(&PathRewrite::Prefix(to.into()), path, Some(m))
    }

    /// The table in Gateway API's HTTPPathModifier documentation.
    #[test]
    fn replace_prefix_match_table() {
        for (path, matched, to, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/foo?a=1", "/foo", "/x", "/x?a=1"),
        ] {
            assert_eq!(prefix(to, path, matched), want, "{path} {matched} {to}");
        }
    }

    #[test]
    fn istio_rewrites() {
        let uri = PathRewrite::IstioUri("/v2".into());
        assert_eq!(rewrite_path(&uri, "/v1/a?x=1", Some(3)), "/v2/a?x=1");
        assert_eq!(rewrite_path(&uri, "/v1/a", None), "/v2");
        let re = PathRewrite::IstioRegex(
            Regex::new("^/service/([^/]+)(/.*)$").unwrap(),
            re2_replacement(r"\2/instance/\1"),
        );
        assert_eq!(
            rewrite_path(&re, "/service/foo/v1/api?q", None),
            "/v1/api/instance/foo?q"
        );
        // A prefix length that is not a character boundary never panics.
        assert_eq!(rewrite_path(&uri, "/é", Some(2)), "/v2");
        let red = PathRewrite::IstioRedirect("/new".into());
        assert_eq!(rewrite_path(&red, "/old?q=1", None), "/new?q=1");
        let red = PathRewrite::IstioRedirect("/new?a=b".into());
        assert_eq!(rewrite_path(&red, "/old?q=1", None), "/new?a=b");
    }

    #[test]
    fn authority_split() {
        assert_eq!(split_authority("echo:8080"), ("echo", Some("8080")));
        assert_eq!(split_authority("echo"), ("echo", None));
        assert_eq!(split_authority("[fd00::1]:80"), ("[fd00::1]", Some("80")));
        assert_eq!(split_authority("[fd00::1]"), ("[fd00::1]", None));
    }

    #[test]
    fn header_ops_order_remove_set_add() {
        let ops = HeaderOps::new([("x-set", "new")], [("x-add", "2")], ["x-gone"]);
        let mut h = HeaderMap::new();
        h.insert("x-set", HeaderValue::from_static("old"));
        h.insert("x-add", HeaderValue::from_static("1"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        ops.apply(&mut h);
        assert_eq!(h["x-set"], "new");
        let adds: Vec<_> = h.get_all("x-add").iter().collect();
        assert_eq!(adds, ["1", "2"]);
        assert!(!h.contains_key("x-gone"));
    }
}
