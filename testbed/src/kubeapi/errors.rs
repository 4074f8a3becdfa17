//! API errors as the double answers them: an HTTP code, a `Status.reason` and a message,
//! rendered as the `Status` object kube and kubectl parse. Owns nothing else.

use serde_json::{Value, json};

/// One API error (what becomes a `Status` body).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiErr {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details` (name, group, kind) as the real server fills them in for object errors.
    pub details: Option<Value>,
}

impl ApiErr {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiErr {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }
    /// `pods "x" not found`, with the group-qualified resource as the real server writes it.
    pub fn not_found(resource: &str, name: &str) -> Self {
        let mut e = Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"));
        e.details = Some(json!({"name": name, "kind": kind_of(resource)}));
        e
    }
    pub fn already_exists(resource: &str, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        );
        e.details = Some(json!({"name": name, "kind": kind_of(resource)}));
        e
    }
    /// Optimistic concurrency failure (stale `metadata.resourceVersion`).
    pub fn conflict(resource: &str, name: &str, why: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {resource} \"{name}\": {why}"),
        );
        e.details = Some(json!({"name": name, "kind": kind_of(resource)}));
        e
    }
    pub fn stale(resource: &str, name: &str) -> Self {
        Self::conflict(
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }
    /// The reason the real server gives for a bare code (injected failures).
    pub fn for_code(code: u16) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            410 => "Expired",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        Self::new(code, reason, format!("injected failure ({code} {reason})"))
    }
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// `pods` → `pods`, `leases.coordination.k8s.io` → `leases` (Status.details.kind is the plural,
/// as the real server writes it).
fn kind_of(resource: &str) -> &str {
    resource.split('.').next().unwrap_or(resource)
}

impl From<ApiErr> for super::KubeApiError {
    fn from(e: ApiErr) -> Self {
        super::KubeApiError::Status {
            code: e.code,
            reason: e.reason.to_string(),
            message: e.message,
        }
    }
}
