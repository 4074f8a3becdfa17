//! One TokenReview, judged: what a caller's Kubernetes token proves, or why it proves nothing.
//!
//! Owns asking the API (`authentication.k8s.io/v1` TokenReview for meshd's audience, then the
//! bound pod for a ztunnel's token) and turning the answers into a [`Verdict`]. Does not cache
//! or rate-limit (`identity_cache`), and does not speak gRPC (`identity`). Every string the API
//! returns is treated as hostile: it is bounded before it reaches a message or a log line, and
//! the token itself never appears in either.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use meshcore::nodeauth::Principal;

/// A review the API has not answered by then is given up (the caller may retry).
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on any API-supplied text we repeat.
const MAX_ECHO: usize = 200;

pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const SA_PREFIX: &str = "system:serviceaccount:";

/// What a token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Who the caller is.
    Principal(Principal),
    /// The token proves nothing; the text says what the caller must fix.
    Refused(String),
    /// meshd could not find out (the API is unreachable or failing): the caller should retry.
    Unavailable(String),
}

/// What the reviewer needs to know about meshd's settings.
#[derive(Debug, Clone)]
pub struct Policy {
    pub audience: String,
    /// ztunnel's service account (namespace, name).
    pub ztunnel: (String, String),
}

/// Reviews `token` against the API and judges the answer.
pub async fn review(client: &kube::Client, policy: &Policy, token: &str) -> Verdict {
    let api: Api<TokenReview> = Api::all(client.clone());
    let ask = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![policy.audience.clone()]),
        },
        ..Default::default()
    };
    let answer = match tokio::time::timeout(
        REVIEW_TIMEOUT,
        api.create(&PostParams::default(), &ask),
    )
    .await
    {
        Err(_) => {
            return Verdict::Unavailable(format!(
                "the Kubernetes API did not answer the TokenReview within {REVIEW_TIMEOUT:?}"
            ));
        }
        Ok(Err(e)) => return Verdict::Unavailable(api_failure("TokenReview", &e)),
        Ok(Ok(r)) => r,
    };
    let Some(status) = answer.status else {
        return Verdict::Unavailable("the TokenReview came back without a status".into());
    };
    match judge(policy, token, &status) {
        Judged::Done(v) => v,
        Judged::BoundPod { name, uid, node } => bound_node(client, policy, &name, &uid, node).await,
    }
}

/// A first verdict from the review alone, or the bound pod still to look up.
#[derive(Debug, PartialEq, Eq)]
pub enum Judged {
    Done(Verdict),
    BoundPod {
        name: String,
        uid: String,
        /// `authentication.kubernetes.io/node-name`, when the API reports it.
        node: Option<String>,
    },
}

/// Judges a TokenReview's status.
pub fn judge(policy: &Policy, token: &str, status: &TokenReviewStatus) -> Judged {
    let aud = &policy.audience;
    if status.authenticated != Some(true) {
        let error = echo(status.error.as_deref().unwrap_or(""), token);
        let lower = error.to_ascii_lowercase();
        let why = if lower.contains("audience") {
            format!(
                "the token is not for audience {aud:?} ({error}): present a projected service-account token requested with `audience: {aud}`"
            )
        } else if lower.contains("expired") {
            format!(
                "the token has expired ({error}): read the projected token file again (kubelet refreshes it) or request a new token"
            )
        } else {
            format!(
                "the Kubernetes API did not authenticate the token ({error}): present a projected service-account token with audience {aud:?}"
            )
        };
        return Judged::Done(Verdict::Refused(why));
    }
    // An audience-aware API reports the audiences it checked. Empty means it checked only its
    // own (a token for the API server, or an authenticator that ignores audiences): not ours.
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == aud) {
        return Judged::Done(Verdict::Refused(format!(
            "the token is not for audience {aud:?} (the API accepted it for {}): present a projected service-account token requested with `audience: {aud}`",
            echo(&format!("{audiences:?}"), token)
        )));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or("");
    let Some((ns, sa)) = service_account(username) else {
        return Judged::Done(Verdict::Refused(format!(
            "only service-account tokens are accepted, this one is for user {:?}",
            echo(username, token)
        )));
    };
    if (ns.as_str(), sa.as_str()) != (policy.ztunnel.0.as_str(), policy.ztunnel.1.as_str()) {
        return Judged::Done(Verdict::Principal(Principal::ServiceAccount(ns, sa)));
    }
    let empty = BTreeMap::new();
    let extra = user.and_then(|u| u.extra.as_ref()).unwrap_or(&empty);
    let one = |key: &str| match extra.get(key).map(Vec::as_slice) {
        Some([v]) if !v.is_empty() => Some(v.clone()),
        _ => None,
    };
    match (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) {
        (Some(name), Some(uid)) => Judged::BoundPod {
            name,
            uid,
            node: one(EXTRA_NODE_NAME),
        },
        _ => Judged::Done(Verdict::Refused(format!(
            "a token of ztunnel's service account {ns}/{sa} must be bound to ztunnel's pod (that is what tells meshd its node), and this one is not: mount a projected serviceAccountToken volume with audience {aud:?} instead of a Secret-based or TokenRequest token without a pod"
        ))),
    }
}

