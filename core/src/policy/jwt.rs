//! RequestAuthentication: validating the spec as Istio would, and verifying a request's JWTs
//! against its `jwtRules` as Envoy's `jwt_authn` does with Istio's configuration (a missing
//! token is allowed; a present one must verify with the rule of its issuer, else 401).
//!
//! Owns token extraction (`fromHeaders` / `fromParams`, default `Authorization: Bearer` and
//! `access_token`), signature and time checks (the `jsonwebtoken` crate: no hand-rolled
//! crypto), issuer / audience checks, the verified claims L7 rules look at, and the outputs
//! (`outputPayloadToHeader`, `outputClaimToHeaders`, `forwardOriginalToken`). Does not fetch
//! `jwksUri` (the waypoint does, and passes its keys in) nor decide which policies apply.

use std::sync::Arc;

/// A JSON Web Key Set (`jsonwebtoken`'s), as `jwks` and `jwksUri` hold it.
pub use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Serialize;
use serde_json::{Map, Value};

use super::l7::{TargetRef, parse_targets};
use super::spec::{
    Diag, as_array, as_object, check_known_fields, field, index, join, parse_selector, parse_spec,
    string_field, string_list,
};
use super::{PolicyReport, PolicyStatus};
use crate::proto::config::Policy;

pub(crate) const KIND: &str = "RequestAuthentication";

/// Envoy's default clock skew for `exp` / `nbf`.
const CLOCK_SKEW_SECS: u64 = 60;

/// Where a rule's keys come from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Keys {
    /// `jwks`: parsed once; an unparsable set rejects every token of the issuer.
    #[serde(serialize_with = "serialize_inline")]
    Inline(Result<Arc<JwkSet>, String>),
    /// `jwksUri`: fetched (and refreshed) by the waypoint.
    Uri(String),
    /// Neither: Istio would discover them from the issuer (OIDC); not supported, so every
    /// token of this issuer is rejected.
    Missing,
}

fn serialize_inline<S: serde::Serializer>(
    k: &Result<Arc<JwkSet>, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match k {
        Ok(set) => s.serialize_str(&format!("{} key(s)", set.keys.len())),
        Err(e) => s.serialize_str(&format!("invalid: {e}")),
    }
}

/// Where a token is read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Location {
    /// Header `name` (lower case) whose value starts with `prefix`.
    Header { name: String, prefix: String },
    /// Query parameter.
    Param(String),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: Keys,
    pub locations: Vec<Location>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// `(header, claim)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<(String, String)>,
    pub forward_original_token: bool,
}

/// One RequestAuthentication as the waypoint applies it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtPolicy {
    /// `ns/name`.
    pub key: String,
    pub namespace: String,
    pub targets: Vec<TargetRef>,
    pub rules: Vec<JwtRule>,
}

/// The verified token's facts, as L7 rules see them (`request.auth.*`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Claims {
    /// `iss/sub`.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub payload: Map<String, Value>,
}

