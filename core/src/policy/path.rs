//! AuthorizationPolicy `paths`: Istio's string forms (exact, `prefix*`, `*suffix`, `*`) and its
//! URI templates (`{*}`: one path segment, `{**}`: anything, including `/`, last operator only).
//!
//! Owns parsing (with Istio's validation of templates) and matching a request path (without its
//! query). Knows nothing about rules or JSON.

use serde::Serialize;

use super::matcher::StringMatch;

/// One piece of a URI template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Piece {
    Literal(String),
    /// `{*}`: one non-empty segment (no `/`).
    Segment,
    /// `{**}`: zero or more characters, `/` included.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    String(StringMatch),
    Template(Vec<Piece>),
}

impl PathMatch {
    /// Istio's validation: a path with `{*}`/`{**}` is a template; it may not contain `*`, `{` or
    /// `}` elsewhere, an operator must be a whole segment, and `{**}` must be the last operator.
    pub fn parse(v: &str) -> Result<PathMatch, String> {
        if !v.contains("{*}") && !v.contains("{**}") {
            return Ok(PathMatch::String(StringMatch::parse(v)));
        }
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let segments: Vec<&str> = v.split('/').collect();
        for (i, seg) in segments.iter().enumerate() {
            if i > 0 {
                literal.push('/');
            }
            let op = match *seg {
                "{*}" => Piece::Segment,
                "{**}" => Piece::Any,
                s if s.contains(['*', '{', '}']) => {
                    return Err(format!(
                        "invalid path template {v:?}: segment {s:?} mixes `*`, `{{` or `}}` with \
                         other characters (an operator must be a whole segment: {{*}} or {{**}})"
                    ));
                }
                s => {
                    literal.push_str(s);
                    continue;
                }
            };
            if pieces.contains(&Piece::Any) {
                return Err(format!(
                    "invalid path template {v:?}: {{**}} must be the last operator"
                ));
            }
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(op);
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(PathMatch::Template(pieces))
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::String(m) => m.matches(path),
            PathMatch::Template(pieces) => template_matches(pieces, path),
        }
    }
}

/// RFC 3986 §5.2.4 dot-segment removal, as Envoy applies it before authorization under
/// Istio's default `pathNormalization: BASE`: `/public/../admin` is matched as `/admin`, so a
/// rule on `/admin` cannot be stepped around. Borrowed when there is nothing to remove.
pub fn normalize(path: &str) -> std::borrow::Cow<'_, str> {
    let dotted = path.split('/').any(|s| s == "." || s == "..");
    if !dotted {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    std::borrow::Cow::Owned(format!("/{}", out.join("/")))
}

fn template_matches(pieces: &[Piece], path: &str) -> bool {
    let Some((first, rest)) = pieces.split_first() else {
        return path.is_empty();
    };
    match first {
        Piece::Literal(l) => path
            .strip_prefix(l.as_str())
            .is_some_and(|p| template_matches(rest, p)),
        Piece::Segment => {
            let end = path.find('/').unwrap_or(path.len());
            end > 0 && template_matches(rest, &path[end..])
        }
        // The last operator: only literals follow, so try each split point.
        Piece::Any => (0..=path.len())
            .filter(|i| path.is_char_boundary(*i))
            .any(|i| template_matches(rest, &path[i..])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_as_istio_documents_them() {
        let cases = [
            ("/foo/{*}", "/foo/bar", true),
            ("/foo/{*}", "/foo/bar/baz", false),
            ("/foo/{*}", "/foo/", false),
            ("/foo/{**}/", "/foo/bar/", true),
            ("/foo/{**}/", "/foo//", true),
            ("/foo/{**}/", "/foo/bar", false),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", true),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz", true),
            ("/foo/{*}/bar/{**}", "/foo/buzz/baz/", false),
            ("/{**}", "/", true),
            ("/{**}", "/a/b/c", true),
        ];
        for (t, path, want) in cases {
            let m = PathMatch::parse(t).unwrap();
            assert_eq!(m.matches(path), want, "{t} vs {path}");
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        for (raw, want) in [
            ("/a/b", "/a/b"),
            ("/public/../admin/x", "/admin/x"),
            ("/a/./b", "/a/b"),
            ("/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a..b/c", "/a..b/c"),
        ] {
            assert_eq!(normalize(raw), want, "{raw}");
        }
    }

    #[test]
    fn invalid_templates_are_refused() {
        for t in ["/*/baz/{*}", "/**/baz/{*}", "/{**}/foo/{*}", "/foo/{*}.txt"] {
            assert!(PathMatch::parse(t).is_err(), "{t}");
        }
    }
}
