//! meshcore::route validation and references: every rule a user can break names the resource and
//! the field, with the severity meshd acts on (Error refuses the resource).

use meshcore::route::{Severity, validate};
use serde_json::{Value, json};

/// The (severity, field) pairs validate reports.
fn found(kind: &str, spec: Value) -> Vec<(Severity, String)> {
    validate(kind, "default", "r", &spec)
        .into_iter()
        .map(|d| (d.severity, d.field))
        .collect()
}

fn has(kind: &str, spec: Value, severity: Severity, field: &str) {
    let got = found(kind, spec);
    assert!(
        got.iter().any(|(s, f)| *s == severity && f == field),
        "expected {severity} at {field}, got {got:?}"
    );
}

fn clean(kind: &str, spec: Value) {
    assert_eq!(found(kind, spec), vec![], "expected no diagnostics");
}

fn vs_with_rule(rule: Value) -> Value {
    json!({"hosts": ["web"], "http": [rule]})
}

#[test]
fn valid_resources_have_no_diagnostics() {
    clean(
        "VirtualService",
        json!({"hosts": ["web", "web.default.svc.cluster.local"], "http": [
            {"name": "beta", "match": [{"headers": {"x-user-group": {"exact": "beta"}, "x-any": {}},
                "uri": {"prefix": "/api"}, "ignoreUriCase": true, "queryParams": {"q": {"regex": "a.*"}},
                "withoutHeaders": {"x-no": {}}, "port": 80, "method": {"exact": "GET"}}],
             "route": [{"destination": {"host": "web", "subset": "canary", "port": {"number": 80}}}],
             "rewrite": {"uri": "/v2"}, "headers": {"request": {"set": {"x-a": "1"}, "add": {"x-b": "2"}, "remove": ["x-c"]}}},
            {"route": [{"destination": {"host": "web", "subset": "stable"}, "weight": 90},
                       {"destination": {"host": "web", "subset": "canary"}, "weight": 10}]}],
          "tcp": [{"match": [{"port": 5432}], "route": [{"destination": {"host": "db"}}]}]}),
    );
    clean(
        "DestinationRule",
        json!({"host": "web", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"},
            "portLevelSettings": [{"port": {"number": 80}, "loadBalancer": {"consistentHash": {"httpCookie": {"name": "s", "ttl": "60s"}}}}]},
          "subsets": [{"name": "stable", "labels": {"version": "v1"}},
                      {"name": "canary", "labels": {"version": "v2"}, "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}]}),
    );
    clean(
        "HTTPRoute",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
          "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}, "method": "GET",
                        "headers": [{"name": "version", "value": "two"}], "queryParams": [{"type": "RegularExpression", "name": "a", "value": "b.*"}]}],
                     "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}},
                                 {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "X-A", "value": "1"}]}}],
                     "backendRefs": [{"name": "echo-v2", "port": 80, "weight": 3,
                        "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": ["x-b"]}}]}]}]}),
    );
    clean(
        "GRPCRoute",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 7070}],
          "rules": [{"matches": [{"method": {"service": "grpc.Echo", "method": "Say"}, "headers": [{"name": "x", "value": "y"}]}],
                     "backendRefs": [{"name": "echo-v1", "port": 7070}]}]}),
    );
}