impl Claims {
    /// `request.auth.claims[a][b]`: a string claim, or each string of a list claim.
    pub fn claim_strings(&self, path: &[String]) -> Vec<String> {
        let Some((first, rest)) = path.split_first() else {
            return Vec::new();
        };
        let mut v = self.payload.get(first);
        for k in rest {
            v = v.and_then(|v| v.get(k));
        }
        match v {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A verified token and what to do with the request because of it.
#[derive(Debug, Clone)]
pub struct Verified {
    pub claims: Claims,
    pub location: Location,
    /// The token's payload segment (base64url), for `outputPayloadToHeader`.
    pub payload_b64: String,
    pub output_payload_to_header: Option<String>,
    pub output_claim_to_headers: Vec<(String, String)>,
    pub forward_original_token: bool,
}

#[derive(Debug, Clone)]
pub enum Authn {
    /// No token in any location the rules read: allowed, with no request principal.
    NoToken,
    Verified(Box<Verified>),
    /// A token was presented and failed: 401. Envoy's wording.
    Failed(String),
}

/// Keys fetched from a `jwksUri`, or why they could not be.
pub type KeyLookup<'a> = &'a dyn Fn(&str) -> Result<Arc<JwkSet>, String>;

/// Verifies the tokens of a request against `rules` (those of every RequestAuthentication that
/// applies). Every token found must verify; the first verified one is the request's identity.
/// `now`: seconds since the epoch.
pub fn authenticate(
    rules: &[&JwtRule],
    headers: &http::HeaderMap,
    query: Option<&str>,
    keys: KeyLookup<'_>,
    now: u64,
) -> Authn {
    let default_locations = [
        Location::Header {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
        },
        Location::Param("access_token".into()),
    ];
    let locations_of = |r: &JwtRule| -> Vec<Location> {
        if r.locations.is_empty() {
            default_locations.to_vec()
        } else {
            r.locations.clone()
        }
    };
    let mut tokens: Vec<(String, Location)> = Vec::new();
    for r in rules {
        for loc in locations_of(r) {
            if let Some(t) = extract(&loc, headers, query)
                && !tokens.iter().any(|(x, l)| *x == t && *l == loc)
            {
                tokens.push((t, loc));
            }
        }
    }
    let mut first = None;
    for (token, loc) in tokens {
        let Some(iss) = unverified_issuer(&token) else {
            return Authn::Failed("Jwt is not in the form of Header.Payload.Signature".into());
        };
        let Some(rule) = rules
            .iter()
            .find(|r| r.issuer == iss && locations_of(r).contains(&loc))
        else {
            return Authn::Failed("Jwt issuer is not configured".into());
        };
        match verify(rule, &token, keys, now) {
            Ok(claims) => {
                first.get_or_insert(Verified {
                    claims,
                    payload_b64: token.split('.').nth(1).unwrap_or_default().to_string(),
                    location: loc,
                    output_payload_to_header: rule.output_payload_to_header.clone(),
                    output_claim_to_headers: rule.output_claim_to_headers.clone(),
                    forward_original_token: rule.forward_original_token,
                });
            }
            Err(reason) => return Authn::Failed(reason),
        }
    }
    match first {
        Some(v) => Authn::Verified(Box::new(v)),
        None => Authn::NoToken,
    }
}

/// Removes, from a request as it arrived, every header the rules would write their outputs to
/// (`outputPayloadToHeader`, `outputClaimToHeaders`), as Envoy does first thing: otherwise a
/// client with no token (or a token without that claim) could send the backend a payload or
/// claim header of its own making.
pub fn strip_outputs(rules: &[&JwtRule], headers: &mut http::HeaderMap) {
    for rule in rules {
        if let Some(h) = &rule.output_payload_to_header {
            headers.remove(h.as_str());
        }
        for (h, _) in &rule.output_claim_to_headers {
            headers.remove(h.as_str());
        }
    }
}

impl Verified {
    /// Applies the rule's outputs to the request's headers: the payload header, claim headers,
    /// and (unless `forwardOriginalToken`) removing the token's header.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        if !self.forward_original_token
            && let Location::Header { name, .. } = &self.location
        {
            headers.remove(name.as_str());
        }
        if let Some(h) = &self.output_payload_to_header
            && let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(h.as_bytes()),
                http::HeaderValue::from_str(&self.payload_b64),
            )
        {
            headers.insert(name, value);
        }
        for (h, claim) in &self.output_claim_to_headers {
            let value = match self.claims.payload.get(claim) {
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                _ => continue,
            };
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(h.as_bytes()),
                http::HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
    }
}

fn extract(loc: &Location, headers: &http::HeaderMap, query: Option<&str>) -> Option<String> {
    match loc {
        Location::Header { name, prefix } => {
            let v = headers.get(name.as_str())?.to_str().ok()?.trim();
            let head = v.get(..prefix.len())?;
            head.eq_ignore_ascii_case(prefix)
                .then(|| v[prefix.len()..].trim().to_string())
                .filter(|t| !t.is_empty())
        }
        Location::Param(p) => query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == p && !v.is_empty()).then(|| v.to_string())
        }),
    }
}

/// The `iss` claim read without verification, only to pick the rule that verifies the token.
fn unverified_issuer(token: &str) -> Option<String> {
    if token.split('.').count() != 3 {
        return None;
    }
    let mut v = Validation::new(Algorithm::HS256);
    v.insecure_disable_signature_validation();
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    let data =
        jsonwebtoken::decode::<Map<String, Value>>(token, &DecodingKey::from_secret(&[]), &v)
            .ok()?;
    Some(
        data.claims
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    )
}

fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    let family_ok = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        AlgorithmParameters::EllipticCurve(_) => {
            matches!(alg, Algorithm::ES256 | Algorithm::ES384)
        }
        AlgorithmParameters::OctetKeyPair(_) => alg == Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => {
            matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
        }
    };
    let declared = jwk
        .common
        .key_algorithm
        .and_then(|a| a.to_string().parse::<Algorithm>().ok());
    family_ok && declared.is_none_or(|d| d == alg)
}

