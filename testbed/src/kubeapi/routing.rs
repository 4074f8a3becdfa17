//! Routing: a request path to discovery or to a resource (kind, namespace, name,
//! subresource), with the real server's 404s for paths that name nothing, and query-string
//! decoding. Dispatches to `handlers`; holds no state.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::Response;
use serde_json::Value;

use super::discovery;
use super::errors::ApiErr;
use super::handlers;
use super::kinds::Kind;
use super::rbac;
use super::server::{Body, Req, Shared, json};

/// What a resource path names.
pub(crate) enum Target {
    Collection {
        ns: Option<String>,
    },
    Object {
        ns: Option<String>,
        name: String,
        sub: Option<String>,
    },
}

pub(crate) fn route(shared: &Arc<Shared>, req: Req) -> Result<Response<Body>, ApiErr> {
    let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        [] => return Ok(json(200, &discovery::root_paths())),
        ["version"] => return Ok(json(200, &discovery::version())),
        ["healthz" | "livez" | "readyz"] => return Ok(json(200, &Value::String("ok".into()))),
        ["api"] => return Ok(json(200, &discovery::api_versions())),
        ["apis"] => return Ok(json(200, &discovery::groups(&shared.lock_state().kinds))),
        ["apis", g] => {
            return discovery::group(&shared.lock_state().kinds, g)
                .map(|v| json(200, &v))
                .ok_or_else(|| {
                    ApiErr::new(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    )
                });
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(ApiErr::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    if rest.is_empty() {
        return discovery::resources(&shared.lock_state().kinds, group, version)
            .map(|v| json(200, &v))
            .ok_or_else(|| {
                ApiErr::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )
            });
    }
    let owned = |s: &&str| s.to_string();
    let (plural, target) = match rest {
        ["namespaces", ns, res, tail @ ..] if !matches!(*res, "status" | "finalize") => {
            let ns = Some(ns.to_string());
            let t = match tail {
                [] => Target::Collection { ns },
                [name] => Target::Object {
                    ns,
                    name: owned(name),
                    sub: None,
                },
                [name, sub] => Target::Object {
                    ns,
                    name: owned(name),
                    sub: Some(owned(sub)),
                },
                _ => return Err(not_found_path()),
            };
            (*res, t)
        }
        [res] => (*res, Target::Collection { ns: None }),
        [res, name] => (
            *res,
            Target::Object {
                ns: None,
                name: owned(name),
                sub: None,
            },
        ),
        [res, name, sub] => (
            *res,
            Target::Object {
                ns: None,
                name: owned(name),
                sub: Some(owned(sub)),
            },
        ),
        _ => return Err(not_found_path()),
    };
    let kind: Kind = shared
        .lock_state()
        .kinds
        .by_url(group, version, plural)
        .cloned()
        .ok_or_else(not_found_path)?;
    // A namespaced path for a cluster-scoped kind (or a named object of a namespaced kind
    // without one) names nothing.
    match &target {
        Target::Collection { ns: Some(_) } | Target::Object { ns: Some(_), .. }
            if !kind.namespaced =>
        {
            return Err(not_found_path());
        }
        Target::Object { ns: None, .. } if kind.namespaced => return Err(not_found_path()),
        _ => {}
    }
    if shared.rbac.load(std::sync::atomic::Ordering::SeqCst) && req.user != "admin" {
        let (ns, name, sub, collection) = match &target {
            Target::Collection { ns } => (ns.as_deref(), "", None, true),
            Target::Object { ns, name, sub } => {
                (ns.as_deref(), name.as_str(), sub.as_deref(), false)
            }
        };
        let verb = rbac::verb(&req.method, collection, req.flag("watch"));
        // As the real server: a list/watch of one name (fieldSelector metadata.name=X) is
        // authorized as a request for X, so resourceNames can allow it.
        let by_field = collection
            .then(|| rbac::selected_name(verb, req.q("fieldSelector")))
            .flatten();
        let name = by_field.unwrap_or(name);
        let attrs = rbac::Attrs {
            verb,
            group,
            resource: plural,
            subresource: sub,
            namespace: ns.unwrap_or_default(),
            name,
        };
        rbac::authorize(&shared.lock_state(), &req.user, &attrs)?;
    }
    handlers::handle(shared, &req, &kind, version, target)
}

pub(crate) fn not_found_path() -> ApiErr {
    ApiErr::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

pub(crate) fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decoding (`+` is a space in a query); invalid escapes stay as they are.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            (b'+', _, _) => out.push(b' '),
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