#[test]
fn virtual_service_errors_name_the_field() {
    let vs = |rule| vs_with_rule(rule);
    let route = json!([{"destination": {"host": "web"}}]);
    has(
        "VirtualService",
        vs(json!({"match": [{"uri": {"regex": "(unclosed"}}], "route": route})),
        Severity::Error,
        "spec.http[0].match[0].uri.regex",
    );
    has(
        "VirtualService",
        vs(json!({"match": [{"headers": {"x": {"regex": "*"}}}], "route": route})),
        Severity::Error,
        "spec.http[0].match[0].headers.x.regex",
    );
    has(
        "VirtualService",
        vs(json!({"match": [{"uri": {"exact": "/a", "prefix": "/b"}}], "route": route})),
        Severity::Error,
        "spec.http[0].match[0].uri",
    );
    has(
        "VirtualService",
        vs(
            json!({"route": [{"destination": {"host": "a"}, "weight": 0}, {"destination": {"host": "b"}}]}),
        ),
        Severity::Error,
        "spec.http[0].route",
    );
    has(
        "VirtualService",
        vs(
            json!({"route": [{"destination": {"host": "a"}, "weight": -5}, {"destination": {"host": "b"}, "weight": 10}]}),
        ),
        Severity::Error,
        "spec.http[0].route[0].weight",
    );
    has(
        "VirtualService",
        vs(json!({"route": [{"destination": {"host": "a"}, "weight": 3_000_000_000u64}]})),
        Severity::Error,
        "spec.http[0].route[0].weight",
    );
    has(
        "VirtualService",
        vs(json!({"route": [{"destination": {"host": "a"}, "weight": "ten"}]})),
        Severity::Error,
        "spec.http[0].route[0].weight",
    );
    has(
        "VirtualService",
        vs(json!({"route": route, "redirect": {"uri": "/x"}})),
        Severity::Error,
        "spec.http[0]",
    );
    has(
        "VirtualService",
        vs(json!({"redirect": {"uri": "/x", "redirectCode": 399}})),
        Severity::Error,
        "spec.http[0].redirect.redirectCode",
    );
    has(
        "VirtualService",
        vs(json!({"redirect": {"uri": "/x"}, "rewrite": {"uri": "/y"}})),
        Severity::Error,
        "spec.http[0].rewrite",
    );
    has(
        "VirtualService",
        vs(json!({"directResponse": {"status": 700}})),
        Severity::Error,
        "spec.http[0].directResponse.status",
    );
    has(
        "VirtualService",
        vs(json!({"match": [{"port": 0}], "route": route})),
        Severity::Error,
        "spec.http[0].match[0].port",
    );
    has(
        "VirtualService",
        vs(json!({})),
        Severity::Error,
        "spec.http[0]",
    );
    has(
        "VirtualService",
        vs(
            json!({"route": route, "rewrite": {"uriRegexRewrite": {"match": "([", "rewrite": "x"}}}),
        ),
        Severity::Error,
        "spec.http[0].rewrite.uriRegexRewrite.match",
    );
    has(
        "VirtualService",
        vs(json!({"route": route, "headers": {"request": {"set": {"bad header": "x"}}}})),
        Severity::Error,
        "spec.http[0].headers.request.set.bad header",
    );
    has(
        "VirtualService",
        json!({"http": [{"route": route}]}),
        Severity::Error,
        "spec.hosts",
    );
    has(
        "VirtualService",
        json!({"hosts": "web"}),
        Severity::Error,
        "spec.hosts",
    );
}

#[test]
fn unsupported_and_unknown_fields_are_reported_not_ignored() {
    let rule = json!({"match": [{"sourceLabels": {"app": "x"}, "sourceNamespace": "a", "gateways": ["mesh"]}],
        "route": [{"destination": {"host": "web"}}, {"destination": {"host": "b", "foo": 1}, "weight": 1}],
        "retries": {"retryRemoteLocalities": true}, "fault": {"delay": {"exponentialDelay": "1s"}},
        "corsPolicy": {}});
    let got = found("VirtualService", vs_with_rule(rule));
    for field in [
        "spec.http[0].route[1].destination.foo",
        "spec.http[0].retries.retryRemoteLocalities",
        "spec.http[0].fault.delay.exponentialDelay",
        "spec.http[0].corsPolicy",
        "spec.http[0].match[0].sourceLabels",
        "spec.http[0].match[0].sourceNamespace",
        "spec.http[0].match[0].gateways",
    ] {
        assert!(
            got.contains(&(Severity::Unsupported, field.to_string())),
            "{field} not reported: {got:?}"
        );
    }
    has(
        "DestinationRule",
        json!({"host": "web", "trafficPolicy": {"retryBudget": {}, "tls": {}}}),
        Severity::Unsupported,
        "spec.trafficPolicy.retryBudget",
    );
    has(
        "HTTPRoute",
        json!({"parentRefs": [{"kind": "Service", "name": "e"}], "rules": [{"retry": {"attempts": 1}}]}),
        Severity::Unsupported,
        "spec.rules[0].retry",
    );
    has(
        "HTTPRoute",
        json!({"parentRefs": [{"kind": "Service", "name": "e"}], "rules": [{"backendRefs": [{"name": "e", "port": 80,
        "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "x", "port": 80}}}]}]}]}),
        Severity::Unsupported,
        "spec.rules[0].backendRefs[0].filters[0].requestMirror",
    );
    has(
        "HTTPRoute",
        json!({"parentRefs": [{"name": "gw"}]}),
        Severity::Unsupported,
        "spec.parentRefs[0]",
    );
}

#[test]
fn destination_rule_errors() {
    has(
        "DestinationRule",
        json!({"subsets": []}),
        Severity::Error,
        "spec.host",
    );
    has(
        "DestinationRule",
        json!({"host": "w", "subsets": [{"name": "a"}, {"name": "a"}]}),
        Severity::Error,
        "spec.subsets[1].name",
    );
    has(
        "DestinationRule",
        json!({"host": "w", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}}),
        Severity::Error,
        "spec.trafficPolicy.loadBalancer.simple",
    );
    has(
        "DestinationRule",
        json!({"host": "w", "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x", "useSourceIp": true}}}}),
        Severity::Error,
        "spec.trafficPolicy.loadBalancer.consistentHash",
    );
    has(
        "DestinationRule",
        json!({"host": "w", "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpCookie": {"name": "c", "ttl": "soon"}}}}}),
        Severity::Error,
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
    );
    has(
        "DestinationRule",
        json!({"host": "w", "trafficPolicy": {"portLevelSettings": [{"loadBalancer": {"simple": "RANDOM"}}]}}),
        Severity::Error,
        "spec.trafficPolicy.portLevelSettings[0].port",
    );
}