fn verify(rule: &JwtRule, token: &str, keys: KeyLookup<'_>, now: u64) -> Result<Claims, String> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| format!("Jwt header is an invalid JSON: {e}"))?;
    let set = match &rule.keys {
        Keys::Inline(Ok(set)) => set.clone(),
        Keys::Inline(Err(e)) => return Err(format!("Jwks is invalid: {e}")),
        Keys::Uri(uri) => keys(uri).map_err(|e| format!("Jwks remote fetch is failed: {e}"))?,
        Keys::Missing => return Err("Jwks is not configured for this issuer".into()),
    };
    let candidates: Vec<&Jwk> = set
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.common.key_id == header.kid)
        .filter(|k| key_fits(k, header.alg))
        .collect();
    if candidates.is_empty() {
        return Err("Jwks doesn't have key to match kid or alg from Jwt".into());
    }
    let mut validation = Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_aud = false;
    validation.validate_exp = false;
    validation.validate_nbf = false;
    let mut last = String::from("Jwt verification fails");
    for jwk in candidates {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation) {
            Ok(data) => return check_claims(rule, data.claims, now),
            Err(e) => last = format!("Jwt verification fails: {e}"),
        }
    }
    Err(last)
}

/// Times (Envoy's 60 s skew) and audiences, once the signature holds.
fn check_claims(rule: &JwtRule, payload: Map<String, Value>, now: u64) -> Result<Claims, String> {
    // A time claim that is present must be a number of seconds (RFC 7519 NumericDate): one
    // of another type must not read as "no expiry".
    let time = |k: &str| -> Result<Option<u64>, String> {
        match payload.get(k) {
            None => Ok(None),
            Some(v) => match (v.as_u64(), v.as_f64()) {
                (Some(n), _) => Ok(Some(n)),
                (None, Some(f)) if f >= 0.0 => Ok(Some(f as u64)),
                _ => Err(format!("Jwt {k} claim is not a number of seconds")),
            },
        }
    };
    if let Some(exp) = time("exp")?
        && exp.saturating_add(CLOCK_SKEW_SECS) < now
    {
        return Err("Jwt is expired".into());
    }
    if let Some(nbf) = time("nbf")?
        && nbf > now.saturating_add(CLOCK_SKEW_SECS)
    {
        return Err("Jwt not yet valid".into());
    }
    let audiences: Vec<String> = match payload.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    if !rule.audiences.is_empty() && !audiences.iter().any(|a| rule.audiences.contains(a)) {
        return Err("Audiences in Jwt are not allowed".into());
    }
    let s = |k: &str| payload.get(k).and_then(Value::as_str).map(str::to_string);
    Ok(Claims {
        principal: format!(
            "{}/{}",
            s("iss").unwrap_or_default(),
            s("sub").unwrap_or_default()
        ),
        audiences,
        presenter: s("azp"),
        payload,
    })
}

/// Compiles one RequestAuthentication. Only `targetRefs` ones are applied (by the waypoint);
/// ztunnel cannot read HTTP, so none is enforced at L4 (the report says so).
pub(crate) fn compile(p: &Policy) -> (Option<JwtPolicy>, PolicyReport) {
    let mut d = Diag::new(KIND, &p.namespace, &p.name);
    d.warn(
        "kind",
        "ztunnel cannot read JWTs: NOT enforced at L4 (a waypoint verifies them when the policy \
         is attached to it with targetRefs)",
    );
    let compiled = parse_spec(&p.spec_json, &mut d).and_then(|spec| compile_spec(&spec, p, &mut d));
    let compiled = compiled.filter(|_| !d.has_errors());
    let status = if d.has_errors() {
        PolicyStatus::Rejected
    } else {
        PolicyStatus::NotEnforced
    };
    (compiled, d.into_report(&p.key, status, None))
}

fn compile_spec(spec: &Map<String, Value>, p: &Policy, d: &mut Diag) -> Option<JwtPolicy> {
    check_known_fields(
        spec,
        "spec",
        &["selector", "targetRef", "targetRefs", "jwtRules"],
        d,
    );
    let has_selector = parse_selector(spec, d).is_some() || field(spec, "selector").is_some();
    let targets = parse_targets(spec, d);
    if has_selector && !targets.is_empty() {
        d.error(
            "spec.targetRefs",
            "only one of targetRefs or workloadSelector can be set",
        );
    }
    let mut rules = Vec::new();
    if let Some(v) = field(spec, "jwtRules")
        && let Some(items) = as_array(v, "spec.jwtRules", d)
    {
        for (i, item) in items.iter().enumerate() {
            let path = index("spec.jwtRules", i);
            if let Some(m) = as_object(item, &path, d)
                && let Some(r) = parse_rule(m, &path, d)
            {
                rules.push(r);
            }
        }
    }
    if targets.is_empty() {
        d.warn(
            "spec.selector",
            "without targetRefs no waypoint applies this RequestAuthentication (ztunnel cannot \
             read JWTs): attach it to a waypoint Gateway or a Service bound to one",
        );
    }
    Some(JwtPolicy {
        key: format!("{}/{}", p.namespace, p.name),
        namespace: p.namespace.clone(),
        targets,
        rules,
    })
}

