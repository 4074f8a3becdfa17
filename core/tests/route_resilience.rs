//! meshcore::route resilience config: VirtualService / HTTPRoute / GRPCRoute timeouts, retries,
//! faults and mirrors compiled into the `RoutePolicy` a request's `Forward` carries, and
//! DestinationRule connection pools and outlier detection into `destination_policy`, with
//! Istio's defaults, its precedence of levels, and diagnostics that name the field.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use meshcore::route::resilience::{
    Abort, AbortStatus, ConnectionPool, Delay, DestinationPolicy, GrpcRetryOn, Mirror,
    OutlierDetection, RetryOn, RetryPolicy, RoutePolicy,
};
use meshcore::route::{
    Backend, Diagnostic, HttpDecision, HttpRequestInfo, PortInfo, RouteResourceRef, RouteTable,
    ServiceInfo, Severity, compile, references, validate,
};
use serde_json::{Value, json};

const NS: &str = "mesh";

fn service(name: &str, ports: &[u16]) -> ServiceInfo {
    ServiceInfo {
        key: format!("{NS}/{name}"),
        name: name.into(),
        namespace: NS.into(),
        hostname: format!("{name}.{NS}.svc.cluster.local"),
        ports: ports
            .iter()
            .map(|p| PortInfo {
                port: *p,
                name: format!("http-{p}"),
                app_protocol: String::new(),
            })
            .collect(),
    }
}

fn build(resources: &[(&str, Value)]) -> (RouteTable, Vec<Diagnostic>) {
    let services = vec![
        service("echo", &[80, 8080]),
        service("shadow", &[80, 8080]),
        service("single", &[9090]),
    ];
    let refs: Vec<RouteResourceRef<'_>> = resources
        .iter()
        .enumerate()
        .map(|(i, (kind, spec))| RouteResourceRef {
            kind,
            namespace: NS,
            name: "r",
            spec,
            generation_order: i as i64,
        })
        .collect();
    compile(&refs, &services, "cluster.local")
}

fn table(resources: &[(&str, Value)]) -> RouteTable {
    let (t, d) = build(resources);
    let errors: Vec<_> = d.iter().filter(|d| d.severity == Severity::Error).collect();
    assert!(errors.is_empty(), "unexpected errors: {errors:?}");
    t
}

/// The policy a GET of `path` to echo:`port` is forwarded with.
fn policy_at(t: &RouteTable, port: u16, path: &str) -> Arc<RoutePolicy> {
    let headers = HeaderMap::new();
    let info = HttpRequestInfo {
        service: "mesh/echo",
        port,
        method: "GET",
        scheme: "http",
        authority: "echo",
        path_and_query: path,
        headers: &headers,
        client_namespace: Some(NS),
    };
    match t.http(&info) {
        HttpDecision::Forward(f) => f.policy,
        other => panic!("expected a forward, got {other:?}"),
    }
}

fn policy(t: &RouteTable) -> Arc<RoutePolicy> {
    policy_at(t, 80, "/")
}

/// A VirtualService on echo whose only rule is `rule` plus a route to echo.
fn vs(rule: Value) -> (&'static str, Value) {
    let mut r = json!({"route": [{"destination": {"host": "echo"}}]});
    if let (Some(r), Some(extra)) = (r.as_object_mut(), rule.as_object()) {
        r.extend(extra.clone());
    }
    ("VirtualService", json!({"hosts": ["echo"], "http": [r]}))
}

/// The diagnostics of one resource, as (severity, field, message).
fn diags(kind: &str, spec: Value) -> Vec<(Severity, String, String)> {
    validate(kind, NS, "r", &spec)
        .into_iter()
        .map(|d| (d.severity, d.field, d.message))
        .collect()
}