/// `system:serviceaccount:NS:SA` → (NS, SA).
fn service_account(username: &str) -> Option<(String, String)> {
    let (ns, sa) = username.strip_prefix(SA_PREFIX)?.split_once(':')?;
    let ok = |s: &str| !s.is_empty() && s.len() <= 253 && !s.contains(':');
    (ok(ns) && ok(sa)).then(|| (ns.to_string(), sa.to_string()))
}

/// The node of the pod a ztunnel's token is bound to, checking it is still that pod.
async fn bound_node(
    client: &kube::Client,
    policy: &Policy,
    name: &str,
    uid: &str,
    token_node: Option<String>,
) -> Verdict {
    let ns = &policy.ztunnel.0;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = match tokio::time::timeout(REVIEW_TIMEOUT, pods.get_opt(name)).await {
        Err(_) => {
            return Verdict::Unavailable(format!(
                "the Kubernetes API did not answer for pod {ns}/{name} within {REVIEW_TIMEOUT:?}"
            ));
        }
        Ok(Err(e)) => return Verdict::Unavailable(api_failure("reading the token's pod", &e)),
        Ok(Ok(p)) => p,
    };
    node_of(ns, name, uid, token_node.as_deref(), pod.as_ref())
}

/// The node a ztunnel token bound to pod `ns/name` (`uid`) proves, given the pod as read now.
pub fn node_of(
    ns: &str,
    name: &str,
    uid: &str,
    token_node: Option<&str>,
    pod: Option<&Pod>,
) -> Verdict {
    let (name, uid) = (echo(name, ""), echo(uid, ""));
    let Some(pod) = pod else {
        return Verdict::Refused(format!(
            "the pod the token is bound to ({ns}/{name}) no longer exists: a ztunnel pod uses its own token"
        ));
    };
    if pod.metadata.uid.as_deref() != Some(uid.as_str()) {
        return Verdict::Refused(format!(
            "the token is bound to pod {ns}/{name} uid {uid}, which was deleted (a new pod now has that name): a ztunnel pod uses its own token"
        ));
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("");
    if node.is_empty() {
        return Verdict::Refused(format!(
            "the pod the token is bound to ({ns}/{name}) is not scheduled to a node yet"
        ));
    }
    if let Some(t) = token_node
        && t != node
    {
        return Verdict::Refused(format!(
            "the token says its pod {ns}/{name} runs on node {:?}, the API says {node:?}",
            echo(t, "")
        ));
    }
    Verdict::Principal(Principal::Node(node.to_string()))
}

/// Why an API call failed, and what an operator can do about it.
fn api_failure(what: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.is_forbidden() => format!(
            "{what}: meshd may not do this ({}): grant its service account `create` on tokenreviews.authentication.k8s.io and `get` on pods",
            echo(&s.message, "")
        ),
        _ => format!("{what} failed: {}", echo(&e.to_string(), "")),
    }
}