fn parse_rule(m: &Map<String, Value>, path: &str, d: &mut Diag) -> Option<JwtRule> {
    check_known_fields(
        m,
        path,
        &[
            "issuer",
            "audiences",
            "jwksUri",
            "jwks_uri",
            "jwks",
            "fromHeaders",
            "fromParams",
            "fromCookies",
            "outputPayloadToHeader",
            "forwardOriginalToken",
            "outputClaimToHeaders",
            "spaceDelimitedClaims",
            "timeout",
        ],
        d,
    );
    let issuer = string_field(m, "issuer", path, d).unwrap_or_default();
    if issuer.is_empty() {
        d.error(&join(path, "issuer"), "issuer must be set");
    }
    let audiences = string_list(m, "audiences", path, d);
    let uri = string_field(m, "jwksUri", path, d).or_else(|| string_field(m, "jwks_uri", path, d));
    let jwks = string_field(m, "jwks", path, d);
    let keys = match (uri, jwks) {
        (Some(_), Some(_)) => {
            d.error(path, "only one of jwks or jwksUri can be set");
            return None;
        }
        (Some(u), None) => {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                d.error(
                    &join(path, "jwksUri"),
                    format!("url must have scheme http:// or https:// (got {u:?})"),
                );
            }
            Keys::Uri(u)
        }
        (None, Some(j)) => Keys::Inline(
            serde_json::from_str::<JwkSet>(&j)
                .map(Arc::new)
                .map_err(|e| e.to_string()),
        ),
        (None, None) => {
            d.warn(
                path,
                format!(
                    "no jwks or jwksUri: OpenID discovery from the issuer is not supported, so \
                     tokens of {issuer:?} are rejected"
                ),
            );
            Keys::Missing
        }
    };
    if let Keys::Inline(Err(e)) = &keys {
        d.warn(
            &join(path, "jwks"),
            format!("not a JWKS ({e}): tokens of {issuer:?} are rejected"),
        );
    }
    let mut locations = Vec::new();
    if let Some(v) = field(m, "fromHeaders") {
        let hpath = join(path, "fromHeaders");
        for (i, h) in as_array(v, &hpath, d).into_iter().flatten().enumerate() {
            let ipath = index(&hpath, i);
            let Some(h) = as_object(h, &ipath, d) else {
                continue;
            };
            check_known_fields(h, &ipath, &["name", "prefix"], d);
            let name = string_field(h, "name", &ipath, d).unwrap_or_default();
            if name.is_empty() {
                d.error(&join(&ipath, "name"), "header name must be set");
                continue;
            }
            locations.push(Location::Header {
                name: name.to_ascii_lowercase(),
                prefix: string_field(h, "prefix", &ipath, d).unwrap_or_default(),
            });
        }
    }
    for p in string_list(m, "fromParams", path, d) {
        locations.push(Location::Param(p));
    }
    for unsupported in ["fromCookies", "spaceDelimitedClaims", "timeout"] {
        if field(m, unsupported).is_some() {
            d.warn(
                &join(path, unsupported),
                "not supported by this waypoint: ignored",
            );
        }
    }
    let mut output_claim_to_headers = Vec::new();
    if let Some(v) = field(m, "outputClaimToHeaders") {
        let opath = join(path, "outputClaimToHeaders");
        for (i, o) in as_array(v, &opath, d).into_iter().flatten().enumerate() {
            let ipath = index(&opath, i);
            let Some(o) = as_object(o, &ipath, d) else {
                continue;
            };
            check_known_fields(o, &ipath, &["header", "claim"], d);
            match (
                string_field(o, "header", &ipath, d),
                string_field(o, "claim", &ipath, d),
            ) {
                (Some(h), Some(c)) if !h.is_empty() && !c.is_empty() => {
                    output_claim_to_headers.push((h.to_ascii_lowercase(), c))
                }
                _ => d.error(&ipath, "header and claim must both be set"),
            }
        }
    }
    let forward_original_token = match field(m, "forwardOriginalToken") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            d.error(&join(path, "forwardOriginalToken"), "expected a boolean");
            false
        }
    };
    Some(JwtRule {
        issuer,
        audiences,
        keys,
        locations,
        output_payload_to_header: string_field(m, "outputPayloadToHeader", path, d)
            .filter(|s| !s.is_empty())
            .map(|s| s.to_ascii_lowercase()),
        output_claim_to_headers,
        forward_original_token,
    })
}