/// Asserts a diagnostic of `severity` at `field` whose message contains `says`.
fn has(kind: &str, spec: Value, severity: Severity, field: &str, says: &str) {
    let got = diags(kind, spec);
    assert!(
        got.iter()
            .any(|(s, f, m)| *s == severity && f == field && m.contains(says)),
        "expected {severity} at {field} saying {says:?}, got {got:?}"
    );
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn a_rule_without_resilience_fields_gets_istios_defaults() {
    let p = policy(&table(&[vs(json!({}))]));
    assert_eq!(*p, RoutePolicy::default());
    assert_eq!(p.timeout, None);
    assert_eq!(p.retry.attempts, 2);
    assert!(p.retry.retry_on.connect_failure && p.retry.retry_on.refused_stream);
    assert!(p.retry.retry_on.grpc.unavailable && p.retry.retry_on.grpc.cancelled);
    assert!(!p.retry.retry_on.five_xx && !p.retry.retry_on.gateway_error);
    assert!(
        p.retry.retry_on.status_codes.is_empty(),
        "503 is not retried by default"
    );
    // The default route (no VirtualService) too.
    assert_eq!(*policy(&table(&[])), RoutePolicy::default());
}

#[test]
fn timeout_and_retries_are_compiled_per_rule() {
    let t = table(&[(
        "VirtualService",
        json!({"hosts": ["echo"], "http": [
            {"match": [{"uri": {"prefix": "/slow"}}], "timeout": "1.5s",
             "retries": {"attempts": 4, "perTryTimeout": "250ms",
                         "retryOn": "5xx, gateway-error,reset,connect-failure,retriable-4xx,refused-stream,503,429,deadline-exceeded,internal,resource-exhausted",
                         "retryIgnorePreviousHosts": false, "backoff": "100ms"},
             "route": [{"destination": {"host": "echo"}}]},
            {"route": [{"destination": {"host": "echo"}}], "retries": {"attempts": 0}}]}),
    )]);
    let p = policy_at(&t, 80, "/slow/x");
    assert_eq!(p.timeout, Some(ms(1500)));
    assert_eq!(
        p.retry,
        RetryPolicy {
            attempts: 4,
            per_try_timeout: Some(ms(250)),
            retry_on: RetryOn {
                five_xx: true,
                gateway_error: true,
                reset: true,
                connect_failure: true,
                retriable_4xx: true,
                refused_stream: true,
                status_codes: vec![503, 429],
                grpc: GrpcRetryOn {
                    deadline_exceeded: true,
                    internal: true,
                    resource_exhausted: true,
                    ..GrpcRetryOn::default()
                },
            },
            backoff_base: ms(100),
            avoid_previous_hosts: false,
        }
    );
    let other = policy_at(&t, 80, "/other");
    assert_eq!(other.timeout, None);
    assert_eq!(other.retry.attempts, 0, "attempts: 0 turns retries off");
}

#[test]
fn retries_without_attempts_turn_retries_off_as_in_istio() {
    let (kind, spec) = vs(json!({"retries": {"perTryTimeout": "1s", "retryOn": "5xx"}}));
    let p = policy(&table(&[(kind, spec.clone())]));
    assert_eq!(p.retry, RetryPolicy::none());
    has(
        kind,
        spec,
        Severity::Warning,
        "spec.http[0].retries.attempts",
        "set attempts",
    );
}

#[test]
fn retries_without_retry_on_keep_istios_conditions() {
    let p = policy(&table(&[vs(
        json!({"retries": {"attempts": 5}, "timeout": "0s"}),
    )]));
    assert_eq!(p.timeout, None, "0s means no timeout");
    assert_eq!(
        p.retry,
        RetryPolicy {
            attempts: 5,
            ..RetryPolicy::istio_default()
        }
    );
}

#[test]
fn a_fault_turns_off_retries_and_timeout() {
    let p = policy(&table(&[vs(json!({
        "timeout": "3s", "retries": {"attempts": 3, "retryOn": "5xx"},
        "fault": {"delay": {"fixedDelay": "2s", "percentage": {"value": 12.5}},
                  "abort": {"httpStatus": 503, "percentage": {"value": 100}}}}))]));
    assert_eq!(p.timeout, None);
    assert_eq!(p.retry.attempts, 0);
    let f = p.fault.clone().expect("a fault");
    assert_eq!(
        f.delay,
        Some(Delay {
            fixed: Duration::from_secs(2),
            percent: 12.5
        })
    );
    assert_eq!(
        f.abort,
        Some(Abort {
            status: AbortStatus::Http(503),
            percent: 100.0
        })
    );
}

#[test]
fn fault_percentages_grpc_status_and_the_old_percent_form() {
    // Old integer `percent` on a delay; gRPC abort by name; a part without percentage is off.
    let p = policy(&table(&[vs(json!({"fault": {
        "delay": {"fixedDelay": "100ms", "percent": 30},
        "abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 0.5}}}}))]));
    let f = p.fault.clone().expect("a fault");
    assert_eq!(f.delay.map(|d| (d.fixed, d.percent)), Some((ms(100), 30.0)));
    assert_eq!(
        f.abort.map(|a| (a.status, a.percent)),
        Some((AbortStatus::Grpc(14), 0.5))
    );
    let p = policy(&table(&[vs(json!({"fault": {
        "delay": {"fixedDelay": "100ms"}, "abort": {"httpStatus": 500}}}))]));
    let f = p.fault.clone().expect("the fault field is set");
    assert_eq!(
        (f.delay, f.abort),
        (None, None),
        "unset percentage: no fault"
    );
}

#[test]
fn mirrors_resolve_to_backends_with_their_percentages() {
    let echo = |port| Backend {
        service: "mesh/shadow".into(),
        port,
        subset: None,
    };
    // mirror with no port on a two-port Service: the request's port; on a one-port Service:
    // that port.
    let t = table(&[vs(
        json!({"mirror": {"host": "shadow"}, "mirrorPercentage": {"value": 25.0}}),
    )]);
    assert_eq!(
        policy_at(&t, 8080, "/").mirrors,
        vec![Mirror {
            backend: echo(8080),
            percent: 25.0
        }]
    );
    assert_eq!(policy_at(&t, 80, "/").mirrors[0].backend, echo(80));
    let t = table(&[vs(json!({"mirrors": [
        {"destination": {"host": "single"}},
        {"destination": {"host": "shadow.mesh.svc.cluster.local", "port": {"number": 8080}}, "percentage": {"value": 5}},
        {"destination": {"host": "shadow"}, "percentage": {"value": 0}}]}))]);
    assert_eq!(
        policy(&t).mirrors,
        vec![
            Mirror {
                backend: Backend {
                    service: "mesh/single".into(),
                    port: 9090,
                    subset: None
                },
                percent: 100.0
            },
            Mirror {
                backend: echo(8080),
                percent: 5.0
            },
        ],
        "a mirror at 0% is dropped"
    );
    let t = table(&[vs(
        json!({"mirror": {"host": "shadow", "port": {"number": 80}}, "mirrorPercent": 40}),
    )]);
    assert_eq!(policy(&t).mirrors[0].percent, 40.0);
}

#[test]
fn mirror_targets_are_sent_to() {
    let (_, spec) = vs(json!({"mirror": {"host": "shadow"}, "mirrors": [
        {"destination": {"host": "single.mesh"}}]}));
    let r = references("VirtualService", NS, &spec, "cluster.local");
    assert_eq!(r.sends_to, ["mesh/echo", "mesh/shadow", "mesh/single"]);
}

#[test]
fn virtual_service_resilience_errors_name_the_field() {
    let e = Severity::Error;
    let check = |rule: Value, field: &str, says: &str| {
        let (kind, spec) = vs(rule);
        has(kind, spec, e, field, says);
    };
    let p = "spec.http[0]";
    check(
        json!({"retries": {"retryOn": "5xx,bogus"}}),
        &format!("{p}.retries.retryOn"),
        "\"bogus\"",
    );
    check(
        json!({"retries": {"retryOn": "700"}}),
        &format!("{p}.retries.retryOn"),
        "\"700\"",
    );
    check(
        json!({"retries": {"attempts": -1}}),
        &format!("{p}.retries.attempts"),
        "negative",
    );
    check(
        json!({"retries": {"attempts": 2, "perTryTimeout": "0.5ms"}}),
        &format!("{p}.retries.perTryTimeout"),
        "at least 1ms",
    );
    check(
        json!({"timeout": "-1s"}),
        &format!("{p}.timeout"),
        "not a duration",
    );
    check(
        json!({"timeout": "soon"}),
        &format!("{p}.timeout"),
        "not a duration",
    );
    check(json!({"timeout": 5}), &format!("{p}.timeout"), "string");
    check(
        json!({"fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 101}}}}),
        &format!("{p}.fault.delay.percentage.value"),
        "0 to 100",
    );
    check(
        json!({"fault": {"abort": {"httpStatus": 503, "percentage": {"value": -1}}}}),
        &format!("{p}.fault.abort.percentage.value"),
        "0 to 100",
    );
    check(
        json!({"fault": {"abort": {"httpStatus": 99, "percentage": {"value": 1}}}}),
        &format!("{p}.fault.abort.httpStatus"),
        "200-599",
    );
    check(
        json!({"fault": {"abort": {"grpcStatus": "NOPE", "percentage": {"value": 1}}}}),
        &format!("{p}.fault.abort.grpcStatus"),
        "NOPE",
    );
    check(
        json!({"fault": {"abort": {"percentage": {"value": 1}}}}),
        &format!("{p}.fault.abort"),
        "httpStatus or grpcStatus",
    );
    check(
        json!({"fault": {"delay": {"percentage": {"value": 1}}}}),
        &format!("{p}.fault.delay.fixedDelay"),
        "fixedDelay",
    );
    check(json!({"fault": {}}), &format!("{p}.fault"), "delay, abort");
    check(
        json!({"mirrorPercentage": {"value": 150}, "mirror": {"host": "shadow"}}),
        &format!("{p}.mirrorPercentage.value"),
        "0 to 100",
    );
    check(
        json!({"mirrorPercentage": {"value": 50}}),
        &format!("{p}.mirrorPercentage"),
        "mirror",
    );
    check(
        json!({"mirror": {"host": "shadow"}, "mirrors": [{"destination": {"host": "shadow"}}]}),
        &format!("{p}.mirror"),
        "exclude",
    );
    // A mirror host that names no Service is an Error at compile time.
    let (_, d) = build(&[vs(json!({"mirror": {"host": "nowhere"}}))]);
    assert!(
        d.iter()
            .any(|d| d.severity == e && d.field == format!("{p}.mirror.host")),
        "{d:?}"
    );
    let (_, d) = build(&[vs(
        json!({"mirrors": [{"destination": {"host": "shadow", "port": {"number": 1}}}]}),
    )]);
    assert!(
        d.iter().any(
            |d| d.severity == e && d.field == format!("{p}.mirrors[0].destination.port.number")
        ),
        "{d:?}"
    );
}

#[test]
fn implemented_fields_are_clean_and_the_rest_stays_unsupported() {
    let (kind, spec) = vs(json!({"timeout": "2s",
        "retries": {"attempts": 3, "perTryTimeout": "1s", "retryOn": "gateway-error,503", "backoff": "50ms", "retryIgnorePreviousHosts": true},
        "mirror": {"host": "shadow"}, "mirrorPercentage": {"value": 10}}));
    assert_eq!(diags(kind, spec), vec![]);
    let (kind, spec) = vs(
        json!({"fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 10}},
        "abort": {"grpcStatus": "INTERNAL", "percentage": {"value": 10}}}}),
    );
    assert_eq!(diags(kind, spec), vec![]);
    let u = Severity::Unsupported;
    let p = "spec.http[0]";
    let (kind, spec) =
        vs(json!({"retries": {"retryOn": "reset-before-request", "retryRemoteLocalities": true}}));
    has(
        kind,
        spec.clone(),
        u,
        &format!("{p}.retries.retryOn"),
        "reset-before-request",
    );
    has(
        kind,
        spec,
        u,
        &format!("{p}.retries.retryRemoteLocalities"),
        "locality",
    );
    let (kind, spec) = vs(
        json!({"fault": {"delay": {"exponentialDelay": "1s"}, "abort": {"http2Error": "x", "httpStatus": 500}}}),
    );
    has(
        kind,
        spec.clone(),
        u,
        &format!("{p}.fault.delay.exponentialDelay"),
        "fixedDelay",
    );
    has(
        kind,
        spec,
        u,
        &format!("{p}.fault.abort.http2Error"),
        "httpStatus",
    );
    let (kind, spec) = vs(json!({"corsPolicy": {}}));
    has(kind, spec, u, &format!("{p}.corsPolicy"), "no effect");
}

/// An HTTPRoute on echo whose only rule is `rule` plus a backendRef to echo:80.
fn http_route(rule: Value) -> (&'static str, Value) {
    let mut r = json!({"backendRefs": [{"name": "echo", "port": 80}]});
    if let (Some(r), Some(extra)) = (r.as_object_mut(), rule.as_object()) {
        r.extend(extra.clone());
    }
    (
        "HTTPRoute",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}], "rules": [r]}),
    )
}

fn mirror_filter(mirror: Value) -> Value {
    json!({"type": "RequestMirror", "requestMirror": mirror})
}

#[test]
fn httproute_timeouts_keep_istios_default_retries() {
    // Istio, for a rule without `retry`: backendRequest is the route timeout, retries default.
    let p = policy(&table(&[http_route(
        json!({"timeouts": {"request": "10s", "backendRequest": "2s"}}),
    )]));
    assert_eq!(p.timeout, Some(Duration::from_secs(2)));
    assert_eq!(p.retry, RetryPolicy::istio_default());
    let p = policy(&table(&[http_route(
        json!({"timeouts": {"request": "10s"}}),
    )]));
    assert_eq!(p.timeout, Some(Duration::from_secs(10)));
    assert_eq!(p.retry, RetryPolicy::istio_default());
    let p = policy(&table(&[http_route(
        json!({"timeouts": {"request": "0s"}}),
    )]));
    assert_eq!(*p, RoutePolicy::default(), "0s: no limit");
    let p = policy(&table(&[http_route(json!({}))]));
    assert_eq!(*p, RoutePolicy::default());
}

#[test]
fn request_mirror_filters_become_mirrors() {
    let shadow = |port| Backend {
        service: "mesh/shadow".into(),
        port,
        subset: None,
    };
    let p = policy(&table(&[http_route(json!({"filters": [
        mirror_filter(json!({"backendRef": {"name": "shadow", "port": 8080}})),
        mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}, "percent": 30})),
        mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}, "fraction": {"numerator": 1, "denominator": 8}})),
        mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}, "fraction": {"numerator": 5}})),
        mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}, "percent": 0}))]}))]));
    let got: Vec<_> = p
        .mirrors
        .iter()
        .map(|m| (m.backend.clone(), m.percent))
        .collect();
    assert_eq!(
        got,
        vec![
            (shadow(8080), 100.0),
            (shadow(80), 30.0),
            (shadow(80), 12.5),
            (shadow(80), 5.0)
        ]
    );
    // GRPCRoute: mirrors, no timeouts field.
    let (_, d) = build(&[(
        "GRPCRoute",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}], "rules": [{
            "filters": [mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}, "percent": 50}))],
            "backendRefs": [{"name": "echo", "port": 80}]}]}),
    )]);
    assert!(d.is_empty(), "{d:?}");
    let t = table(&[(
        "GRPCRoute",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}], "rules": [{
            "filters": [mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}, "percent": 50}))],
            "backendRefs": [{"name": "echo", "port": 80}]}]}),
    )]);
    assert_eq!(
        policy(&t).mirrors,
        vec![Mirror {
            backend: shadow(80),
            percent: 50.0
        }]
    );
}

