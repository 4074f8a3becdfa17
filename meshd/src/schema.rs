//! Which fields of each supported kind meshd acts on, which it may safely pass over (they are
//! the scheduler's or kubelet's business, or API-server bookkeeping), and therefore which
//! fields must be reported as unsupported rather than silently ignored.
//!
//! Owns only the field lists and the walk over a parsed document; not the typed model.

use serde_json::Value;

/// How meshd treats a field.
#[derive(Clone, Copy)]
pub enum Field {
    /// Used by meshd (or passed on verbatim); not looked into further.
    Used,
    /// Present in real manifests but with no meaning for the mesh; accepted quietly.
    Inert,
    /// An object whose own fields are checked.
    Object(&'static Schema),
    /// A list of objects whose fields are checked.
    List(&'static Schema),
}

pub struct Schema {
    pub fields: &'static [(&'static str, Field)],
}

use Field::{Inert, List, Object, Used};

static META: Schema = Schema {
    fields: &[
        ("name", Used),
        ("namespace", Used),
        ("labels", Used),
        ("annotations", Used),
        ("uid", Used),
        ("resourceVersion", Inert),
        ("creationTimestamp", Inert),
        ("generation", Used),
        ("managedFields", Inert),
        ("selfLink", Inert),
        ("ownerReferences", Inert),
        ("finalizers", Inert),
    ],
};

static NAMESPACE: Schema = Schema {
    fields: &[
        ("apiVersion", Used),
        ("kind", Used),
        ("metadata", Object(&META)),
        ("spec", Inert),
        ("status", Inert),
    ],
};

static POD: Schema = Schema {
    fields: &[
        ("apiVersion", Used),
        ("kind", Used),
        ("metadata", Object(&META)),
        ("spec", Object(&POD_SPEC)),
        ("status", Object(&POD_STATUS)),
    ],
};

static POD_SPEC: Schema = Schema {
    fields: &[
        ("nodeName", Used),
        ("serviceAccountName", Used),
        ("serviceAccount", Used),
        ("hostNetwork", Used),
        ("containers", List(&CONTAINER)),
        ("volumes", Inert),
        ("restartPolicy", Inert),
        ("terminationGracePeriodSeconds", Inert),
        ("dnsPolicy", Inert),
        ("dnsConfig", Inert),
        ("securityContext", Inert),
        ("schedulerName", Inert),
        ("tolerations", Inert),
        ("priority", Inert),
        ("priorityClassName", Inert),
        ("enableServiceLinks", Inert),
        ("preemptionPolicy", Inert),
        ("imagePullSecrets", Inert),
        ("automountServiceAccountToken", Inert),
        ("nodeSelector", Inert),
        ("affinity", Inert),
        ("topologySpreadConstraints", Inert),
        ("hostname", Inert),
        ("subdomain", Inert),
        ("runtimeClassName", Inert),
    ],
};

static CONTAINER: Schema = Schema {
    fields: &[
        ("name", Used),
        ("ports", List(&CONTAINER_PORT)),
        ("image", Inert),
        ("command", Inert),
        ("args", Inert),
        ("env", Inert),
        ("envFrom", Inert),
        ("workingDir", Inert),
        ("resources", Inert),
        ("imagePullPolicy", Inert),
        ("volumeMounts", Inert),
        ("volumeDevices", Inert),
        ("securityContext", Inert),
        ("livenessProbe", Inert),
        ("readinessProbe", Inert),
        ("startupProbe", Inert),
        ("lifecycle", Inert),
        ("terminationMessagePath", Inert),
        ("terminationMessagePolicy", Inert),
        ("stdin", Inert),
        ("stdinOnce", Inert),
        ("tty", Inert),
    ],
};

static CONTAINER_PORT: Schema = Schema {
    fields: &[("name", Used), ("containerPort", Used), ("protocol", Used)],
};

static POD_STATUS: Schema = Schema {
    fields: &[
        ("phase", Used),
        ("podIP", Used),
        ("podIPs", Used),
        ("hostIP", Inert),
        ("hostIPs", Inert),
        ("conditions", Inert),
        ("containerStatuses", Inert),
        ("initContainerStatuses", Inert),
        ("startTime", Inert),
        ("qosClass", Inert),
        ("message", Inert),
        ("reason", Inert),
    ],
};

static SERVICE: Schema = Schema {
    fields: &[
        ("apiVersion", Used),
        ("kind", Used),
        ("metadata", Object(&META)),
        ("spec", Object(&SERVICE_SPEC)),
        ("status", Inert),
    ],
};

static SERVICE_SPEC: Schema = Schema {
    fields: &[
        ("clusterIP", Used),
        ("clusterIPs", Used),
        ("selector", Used),
        ("ports", List(&SERVICE_PORT)),
        // The families follow from clusterIPs, which meshd reads directly.
        ("ipFamilies", Inert),
        ("ipFamilyPolicy", Inert),
    ],
};

static SERVICE_PORT: Schema = Schema {
    fields: &[
        ("name", Used),
        ("port", Used),
        ("targetPort", Used),
        ("protocol", Used),
        ("appProtocol", Used),
    ],
};

