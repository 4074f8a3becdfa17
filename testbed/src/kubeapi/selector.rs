//! Label and field selectors as list and watch requests carry them (`labelSelector`,
//! `fieldSelector` query parameters): parsing, with the real server's refusals, and matching
//! against one object. Knows nothing of the store or HTTP.

use serde_json::Value;

use super::errors::ApiErr;

#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, PartialEq)]
struct FieldReq {
    field: String,
    value: String,
    equal: bool,
}

/// A parsed pair of selectors; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

/// Fields the real server lets every kind select on, and the extra ones Pods allow.
const COMMON_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];
const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

impl Selector {
    /// Parses both selectors for `kind` (field support depends on it).
    pub fn parse(labels: Option<&str>, fields: Option<&str>, kind: &str) -> Result<Self, ApiErr> {
        let mut sel = Selector::default();
        if let Some(l) = labels {
            for term in split_terms(l) {
                let term = term.trim();
                if term.is_empty() {
                    continue;
                }
                sel.labels.push(parse_label(term)?);
            }
        }
        if let Some(f) = fields {
            for term in f.split(',') {
                let term = term.trim();
                if term.is_empty() {
                    continue;
                }
                sel.fields.push(parse_field(term, kind)?);
            }
        }
        Ok(sel)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self
                .fields
                .iter()
                .all(|f| (field_value(obj, &f.field) == f.value) == f.equal)
    }
}

/// Splits on commas outside parentheses (`a in (x,y),b` is two terms).
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn bad(term: &str, why: &str) -> ApiErr {
    ApiErr::bad_request(format!("unable to parse requirement: {why} in \"{term}\""))
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

fn parse_label(term: &str) -> Result<LabelReq, ApiErr> {
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        return valid_key(key)
            .then(|| LabelReq::NotExists(key.into()))
            .ok_or_else(|| bad(term, "invalid label key"));
    }
    for (op, negate) in [(" notin ", true), (" in ", false)] {
        if let Some((key, rest)) = term.split_once(op) {
            let key = key.trim();
            let rest = rest.trim();
            let Some(inner) = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')) else {
                return Err(bad(term, "expected a parenthesized set of values"));
            };
            let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
            if !valid_key(key) || !values.iter().all(|v| valid_value(v)) {
                return Err(bad(term, "invalid label key or value"));
            }
            return Ok(if negate {
                LabelReq::NotIn(key.into(), values)
            } else {
                LabelReq::In(key.into(), values)
            });
        }
    }
    let (key, value, eq) = if let Some((k, v)) = term.split_once("!=") {
        (k, v, false)
    } else if let Some((k, v)) = term.split_once("==") {
        (k, v, true)
    } else if let Some((k, v)) = term.split_once('=') {
        (k, v, true)
    } else {
        let key = term.trim();
        return valid_key(key)
            .then(|| LabelReq::Exists(key.into()))
            .ok_or_else(|| bad(term, "invalid label key"));
    };
    let (key, value) = (key.trim(), value.trim());
    if !valid_key(key) || !valid_value(value) {
        return Err(bad(term, "invalid label key or value"));
    }
    Ok(if eq {
        LabelReq::Eq(key.into(), value.into())
    } else {
        LabelReq::NotEq(key.into(), value.into())
    })
}

fn parse_field(term: &str, kind: &str) -> Result<FieldReq, ApiErr> {
    let (field, value, equal) = if let Some((f, v)) = term.split_once("!=") {
        (f, v, false)
    } else if let Some((f, v)) = term.split_once("==") {
        (f, v, true)
    } else if let Some((f, v)) = term.split_once('=') {
        (f, v, true)
    } else {
        return Err(ApiErr::bad_request(format!(
            "invalid selector: '{term}'; can't understand '{term}'"
        )));
    };
    let field = field.trim();
    let supported =
        COMMON_FIELDS.contains(&field) || (kind == "Pod" && POD_FIELDS.contains(&field));
    if !supported {
        return Err(ApiErr::bad_request(format!(
            "field label not supported: {field}"
        )));
    }
    Ok(FieldReq {
        field: field.into(),
        value: value.trim().into(),
        equal,
    })
}

/// A field's value as the server compares it: a string, `""` when absent.
fn field_value(obj: &Value, path: &str) -> String {
    let mut v = obj;
    for part in path.split('.') {
        v = &v[part];
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, node: &str) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels}, "spec": {"nodeName": node}})
    }

    #[test]
    fn label_operators() {
        let p = pod(json!({"app": "web", "tier": "front"}), "n1");
        let m = |s: &str| Selector::parse(Some(s), None, "Pod").unwrap().matches(&p);
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("app in (web, db)"));
        assert!(!m("app notin (web,db)"));
        assert!(m("missing notin (x)"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(m("x!=y"));
        assert!(!m("tier in (back)"));
    }

    #[test]
    fn fields_and_refusals() {
        let p = pod(json!({}), "n1");
        let m = |s: &str| Selector::parse(None, Some(s), "Pod").unwrap().matches(&p);
        assert!(m("spec.nodeName=n1,metadata.namespace=ns"));
        assert!(!m("spec.nodeName!=n1"));
        assert!(m("status.phase="));
        assert_eq!(
            Selector::parse(None, Some("spec.nodeName=n1"), "Service")
                .unwrap_err()
                .code,
            400
        );
        assert!(Selector::parse(Some("a in b"), None, "Pod").is_err());
        assert!(Selector::parse(Some("a b=c"), None, "Pod").is_err());
    }
}