#[test]
fn request_mirror_targets_are_sent_to() {
    let (kind, spec) = http_route(json!({"filters": [
        mirror_filter(json!({"backendRef": {"name": "shadow", "namespace": "other", "port": 80}}))]}));
    let r = references(kind, NS, &spec, "cluster.local");
    assert_eq!(r.sends_to, ["mesh/echo", "other/shadow"]);
}

#[test]
fn gateway_resilience_errors_name_the_field() {
    let e = Severity::Error;
    let check = |rule: Value, field: &str, says: &str| {
        let (kind, spec) = http_route(rule);
        has(kind, spec, e, field, says);
    };
    let p = "spec.rules[0]";
    check(
        json!({"timeouts": {"request": "1s", "backendRequest": "2s"}}),
        &format!("{p}.timeouts.backendRequest"),
        "longer",
    );
    check(
        json!({"timeouts": {"request": "soon"}}),
        &format!("{p}.timeouts.request"),
        "not a duration",
    );
    let m = format!("{p}.filters[0].requestMirror");
    check(
        json!({"filters": [mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}, "percent": 5, "fraction": {"numerator": 1}}))]}),
        &m,
        "exclude",
    );
    check(
        json!({"filters": [mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}, "fraction": {"numerator": 3, "denominator": 2}}))]}),
        &format!("{m}.fraction"),
        "numerator",
    );
    check(
        json!({"filters": [mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}, "percent": 101}))]}),
        &format!("{m}.percent"),
        "between 0 and 100",
    );
    check(
        json!({"filters": [mirror_filter(json!({"backendRef": {"name": "shadow"}}))]}),
        &format!("{m}.backendRef.port"),
        "port",
    );
    check(
        json!({"filters": [{"type": "RequestMirror"}]}),
        &m,
        "set it",
    );
    // A mirror to a Service that does not exist is a Warning: nothing is mirrored.
    let (t, d) = build(&[http_route(json!({"filters": [
        mirror_filter(json!({"backendRef": {"name": "gone", "port": 80}}))]}))]);
    assert!(
        d.iter()
            .any(|d| d.severity == Severity::Warning && d.field == format!("{m}.backendRef")),
        "{d:?}"
    );
    assert!(policy(&t).mirrors.is_empty());
    // What stays unimplemented is reported.
    let u = Severity::Unsupported;
    let (kind, spec) = http_route(json!({"retry": {"attempts": 3}}));
    has(kind, spec, u, &format!("{p}.retry"), "default retries");
    let (kind, spec) = http_route(
        json!({"backendRefs": [{"name": "echo", "port": 80, "filters": [
        mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}}))]}]}),
    );
    has(
        kind,
        spec,
        u,
        &format!("{p}.backendRefs[0].filters[0].requestMirror"),
        "on the rule",
    );
    let (kind, spec) = http_route(
        json!({"timeouts": {"request": "2s", "backendRequest": "1s"},
        "filters": [mirror_filter(json!({"backendRef": {"name": "shadow", "port": 80}, "percent": 10}))]}),
    );
    assert_eq!(diags(kind, spec), vec![]);
}

