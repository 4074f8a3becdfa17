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

/// RFC 3986 §5.2.4 dot-segment removal, as Envoy applies it under Istio's default
/// `pathNormalization: BASE` before authorization, routing and forwarding: `/public/../admin`
/// becomes `/admin`, so a rule on `/admin` cannot be stepped around. Like Envoy's canonicalizer,
/// a backslash is a slash and `%2e` (either case) is a dot, so `/public/%2e%2e/admin` and
/// `/public\..\admin` are `/admin` too. Borrowed when there is nothing to change.
pub fn normalize(path: &str) -> std::borrow::Cow<'_, str> {
    let slashed: std::borrow::Cow<'_, str> = if path.contains('\\') {
        std::borrow::Cow::Owned(path.replace('\\', "/"))
    } else {
        std::borrow::Cow::Borrowed(path)
    };
    let dotted = slashed.split('/').any(|s| dot_segment(s).is_some());
    if !dotted {
        return slashed;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = slashed.split('/').skip(1).collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match dot_segment(seg) {
            Some(Dots::One) => {
                if last {
                    out.push("");
                }
            }
            Some(Dots::Two) => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            None => out.push(seg),
        }
    }
    std::borrow::Cow::Owned(format!("/{}", out.join("/")))
}

enum Dots {
    One,
    Two,
}

/// `.` / `..`, with any dot written `%2e` or `%2E`.
fn dot_segment(seg: &str) -> Option<Dots> {
    if seg.len() > 6 {
        return None;
    }
    let lower = seg.to_ascii_lowercase();
    match lower.replace("%2e", ".").as_str() {
        "." => Some(Dots::One),
        ".." => Some(Dots::Two),
        _ => None,
    }
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
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E./admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("/a/%2e/b", "/a/b"),
            ("/public\\..\\admin", "/admin"),
            ("/a/%2e%2e%2e/b", "/a/%2e%2e%2e/b"),
            ("/a%2eb", "/a%2eb"),
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