static AUTHZ: Schema = Schema {
    fields: &[
        ("apiVersion", Used),
        ("kind", Used),
        ("metadata", Object(&META)),
        ("spec", Object(&AUTHZ_SPEC)),
        ("status", Inert),
    ],
};

static AUTHZ_SPEC: Schema = Schema {
    fields: &[
        ("selector", Used),
        ("targetRef", Used),
        ("targetRefs", Used),
        ("action", Used),
        ("provider", Used),
        ("rules", Used),
    ],
};

static REQUEST_AUTHN: Schema = Schema {
    fields: &[
        ("apiVersion", Used),
        ("kind", Used),
        ("metadata", Object(&META)),
        ("spec", Object(&REQUEST_AUTHN_SPEC)),
        ("status", Inert),
    ],
};

/// Istio 1.30's RequestAuthentication; the rules' fields are checked (and unsupported ones
/// reported) by meshcore's policy engine.
static REQUEST_AUTHN_SPEC: Schema = Schema {
    fields: &[
        ("selector", Used),
        ("targetRef", Used),
        ("targetRefs", Used),
        ("jwtRules", Used),
    ],
};

static PEER_AUTHN: Schema = Schema {
    fields: &[
        ("apiVersion", Used),
        ("kind", Used),
        ("metadata", Object(&META)),
        ("spec", Object(&PEER_AUTHN_SPEC)),
        ("status", Inert),
    ],
};

static PEER_AUTHN_SPEC: Schema = Schema {
    fields: &[("selector", Used), ("mtls", Used), ("portLevelMtls", Used)],
};

static GATEWAY: Schema = Schema {
    fields: &[
        ("apiVersion", Used),
        ("kind", Used),
        ("metadata", Object(&META)),
        ("spec", Object(&GATEWAY_SPEC)),
        ("status", Inert),
    ],
};

static GATEWAY_SPEC: Schema = Schema {
    fields: &[("gatewayClassName", Used), ("listeners", List(&LISTENER))],
};

static LISTENER: Schema = Schema {
    fields: &[
        ("name", Used),
        ("port", Used),
        ("protocol", Used),
        ("allowedRoutes", Object(&ALLOWED_ROUTES)),
    ],
};

static ALLOWED_ROUTES: Schema = Schema {
    fields: &[("namespaces", Used)],
};

/// Route kinds: their spec's fields are `meshcore::route`'s to check (it reports unsupported
/// ones itself).
static ROUTE: Schema = Schema {
    fields: &[
        ("apiVersion", Used),
        ("kind", Used),
        ("metadata", Object(&META)),
        ("spec", Used),
        ("status", Inert),
    ],
};

/// Deployments: local mode's controller-manager acts on them (and checks their fields); meshd
/// sees the pods they become.
static DEPLOYMENT: Schema = Schema {
    fields: &[
        ("apiVersion", Used),
        ("kind", Used),
        ("metadata", Object(&META)),
        ("spec", Inert),
        ("status", Inert),
    ],
};

static SERVICE_ACCOUNT: Schema = Schema {
    fields: &[
        ("apiVersion", Used),
        ("kind", Used),
        ("metadata", Object(&META)),
        ("secrets", Inert),
        ("imagePullSecrets", Inert),
        ("automountServiceAccountToken", Inert),
    ],
};

/// The schema for a supported apiVersion/kind, or None when meshd does not handle it.
pub fn for_kind(api_version: &str, kind: &str) -> Option<&'static Schema> {
    let istio_security = matches!(
        api_version,
        "security.istio.io/v1" | "security.istio.io/v1beta1"
    );
    let istio_networking = matches!(
        api_version,
        "networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3"
    );
    let gateway_api = matches!(
        api_version,
        "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1"
    );
    match (api_version, kind) {
        ("v1", "Namespace") => Some(&NAMESPACE),
        ("v1", "Pod") => Some(&POD),
        ("v1", "Service") => Some(&SERVICE),
        ("v1", "ServiceAccount") => Some(&SERVICE_ACCOUNT),
        ("apps/v1", "Deployment") => Some(&DEPLOYMENT),
        (_, "AuthorizationPolicy") if istio_security => Some(&AUTHZ),
        (_, "PeerAuthentication") if istio_security => Some(&PEER_AUTHN),
        (_, "RequestAuthentication") if istio_security => Some(&REQUEST_AUTHN),
        (_, "Gateway") if gateway_api => Some(&GATEWAY),
        (_, "HTTPRoute") if gateway_api => Some(&ROUTE),
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => Some(&ROUTE),
        (_, "VirtualService" | "DestinationRule") if istio_networking => Some(&ROUTE),
        _ => None,
    }
}

/// Dotted paths (`spec.ports[0].nodePort`) of every field the schema does not know.
pub fn unsupported_fields(schema: &Schema, doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(schema, doc, "", &mut out);
    out
}

fn walk(schema: &Schema, v: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = v.as_object() else { return };
    for (key, child) in obj {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match schema
            .fields
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, f)| *f)
        {
            None => out.push(here),
            Some(Used | Inert) => {}
            Some(Object(s)) => walk(s, child, &here, out),
            Some(List(s)) => {
                for (i, item) in child.as_array().into_iter().flatten().enumerate() {
                    walk(s, item, &format!("{here}[{i}]"), out);
                }
            }
        }
    }
}