#[test]
fn gateway_route_errors() {
    let parent = json!([{"group": "", "kind": "Service", "name": "echo"}]);
    let rule = |r: Value| json!({"parentRefs": parent, "rules": [r]});
    has(
        "HTTPRoute",
        rule(json!({"matches": [{"path": {"type": "Glob", "value": "/x"}}]})),
        Severity::Error,
        "spec.rules[0].matches[0].path.type",
    );
    has(
        "HTTPRoute",
        rule(json!({"matches": [{"path": {"type": "Exact", "value": "x"}}]})),
        Severity::Error,
        "spec.rules[0].matches[0].path.value",
    );
    has(
        "HTTPRoute",
        rule(json!({"matches": [{"path": {"type": "RegularExpression", "value": "/(x"}}]})),
        Severity::Error,
        "spec.rules[0].matches[0].path.value",
    );
    has(
        "HTTPRoute",
        rule(
            json!({"matches": [{"headers": [{"type": "RegularExpression", "name": "h", "value": "["}]}]}),
        ),
        Severity::Error,
        "spec.rules[0].matches[0].headers[0].value",
    );
    has(
        "HTTPRoute",
        rule(json!({"matches": [{"method": "get"}]})),
        Severity::Error,
        "spec.rules[0].matches[0].method",
    );
    has(
        "HTTPRoute",
        rule(
            json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 305}}]}),
        ),
        Severity::Error,
        "spec.rules[0].filters[0].requestRedirect.statusCode",
    );
    has(
        "HTTPRoute",
        rule(
            json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {}}], "backendRefs": [{"name": "a", "port": 80}]}),
        ),
        Severity::Error,
        "spec.rules[0]",
    );
    has(
        "HTTPRoute",
        rule(
            json!({"matches": [{"path": {"type": "Exact", "value": "/a"}}],
        "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}}]}),
        ),
        Severity::Error,
        "spec.rules[0].matches",
    );
    has(
        "HTTPRoute",
        rule(json!({"filters": [{"type": "RequestHeaderModifier"}]})),
        Severity::Error,
        "spec.rules[0].filters[0].requestHeaderModifier",
    );
    has(
        "HTTPRoute",
        rule(json!({"backendRefs": [{"name": "a"}]})),
        Severity::Error,
        "spec.rules[0].backendRefs[0].port",
    );
    has(
        "HTTPRoute",
        rule(json!({"backendRefs": [{"name": "a", "port": 80, "weight": -1}]})),
        Severity::Error,
        "spec.rules[0].backendRefs[0].weight",
    );
    has(
        "GRPCRoute",
        rule(json!({"matches": [{"method": {"type": "Exact"}}]})),
        Severity::Error,
        "spec.rules[0].matches[0].method",
    );
    has(
        "GRPCRoute",
        rule(json!({"matches": [{"method": {"type": "RegularExpression", "service": "(("}}]})),
        Severity::Error,
        "spec.rules[0].matches[0].method.service",
    );
    has(
        "GRPCRoute",
        rule(json!({"filters": [{"type": "URLRewrite"}]})),
        Severity::Error,
        "spec.rules[0].filters[0].type",
    );
    has("Ingress", json!({}), Severity::Error, "kind");
}

#[test]
fn diagnostics_name_the_resource_and_say_what_to_fix() {
    let d = validate(
        "VirtualService",
        "shop",
        "web",
        &vs_with_rule(json!({"match": [{"uri": {"regex": "(x"}}],
        "route": [{"destination": {"host": "web"}}]})),
    );
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].resource, "VirtualService shop/web");
    assert!(
        d[0].message.contains("regular expression"),
        "{}",
        d[0].message
    );
    assert!(
        d[0].to_string()
            .starts_with("error VirtualService shop/web: spec.http[0].match[0].uri.regex: ")
    );
}
