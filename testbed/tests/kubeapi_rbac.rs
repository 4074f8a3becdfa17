//! RBAC in the API server double, through kubectl with service-account tokens: bindings grant
//! exactly their rules (namespace, verb, subresource, resourceNames, a one-name watch), the
//! answer otherwise is the real server's 403; the admin kubeconfig and a double that does not
//! enforce RBAC are unrestricted.

use std::process::{Command, Output};

use serde_json::json;
use testbed::kubeapi::{ApiOptions, ApiServer, TokenSpec};

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("running kubectl")
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn token(api: &ApiServer, sa: &str) -> std::path::PathBuf {
    let t = api.issue_token(TokenSpec {
        namespace: "mesh-system".into(),
        service_account: sa.into(),
        audiences: vec![],
        pod: None,
        node: None,
        expires_at: u64::MAX / 2,
    });
    api.kubeconfig_for(&t).expect("kubeconfig")
}

fn setup() -> ApiServer {
    let api = ApiServer::start(ApiOptions::default()).expect("double");
    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh-system"}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "mine", "namespace": "mesh-system"}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "other", "namespace": "mesh-system"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "pods-status"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
                      {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get", "patch"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "agent-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "pods-status"},
            "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": "mesh-system"}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "mine", "namespace": "mesh-system"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["mine"],
                       "verbs": ["get", "list", "watch"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "agent-mine", "namespace": "mesh-system"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mine"},
            "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": "mesh-system"}]}),
    ] {
        api.create(obj).expect("seeding the double");
    }
    api.enforce_rbac(true);
    api
}

#[test]
fn bindings_grant_exactly_their_rules() {
    let api = setup();
    let agent = token(&api, "agent");
    let ok = |args: &[&str]| {
        let o = kubectl(&agent, args);
        assert!(o.status.success(), "{args:?}: {}", err(&o));
    };
    ok(&["get", "pods", "-A"]);
    ok(&["get", "pod", "p", "-n", "default"]);
    ok(&[
        "patch",
        "pod",
        "p",
        "-n",
        "default",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"metadata":{"annotations":{"ambient.istio.io/redirection":"enabled"}}}"#,
    ]);
    ok(&["get", "configmap", "mine", "-n", "mesh-system"]);
    // A list narrowed to the allowed name is a request for that name.
    ok(&[
        "get",
        "configmaps",
        "-n",
        "mesh-system",
        "--field-selector",
        "metadata.name=mine",
    ]);

    let denied = |args: &[&str], message: &str| {
        let o = kubectl(&agent, args);
        assert!(!o.status.success(), "{args:?} was allowed");
        assert!(err(&o).contains(message), "{args:?}: {}", err(&o));
    };
    let user = "User \"system:serviceaccount:mesh-system:agent\"";
    denied(
        &[
            "patch",
            "pod",
            "p",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":{"a":"b"}}}"#,
        ],
        &format!(
            "pods \"p\" is forbidden: {user} cannot patch resource \"pods\" in API group \"\" in the namespace \"default\""
        ),
    );
    denied(
        &["get", "configmap", "other", "-n", "mesh-system"],
        &format!(
            "configmaps \"other\" is forbidden: {user} cannot get resource \"configmaps\" in API group \"\" in the namespace \"mesh-system\""
        ),
    );
    denied(
        &["get", "configmaps", "-n", "mesh-system"],
        &format!(
            "configmaps is forbidden: {user} cannot list resource \"configmaps\" in API group \"\" in the namespace \"mesh-system\""
        ),
    );
    // The Role binds in its namespace only.
    denied(&["get", "configmap", "mine", "-n", "default"], "forbidden");
    denied(
        &["get", "namespaces"],
        &format!(
            "namespaces is forbidden: {user} cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
        ),
    );
    denied(
        &["delete", "pod", "p", "-n", "default"],
        "cannot delete resource \"pods\"",
    );
    // Another service account gets nothing.
    let o = kubectl(&token(&api, "nobody"), &["get", "pods", "-A"]);
    assert!(
        err(&o).contains("(Forbidden)") || err(&o).contains("forbidden"),
        "{}",
        err(&o)
    );

    // The Status object is the real one.
    let o = kubectl(
        &agent,
        &["get", "--raw", "/api/v1/namespaces/mesh-system/secrets"],
    );
    assert!(!o.status.success());
    assert!(
        err(&o).contains("Forbidden") || err(&o).contains("forbidden"),
        "{}",
        err(&o)
    );

    // The admin kubeconfig is never restricted.
    let o = kubectl(api.kubeconfig(), &["delete", "pod", "p", "-n", "default"]);
    assert!(o.status.success(), "{}", err(&o));
}

#[test]
fn without_enforcement_tokens_are_unrestricted() {
    let api = setup();
    api.enforce_rbac(false);
    let o = kubectl(&token(&api, "nobody"), &["get", "secrets", "-A"]);
    assert!(o.status.success(), "{}", err(&o));
}