fn dr(spec: Value) -> (&'static str, Value) {
    ("DestinationRule", spec)
}

#[test]
fn destination_rule_pools_and_outlier_detection() {
    let t = table(&[dr(json!({"host": "echo", "trafficPolicy": {
        "connectionPool": {
            "tcp": {"maxConnections": 3, "connectTimeout": "250ms", "idleTimeout": "30s"},
            "http": {"http1MaxPendingRequests": 2, "http2MaxRequests": 7, "maxRequestsPerConnection": 1,
                     "maxRetries": 4, "idleTimeout": "5s"}},
        "outlierDetection": {"consecutive5xxErrors": 2, "consecutiveGatewayErrors": 1, "interval": "1s",
                             "baseEjectionTime": "15s", "maxEjectionPercent": 50, "minHealthPercent": 20}}}))]);
    let p = t.destination_policy("mesh/echo", 80, None);
    assert_eq!(
        p.pool,
        ConnectionPool {
            max_connections: 3,
            connect_timeout: ms(250),
            tcp_idle_timeout: Duration::from_secs(30),
            max_pending_requests: 2,
            max_requests: 7,
            max_requests_per_connection: 1,
            max_retries: 4,
            http_idle_timeout: Some(Duration::from_secs(5)),
        }
    );
    assert_eq!(
        p.outlier,
        Some(OutlierDetection {
            consecutive_5xx: 2,
            consecutive_gateway: 1,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(15),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            min_health_percent: 20,
        })
    );
    // No DestinationRule: Istio's defaults, no outlier detection.
    assert_eq!(
        *t.destination_policy("mesh/shadow", 80, None),
        DestinationPolicy::default()
    );
    assert_eq!(DestinationPolicy::default().outlier, None);
    assert_eq!(DestinationPolicy::default().pool.max_requests, u32::MAX);
}