/// `s` made safe to repeat: without `token` (should the API ever echo it), printable ASCII
/// only, at most [`MAX_ECHO`] characters.
pub fn echo(s: &str, token: &str) -> String {
    let s = if token.is_empty() {
        s.to_string()
    } else {
        s.replace(token, "<token>")
    };
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(MAX_ECHO)
        .collect();
    if s.chars().count() > MAX_ECHO {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn policy() -> Policy {
        Policy {
            audience: "mesh-ca".into(),
            ztunnel: ("mesh-system".into(), "ztunnel".into()),
        }
    }

    fn status(
        user: &str,
        audiences: Option<Vec<&str>>,
        extra: &[(&str, &str)],
    ) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: audiences.map(|a| a.into_iter().map(String::from).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect(),
                ),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn an_authenticated_token_without_our_audience_is_refused() {
        // An API that is not audience aware (or a token for the API server) reports none.
        for audiences in [None, Some(vec![]), Some(vec!["other"])] {
            let s = status("system:serviceaccount:app:web", audiences.clone(), &[]);
            match judge(&policy(), "tok", &s) {
                Judged::Done(Verdict::Refused(why)) => assert!(why.contains("mesh-ca"), "{why}"),
                other => panic!("{audiences:?}: {other:?}"),
            }
        }
        let s = status("system:serviceaccount:app:web", Some(vec!["mesh-ca"]), &[]);
        assert_eq!(
            judge(&policy(), "tok", &s),
            Judged::Done(Verdict::Principal(Principal::ServiceAccount(
                "app".into(),
                "web".into()
            )))
        );
    }

    #[test]
    fn refusals_say_what_to_fix_without_the_token() {
        let mut s = status("x", None, &[]);
        s.authenticated = Some(false);
        s.error =
            Some("token audiences [\"a\"] is invalid for the target audiences, SECRET".into());
        let Judged::Done(Verdict::Refused(why)) = judge(&policy(), "SECRET", &s) else {
            panic!()
        };
        assert!(
            why.contains("audience: mesh-ca") && !why.contains("SECRET"),
            "{why}"
        );
        s.error = Some("service account token has expired".into());
        let Judged::Done(Verdict::Refused(why)) = judge(&policy(), "SECRET", &s) else {
            panic!()
        };
        assert!(why.contains("expired"), "{why}");
    }

    #[test]
    fn ztunnel_tokens_must_name_their_pod() {
        let zt = "system:serviceaccount:mesh-system:ztunnel";
        let s = status(zt, Some(vec!["mesh-ca"]), &[]);
        let Judged::Done(Verdict::Refused(why)) = judge(&policy(), "t", &s) else {
            panic!()
        };
        assert!(why.contains("bound to ztunnel's pod"), "{why}");
        let s = status(
            zt,
            Some(vec!["mesh-ca"]),
            &[(EXTRA_POD_NAME, "ztunnel-a"), (EXTRA_POD_UID, "u1")],
        );
        assert_eq!(
            judge(&policy(), "t", &s),
            Judged::BoundPod {
                name: "ztunnel-a".into(),
                uid: "u1".into(),
                node: None
            }
        );
        // Not a service account at all, or a malformed one.
        for user in [
            "admin",
            "system:serviceaccount:ns",
            "system:serviceaccount::x",
        ] {
            let s = status(user, Some(vec!["mesh-ca"]), &[]);
            assert!(
                matches!(judge(&policy(), "t", &s), Judged::Done(Verdict::Refused(_))),
                "{user}"
            );
        }
    }

    #[test]
    fn the_bound_pod_must_be_the_same_pod_on_the_same_node() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "z", "namespace": "mesh-system", "uid": "u1"},
            "spec": {"nodeName": "node-a", "containers": []}
        }))
        .unwrap();
        let node = |uid, token_node, pod| node_of("mesh-system", "z", uid, token_node, pod);
        assert_eq!(
            node("u1", Some("node-a"), Some(&pod)),
            Verdict::Principal(Principal::Node("node-a".into()))
        );
        assert!(
            matches!(node("u0", None, Some(&pod)), Verdict::Refused(w) if w.contains("deleted"))
        );
        assert!(
            matches!(node("u1", None, None), Verdict::Refused(w) if w.contains("no longer exists"))
        );
        assert!(matches!(
            node("u1", Some("node-b"), Some(&pod)),
            Verdict::Refused(_)
        ));
        let mut unscheduled = pod.clone();
        unscheduled.spec.as_mut().unwrap().node_name = None;
        assert!(matches!(
            node("u1", None, Some(&unscheduled)),
            Verdict::Refused(_)
        ));
    }

    #[test]
    fn echo_bounds_and_scrubs() {
        let long = "é".repeat(500);
        let e = echo(&long, "");
        assert!(e.chars().count() <= MAX_ECHO + 1 && !e.contains('é'));
        assert_eq!(echo("a\nb", ""), "a?b");
    }
}
