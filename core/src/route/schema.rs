//! The fields each route kind has (checked against the upstream CRD schemas in
//! shared/schemas/istio-1.30.3 and gateway-api-v1.6.1), and a walk over a `spec` that reports,
//! with exact field paths, values of the wrong type (Error), fields we read but do not implement
//! (Unsupported), and fields the kind does not have (Unsupported: "unknown field").
//!
//! Owns field names and JSON types only; what a value means is `validate`'s job.

use serde_json::Value;

use super::{Diags, Kind, Severity};

/// The expected JSON shape of a value.
#[derive(Clone, Copy)]
pub(crate) enum Shape {
    Str,
    Bool,
    /// Any number (a protobuf double).
    Num,
    /// An integer in `[min, max]`.
    Int(i64, i64),
    Obj(&'static [(&'static str, Shape)]),
    List(&'static Shape),
    /// An object with free keys (labels, header names).
    Map(&'static Shape),
    /// A field we read but do not implement yet: the message says what happens instead.
    Unsupported(&'static str),
}

use Shape::*;

const I32: Shape = Int(i32::MIN as i64, i32::MAX as i64);
const PORT: Shape = Int(0, u32::MAX as i64);
const LATER: Shape = Unsupported("not implemented yet: it has no effect");
const SELECTOR: Shape = Unsupported(
    "selects clients by labels, namespace or gateway; a waypoint does not evaluate it, so this \
     match applies to every client",
);

// ---- Istio (networking.istio.io/v1) ----
const STRING_MATCH: Shape = Obj(&[("exact", Str), ("prefix", Str), ("regex", Str)]);
const HEADER_OPS: Shape = Obj(&[
    ("set", Map(&Str)),
    ("add", Map(&Str)),
    ("remove", List(&Str)),
]);
const VS_HEADERS: Shape = Obj(&[("request", HEADER_OPS), ("response", HEADER_OPS)]);
const PERCENT: Shape = Obj(&[("value", Num)]);
const PORT_SELECTOR: Shape = Obj(&[("number", PORT)]);
const DESTINATION: Shape = Obj(&[("host", Str), ("subset", Str), ("port", PORT_SELECTOR)]);
const HTTP_MATCH: Shape = Obj(&[
    ("name", Str),
    ("uri", STRING_MATCH),
    ("scheme", STRING_MATCH),
    ("method", STRING_MATCH),
    ("authority", STRING_MATCH),
    ("headers", Map(&STRING_MATCH)),
    ("withoutHeaders", Map(&STRING_MATCH)),
    ("queryParams", Map(&STRING_MATCH)),
    ("port", PORT),
    ("ignoreUriCase", Bool),
    ("sourceLabels", SELECTOR),
    ("sourceNamespace", SELECTOR),
    ("gateways", SELECTOR),
    (
        "statPrefix",
        Unsupported("no per-route statistics yet: it has no effect"),
    ),
]);
const HTTP_ROUTE_DEST: Shape = Obj(&[
    ("destination", DESTINATION),
    ("weight", I32),
    ("headers", VS_HEADERS),
]);
const VS_HTTP: Shape = Obj(&[
    ("name", Str),
    ("match", List(&HTTP_MATCH)),
    ("route", List(&HTTP_ROUTE_DEST)),
    (
        "redirect",
        Obj(&[
            ("uri", Str),
            ("authority", Str),
            ("port", PORT),
            ("derivePort", Str),
            ("scheme", Str),
            ("redirectCode", PORT),
        ]),
    ),
    (
        "directResponse",
        Obj(&[
            ("status", PORT),
            (
                "body",
                Obj(&[
                    ("string", Str),
                    (
                        "bytes",
                        Unsupported("use body.string: bytes bodies are not implemented"),
                    ),
                ]),
            ),
        ]),
    ),
    (
        "rewrite",
        Obj(&[
            ("uri", Str),
            ("authority", Str),
            ("uriRegexRewrite", Obj(&[("match", Str), ("rewrite", Str)])),
        ]),
    ),
    ("headers", VS_HEADERS),
    ("timeout", Str),
    (
        "retries",
        Obj(&[
            ("attempts", I32),
            ("perTryTimeout", Str),
            ("retryOn", Str),
            (
                "retryRemoteLocalities",
                Unsupported("locality is not modelled: it has no effect"),
            ),
            ("retryIgnorePreviousHosts", Bool),
            ("backoff", Str),
        ]),
    ),
    (
        "fault",
        Obj(&[
            (
                "delay",
                Obj(&[
                    ("fixedDelay", Str),
                    ("percentage", PERCENT),
                    ("percent", I32),
                    (
                        "exponentialDelay",
                        Unsupported("use fixedDelay: exponential delays are not implemented"),
                    ),
                ]),
            ),
            (
                "abort",
                Obj(&[
                    ("httpStatus", I32),
                    ("grpcStatus", Str),
                    ("percentage", PERCENT),
                    (
                        "http2Error",
                        Unsupported(
                            "use httpStatus or grpcStatus: HTTP/2 error aborts are not implemented",
                        ),
                    ),
                ]),
            ),
        ]),
    ),
    ("mirror", DESTINATION),
    (
        "mirrors",
        List(&Obj(&[
            ("destination", DESTINATION),
            ("percentage", PERCENT),
        ])),
    ),
    ("mirrorPercentage", PERCENT),
    ("mirrorPercent", Int(0, u32::MAX as i64)),
    ("mirror_percent", Int(0, u32::MAX as i64)),
    ("corsPolicy", LATER),
    (
        "delegate",
        Unsupported("delegation is not implemented: this rule never matches"),
    ),
]);
const VS_TCP: Shape = Obj(&[
    (
        "match",
        List(&Obj(&[
            ("port", PORT),
            (
                "destinationSubnets",
                Unsupported("not evaluated at a waypoint: it has no effect"),
            ),
            (
                "sourceSubnet",
                Unsupported("not evaluated at a waypoint: it has no effect"),
            ),
            ("sourceLabels", SELECTOR),
            ("sourceNamespace", SELECTOR),
            ("gateways", SELECTOR),
        ])),
    ),
    (
        "route",
        List(&Obj(&[("destination", DESTINATION), ("weight", I32)])),
    ),
]);
const VIRTUAL_SERVICE: Shape = Obj(&[
    ("hosts", List(&Str)),
    ("http", List(&VS_HTTP)),
    ("tcp", List(&VS_TCP)),
    (
        "tls",
        Unsupported("TLS (SNI) routes are not implemented: TLS traffic passes through"),
    ),
    ("gateways", SELECTOR),
    (
        "exportTo",
        Unsupported("visibility is not implemented: every namespace sees it"),
    ),
]);

const LOAD_BALANCER: Shape = Obj(&[
    ("simple", Str),
    (
        "consistentHash",
        Obj(&[
            ("httpHeaderName", Str),
            (
                "httpCookie",
                Obj(&[
                    ("name", Str),
                    ("path", Str),
                    ("ttl", Str),
                    ("attributes", LATER),
                ]),
            ),
            ("useSourceIp", Bool),
            ("httpQueryParameterName", Str),
            ("minimumRingSize", RING),
            ("ringHash", RING),
            ("maglev", RING),
        ]),
    ),
    (
        "localityLbSetting",
        Unsupported("locality is not modelled: endpoints are equal"),
    ),
    ("warmup", LATER),
    ("warmupDurationSecs", LATER),
]);
const RING: Shape =
    Unsupported("the hash ring has a fixed size (256 points per endpoint): it has no effect");
const U32: Shape = Int(0, u32::MAX as i64);
const CONNECTION_POOL: Shape = Obj(&[
    (
        "tcp",
        Obj(&[
            ("maxConnections", I32),
            ("connectTimeout", Str),
            ("idleTimeout", Str),
            (
                "tcpKeepalive",
                Unsupported("TCP keepalive is not configurable: the waypoint's defaults apply"),
            ),
            (
                "maxConnectionDuration",
                Unsupported("connections are not aged out: it has no effect"),
            ),
        ]),
    ),
    (
        "http",
        Obj(&[
            ("http1MaxPendingRequests", I32),
            ("http2MaxRequests", I32),
            ("maxRequestsPerConnection", I32),
            ("maxRetries", I32),
            ("idleTimeout", Str),
            (
                "h2UpgradePolicy",
                Unsupported("the upstream protocol follows the client's: it has no effect"),
            ),
            (
                "useClientProtocol",
                Unsupported("the upstream protocol always follows the client's: it has no effect"),
            ),
            (
                "maxConcurrentStreams",
                Unsupported("not implemented: the upstream's HTTP/2 limit applies"),
            ),
        ]),
    ),
]);
const OUTLIER_DETECTION: Shape = Obj(&[
    ("consecutive5xxErrors", U32),
    ("consecutiveGatewayErrors", U32),
    ("consecutiveErrors", I32),
    ("interval", Str),
    ("baseEjectionTime", Str),
    ("maxEjectionPercent", I32),
    ("minHealthPercent", I32),
    (
        "splitExternalLocalOriginErrors",
        Unsupported("local-origin failures are not counted apart: it has no effect"),
    ),
    (
        "consecutiveLocalOriginFailures",
        Unsupported("local-origin failures are not counted apart: it has no effect"),
    ),
]);
const PORT_TRAFFIC_POLICY: Shape = Obj(&[
    ("port", PORT_SELECTOR),
    ("loadBalancer", LOAD_BALANCER),
    ("connectionPool", CONNECTION_POOL),
    ("outlierDetection", OUTLIER_DETECTION),
    ("tls", TLS),
]);
const TLS: Shape =
    Unsupported("traffic between mesh pods is always HBONE mutual TLS: it has no effect");
const TRAFFIC_POLICY: Shape = Obj(&[
    ("loadBalancer", LOAD_BALANCER),
    ("portLevelSettings", List(&PORT_TRAFFIC_POLICY)),
    ("connectionPool", CONNECTION_POOL),
    ("outlierDetection", OUTLIER_DETECTION),
    ("tls", TLS),
    ("proxyProtocol", LATER),
    ("retryBudget", LATER),
    ("tunnel", LATER),
]);
const DESTINATION_RULE: Shape = Obj(&[
    ("host", Str),
    (
        "subsets",
        List(&Obj(&[
            ("name", Str),
            ("labels", Map(&Str)),
            ("trafficPolicy", TRAFFIC_POLICY),
        ])),
    ),
    ("trafficPolicy", TRAFFIC_POLICY),
    (
        "exportTo",
        Unsupported("visibility is not implemented: every namespace sees it"),
    ),
    (
        "workloadSelector",
        Unsupported("applies to every client of the host"),
    ),
]);

// ---- Gateway API (gateway.networking.k8s.io/v1) ----
const PARENT_REF: Shape = Obj(&[
    ("group", Str),
    ("kind", Str),
    ("namespace", Str),
    ("name", Str),
    ("sectionName", Str),
    ("port", Int(1, 65535)),
]);
const NAME_VALUE: Shape = Obj(&[("name", Str), ("value", Str)]);
const HEADER_MODIFIER: Shape = Obj(&[
    ("set", List(&NAME_VALUE)),
    ("add", List(&NAME_VALUE)),
    ("remove", List(&Str)),
]);
const PATH_MODIFIER: Shape = Obj(&[
    ("type", Str),
    ("replaceFullPath", Str),
    ("replacePrefixMatch", Str),
]);
const MIRROR: Shape = Obj(&[
    (
        "backendRef",
        Obj(&[
            ("group", Str),
            ("kind", Str),
            ("name", Str),
            ("namespace", Str),
            ("port", Int(1, 65535)),
        ]),
    ),
    ("percent", Int(0, 100)),
    (
        "fraction",
        Obj(&[
            ("numerator", Int(0, i32::MAX as i64)),
            ("denominator", Int(1, i32::MAX as i64)),
        ]),
    ),
]);
const BACKEND_MIRROR: Shape = Unsupported(
    "mirroring from a backendRef is not implemented: put the RequestMirror filter on the rule",
);
const EXTENSION: Shape = Unsupported("extension filters are not implemented: it has no effect");
const HTTP_FILTER: Shape = Obj(&[
    ("type", Str),
    ("requestHeaderModifier", HEADER_MODIFIER),
    ("responseHeaderModifier", HEADER_MODIFIER),
    (
        "requestRedirect",
        Obj(&[
            ("scheme", Str),
            ("hostname", Str),
            ("path", PATH_MODIFIER),
            ("port", Int(1, 65535)),
            ("statusCode", Int(0, 999)),
        ]),
    ),
    (
        "urlRewrite",
        Obj(&[("hostname", Str), ("path", PATH_MODIFIER)]),
    ),
    ("requestMirror", MIRROR),
    ("cors", LATER),
    ("extensionRef", EXTENSION),
    ("externalAuth", LATER),
]);
const HTTP_BACKEND_FILTER: Shape = Obj(&[
    ("type", Str),
    ("requestHeaderModifier", HEADER_MODIFIER),
    ("responseHeaderModifier", HEADER_MODIFIER),
    (
        "requestRedirect",
        Obj(&[
            ("scheme", Str),
            ("hostname", Str),
            ("path", PATH_MODIFIER),
            ("port", Int(1, 65535)),
            ("statusCode", Int(0, 999)),
        ]),
    ),
    (
        "urlRewrite",
        Obj(&[("hostname", Str), ("path", PATH_MODIFIER)]),
    ),
    ("requestMirror", BACKEND_MIRROR),
    ("cors", LATER),
    ("extensionRef", EXTENSION),
    ("externalAuth", LATER),
]);
const HTTP_BACKEND_REF: Shape = Obj(&[
    ("group", Str),
    ("kind", Str),
    ("name", Str),
    ("namespace", Str),
    ("port", Int(1, 65535)),
    ("weight", Int(0, 1_000_000)),
    ("filters", List(&HTTP_BACKEND_FILTER)),
]);
const HTTP_MATCH_GW: Shape = Obj(&[
    ("path", Obj(&[("type", Str), ("value", Str)])),
    ("headers", List(&TYPED_MATCH)),
    ("queryParams", List(&TYPED_MATCH)),
    ("method", Str),
]);
const TYPED_MATCH: Shape = Obj(&[("type", Str), ("name", Str), ("value", Str)]);
const HTTP_ROUTE: Shape = Obj(&[
    ("parentRefs", List(&PARENT_REF)),
    ("hostnames", HOSTNAMES),
    (
        "rules",
        List(&Obj(&[
            ("name", Str),
            ("matches", List(&HTTP_MATCH_GW)),
            ("filters", List(&HTTP_FILTER)),
            ("backendRefs", List(&HTTP_BACKEND_REF)),
            (
                "timeouts",
                Obj(&[("request", Str), ("backendRequest", Str)]),
            ),
            (
                "retry",
                Unsupported(
                    "HTTPRoute retry (experimental) is not implemented: Istio's default retries apply",
                ),
            ),
            ("sessionPersistence", LATER),
        ])),
    ),
]);
const HOSTNAMES: Shape =
    Unsupported("ignored for Service parents (GAMMA): the route applies to the Service itself");
const GRPC_FILTER: Shape = Obj(&[
    ("type", Str),
    ("requestHeaderModifier", HEADER_MODIFIER),
    ("responseHeaderModifier", HEADER_MODIFIER),
    ("requestMirror", MIRROR),
    ("extensionRef", EXTENSION),
]);
const GRPC_BACKEND_FILTER: Shape = Obj(&[
    ("type", Str),
    ("requestHeaderModifier", HEADER_MODIFIER),
    ("responseHeaderModifier", HEADER_MODIFIER),
    ("requestMirror", BACKEND_MIRROR),
    ("extensionRef", EXTENSION),
]);
const GRPC_ROUTE: Shape = Obj(&[
    ("parentRefs", List(&PARENT_REF)),
    ("hostnames", HOSTNAMES),
    (
        "rules",
        List(&Obj(&[
            ("name", Str),
            (
                "matches",
                List(&Obj(&[
                    (
                        "method",
                        Obj(&[("type", Str), ("service", Str), ("method", Str)]),
                    ),
                    ("headers", List(&TYPED_MATCH)),
                ])),
            ),
            ("filters", List(&GRPC_FILTER)),
            (
                "backendRefs",
                List(&Obj(&[
                    ("group", Str),
                    ("kind", Str),
                    ("name", Str),
                    ("namespace", Str),
                    ("port", Int(1, 65535)),
                    ("weight", Int(0, 1_000_000)),
                    ("filters", List(&GRPC_BACKEND_FILTER)),
                ])),
            ),
            ("sessionPersistence", LATER),
        ])),
    ),
]);

/// The shape of a kind's `spec`.
pub(crate) fn spec_shape(kind: Kind) -> &'static Shape {
    match kind {
        Kind::VirtualService => &VIRTUAL_SERVICE,
        Kind::DestinationRule => &DESTINATION_RULE,
        Kind::HttpRoute => &HTTP_ROUTE,
        Kind::GrpcRoute => &GRPC_ROUTE,
    }
}

/// Walks `value` against `shape`, reporting into `d`. `null` counts as absent everywhere
/// (YAML `field:` with nothing after it).
pub(crate) fn check(shape: &Shape, value: &Value, path: &str, d: &mut Diags) {
    if value.is_null() {
        return;
    }
    match shape {
        Str if !value.is_string() => d.error(path, "must be a string"),
        Bool if !value.is_boolean() => d.error(path, "must be true or false"),
        Num if !value.is_number() => d.error(path, "must be a number"),
        Int(min, max) => match value.as_i64() {
            Some(n) if n >= *min && n <= *max => {}
            Some(_) => d.error(path, format!("must be between {min} and {max}")),
            None if value.is_u64() => d.error(path, format!("must be between {min} and {max}")),
            None => d.error(path, "must be an integer"),
        },
        Obj(fields) => match value.as_object() {
            None => d.error(path, "must be an object"),
            Some(map) => {
                for (key, v) in map {
                    let child = format!("{path}.{key}");
                    match fields.iter().find(|(name, _)| name == key) {
                        Some((_, s)) => check(s, v, &child, d),
                        None => d.push(
                            Severity::Unsupported,
                            &child,
                            "unknown field (not in the resource's schema): it has no effect; \
                             check its spelling or remove it",
                        ),
                    }
                }
            }
        },
        List(item) => match value.as_array() {
            None => d.error(path, "must be a list"),
            Some(items) => {
                for (i, v) in items.iter().enumerate() {
                    check(item, v, &format!("{path}[{i}]"), d);
                }
            }
        },
        Map(item) => match value.as_object() {
            None => d.error(path, "must be an object"),
            Some(map) => {
                for (key, v) in map {
                    check(item, v, &format!("{path}.{key}"), d);
                }
            }
        },
        Unsupported(why) => d.push(Severity::Unsupported, path, why),
        _ => {}
    }
}

/// A copy of `value` with every `null` object member removed, so serde sees it as absent.
pub(crate) fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}