#[test]
fn unset_and_zero_fields_keep_istios_defaults() {
    let t = table(&[dr(json!({"host": "echo", "trafficPolicy": {
        "connectionPool": {"http": {"http2MaxRequests": 0}, "tcp": {}},
        "outlierDetection": {"maxEjectionPercent": 0}}}))]);
    let p = t.destination_policy("mesh/echo", 80, None);
    assert_eq!(p.pool, ConnectionPool::default());
    assert_eq!(p.outlier, Some(OutlierDetection::default()));
    assert_eq!(OutlierDetection::default().consecutive_5xx, 5);
    // The deprecated consecutiveErrors counts gateway errors only (Istio).
    let t = table(&[dr(json!({"host": "echo", "trafficPolicy": {
        "outlierDetection": {"consecutiveErrors": 3}}}))]);
    let o = t.destination_policy("mesh/echo", 80, None).outlier.clone();
    assert_eq!(
        o.map(|o| (o.consecutive_5xx, o.consecutive_gateway)),
        Some((0, 3))
    );
}

#[test]
fn levels_replace_whole_fields_in_istios_order() {
    let pool = |n: u32| json!({"http": {"http2MaxRequests": n}});
    let t = table(&[dr(json!({"host": "echo",
        "trafficPolicy": {"connectionPool": pool(1), "outlierDetection": {"consecutive5xxErrors": 1},
            "portLevelSettings": [{"port": {"number": 8080}, "connectionPool": {"tcp": {"maxConnections": 9}}}]},
        "subsets": [
            {"name": "v1", "labels": {"v": "1"}},
            {"name": "v2", "labels": {"v": "2"}, "trafficPolicy": {"connectionPool": pool(3),
                "portLevelSettings": [{"port": {"number": 80}, "outlierDetection": {"consecutive5xxErrors": 4}}]}}]}))]);
    let at = |port, subset| {
        let p = t.destination_policy("mesh/echo", port, subset);
        (
            p.pool.max_requests,
            p.pool.max_connections,
            p.outlier.as_ref().map(|o| o.consecutive_5xx),
        )
    };
    let max = u32::MAX;
    // trafficPolicy.
    assert_eq!(at(80, None), (1, max, Some(1)));
    // A port entry replaces the top level whole: its pool, and no outlier detection since it
    // sets none ("replace, not merge").
    assert_eq!(at(8080, None), (max, 9, None));
    // A subset without its own policy inherits the top level, port entry included.
    assert_eq!(at(8080, Some("v1")), (max, 9, None));
    assert_eq!(at(80, Some("v1")), (1, max, Some(1)));
    // The subset's pool beats the top level's port entry; the subset's port entry replaces
    // both fields (its pool unset: the default).
    assert_eq!(at(8080, Some("v2")), (3, max, None));
    assert_eq!(at(80, Some("v2")), (max, max, Some(4)));
    // An unknown subset falls back to the top level.
    assert_eq!(at(80, Some("nope")), (1, max, Some(1)));
}

#[test]
fn destination_rule_errors_name_the_field() {
    let e = Severity::Error;
    let check = |tp: Value, field: &str, says: &str| {
        has(
            "DestinationRule",
            json!({"host": "echo", "trafficPolicy": tp}),
            e,
            field,
            says,
        );
    };
    let p = "spec.trafficPolicy";
    check(
        json!({"connectionPool": {"http": {"http2MaxRequests": -1}}}),
        &format!("{p}.connectionPool.http.http2MaxRequests"),
        "negative",
    );
    check(
        json!({"connectionPool": {"tcp": {"maxConnections": -5}}}),
        &format!("{p}.connectionPool.tcp.maxConnections"),
        "negative",
    );
    check(
        json!({"connectionPool": {"tcp": {"connectTimeout": "0s"}}}),
        &format!("{p}.connectionPool.tcp.connectTimeout"),
        "at least 1ms",
    );
    check(
        json!({"connectionPool": {"http": {"idleTimeout": "forever"}}}),
        &format!("{p}.connectionPool.http.idleTimeout"),
        "duration",
    );
    check(
        json!({"outlierDetection": {"maxEjectionPercent": 101}}),
        &format!("{p}.outlierDetection.maxEjectionPercent"),
        "0 to 100",
    );
    check(
        json!({"outlierDetection": {"minHealthPercent": -1}}),
        &format!("{p}.outlierDetection.minHealthPercent"),
        "0 to 100",
    );
    check(
        json!({"outlierDetection": {"interval": "-1s"}}),
        &format!("{p}.outlierDetection.interval"),
        "duration",
    );
    check(
        json!({"outlierDetection": {"consecutive5xxErrors": -1}}),
        &format!("{p}.outlierDetection.consecutive5xxErrors"),
        "between 0 and",
    );
    check(
        json!({"portLevelSettings": [{"port": {"number": 80}, "outlierDetection": {"baseEjectionTime": "x"}}]}),
        &format!("{p}.portLevelSettings[0].outlierDetection.baseEjectionTime"),
        "duration",
    );
    has(
        "DestinationRule",
        json!({"host": "echo", "subsets": [{"name": "a", "trafficPolicy": {"connectionPool": {"http": {"maxRetries": -2}}}}]}),
        e,
        "spec.subsets[0].trafficPolicy.connectionPool.http.maxRetries",
        "negative",
    );
    has(
        "DestinationRule",
        json!({"host": "echo", "trafficPolicy": {"connectionPool": {}}}),
        Severity::Warning,
        "spec.trafficPolicy.connectionPool",
        "neither tcp nor http",
    );
    // Implemented fields are clean; the rest is reported.
    assert_eq!(
        diags(
            "DestinationRule",
            json!({"host": "echo", "trafficPolicy": {
            "connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http2MaxRequests": 1, "maxRetries": 0}},
            "outlierDetection": {"consecutive5xxErrors": 0, "interval": "5s"}}})
        ),
        vec![]
    );
    let u = Severity::Unsupported;
    let spec = json!({"host": "echo", "trafficPolicy": {
        "connectionPool": {"tcp": {"tcpKeepalive": {"time": "1s"}}, "http": {"h2UpgradePolicy": "UPGRADE"}},
        "outlierDetection": {"splitExternalLocalOriginErrors": true}, "retryBudget": {}}});
    has(
        "DestinationRule",
        spec.clone(),
        u,
        &format!("{p}.connectionPool.tcp.tcpKeepalive"),
        "keepalive",
    );
    has(
        "DestinationRule",
        spec.clone(),
        u,
        &format!("{p}.connectionPool.http.h2UpgradePolicy"),
        "no effect",
    );
    has(
        "DestinationRule",
        spec.clone(),
        u,
        &format!("{p}.outlierDetection.splitExternalLocalOriginErrors"),
        "no effect",
    );
    has(
        "DestinationRule",
        spec,
        u,
        &format!("{p}.retryBudget"),
        "no effect",
    );
}

#[test]
fn retries_to_a_hashing_destination_may_reuse_the_host() {
    // Istio drops the previous-hosts predicate when the destination uses consistentHash.
    let hashing = dr(json!({"host": "echo", "trafficPolicy": {
        "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}},
        "portLevelSettings": [{"port": {"number": 8080}, "loadBalancer": {"simple": "ROUND_ROBIN"}}]}}));
    let t = table(std::slice::from_ref(&hashing));
    assert!(!policy_at(&t, 80, "/").retry.avoid_previous_hosts);
    assert!(policy_at(&t, 8080, "/").retry.avoid_previous_hosts);
    let t = table(&[hashing, vs(json!({"retries": {"attempts": 3}}))]);
    let p = policy_at(&t, 80, "/");
    assert_eq!((p.retry.attempts, p.retry.avoid_previous_hosts), (3, false));
    assert!(policy_at(&t, 8080, "/").retry.avoid_previous_hosts);
}

#[test]
fn what_a_fault_turns_off_is_said_and_grpcroute_timeouts_stay_reported() {
    let (kind, spec) = vs(json!({"timeout": "1s",
        "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 1}}}}));
    has(
        kind,
        spec,
        Severity::Warning,
        "spec.http[0].fault",
        "no timeout and no retries",
    );
    // GRPCRoute (v1) has no timeouts field: it is reported, not applied.
    let spec = json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
        "rules": [{"timeouts": {"request": "1s"}, "backendRefs": [{"name": "echo", "port": 80}]}]});
    has(
        "GRPCRoute",
        spec,
        Severity::Unsupported,
        "spec.rules[0].timeouts",
        "unknown field",
    );
}
