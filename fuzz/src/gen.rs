//! Mesh-shaped inputs from fuzzer bytes. Values come from small pools (a few namespaces,
//! labels, identities, addresses) so that generated policies, workloads and connections meet:
//! uniformly random strings would almost never select the workload they are checked against.

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use meshcore::Identity;
use meshcore::policy::Connection;
use meshcore::proto::config::{
    ConfigUpdate, Endpoint, Policy, Service, ServicePort, TrustBundle, Workload,
};
use serde_json::{Map, Value, json};

pub const NAMESPACES: &[&str] = &["istio-system", "shop", "billing", ""];
const SERVICE_ACCOUNTS: &[&str] = &["frontend", "payments", "default"];
const LABEL_KEYS: &[&str] = &["app", "tier"];
const LABEL_VALUES: &[&str] = &["payments", "frontend", "db"];
const TRUST_DOMAINS: &[&str] = &["cluster.local", "other.td"];
const IPS: &[&str] = &[
    "10.0.0.1",
    "10.0.0.2",
    "fd00::1",
    "::ffff:10.0.0.1",
    "10.0.0.x",
    "",
];
const PORTS: &[u16] = &[80, 8080, 9090, 0, 65535];

/// Strings Istio's matchers treat specially (exact, prefix, suffix, any) plus near misses.
const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/shop/sa/frontend",
    "cluster.local/ns/billing/*",
    "*/sa/payments",
    "*",
    "",
    "spiffe://cluster.local/ns/shop/sa/frontend",
    "*cluster.local*",
];
const IP_BLOCKS: &[&str] = &[
    "10.0.0.0/8",
    "10.0.0.1",
    "fd00::/64",
    "::ffff:10.0.0.0/104",
    "0.0.0.0/0",
    "10.0.0.1/33",
    "nonsense",
];
const PORT_STRINGS: &[&str] = &["8080", "9090", "80", "0", "65536", "http", "-1", ""];
const ACTIONS: &[&str] = &["ALLOW", "DENY", "AUDIT", "CUSTOM", "ALOW", ""];
const MTLS_MODES: &[&str] = &["STRICT", "PERMISSIVE", "DISABLE", "UNSET", "strict"];
const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "request.headers[x]",
    "unknown.key",
];
const L7_FIELDS: &[&str] = &["methods", "paths", "hosts", "notPorts"];

fn pick<'a>(u: &mut Unstructured<'_>, pool: &[&'a str]) -> Result<&'a str> {
    Ok(*u.choose(pool)?)
}

/// A list of 0..=max strings from `pool`.
fn strings(u: &mut Unstructured<'_>, pool: &[&str], max: u32) -> Result<Value> {
    let n = u.int_in_range(0..=max)?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Value::from(pick(u, pool)?));
    }
    Ok(Value::Array(out))
}

fn labels(u: &mut Unstructured<'_>) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for _ in 0..u.int_in_range(0..=2)? {
        m.insert(
            pick(u, LABEL_KEYS)?.to_string(),
            pick(u, LABEL_VALUES)?.into(),
        );
    }
    Ok(m)
}

fn selector(u: &mut Unstructured<'_>, spec: &mut Map<String, Value>) -> Result<()> {
    match u.int_in_range(0..=5)? {
        0 | 1 => {}
        2 => {
            spec.insert("selector".into(), json!({ "matchLabels": labels(u)? }));
        }
        3 => {
            spec.insert("selector".into(), json!({ "matchLabels": { "app": 7 } }));
        }
        4 => {
            spec.insert("selector".into(), json!({}));
        }
        _ => {
            spec.insert("selector".into(), json!({ "matchLabels": labels(u)? }));
        }
    }
    Ok(())
}

fn source(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut s = Map::new();
    let fields: &[(&str, &[&str])] = &[
        ("principals", PRINCIPALS),
        ("notPrincipals", PRINCIPALS),
        ("namespaces", NAMESPACES),
        ("notNamespaces", NAMESPACES),
        ("serviceAccounts", SERVICE_ACCOUNTS),
        ("notServiceAccounts", SERVICE_ACCOUNTS),
        ("ipBlocks", IP_BLOCKS),
        ("notIpBlocks", IP_BLOCKS),
        ("requestPrincipals", PRINCIPALS),
        ("remoteIpBlocks", IP_BLOCKS),
    ];
    for _ in 0..u.int_in_range(0..=3)? {
        let (name, pool) = *u.choose(fields)?;
        s.insert(name.into(), strings(u, pool, 2)?);
    }
    Ok(json!({ "source": s }))
}

fn operation(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut op = Map::new();
    if u.arbitrary()? {
        op.insert("ports".into(), strings(u, PORT_STRINGS, 2)?);
    }
    if u.ratio(1, 4)? {
        op.insert(pick(u, L7_FIELDS)?.into(), strings(u, PORT_STRINGS, 1)?);
    }
    Ok(json!({ "operation": op }))
}

fn condition(u: &mut Unstructured<'_>) -> Result<Value> {
    let key = pick(u, CONDITION_KEYS)?;
    let pool: &[&str] = match key {
        "source.ip" | "destination.ip" => IP_BLOCKS,
        "destination.port" => PORT_STRINGS,
        "source.namespace" => NAMESPACES,
        _ => PRINCIPALS,
    };
    let mut c = Map::new();
    c.insert("key".into(), key.into());
    if u.arbitrary()? {
        c.insert("values".into(), strings(u, pool, 2)?);
    } else {
        c.insert("notValues".into(), strings(u, pool, 2)?);
    }
    Ok(Value::Object(c))
}

fn rule(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut r = Map::new();
    if u.arbitrary()? {
        let mut from = Vec::new();
        for _ in 0..u.int_in_range(0..=2)? {
            from.push(source(u)?);
        }
        r.insert("from".into(), Value::Array(from));
    }
    if u.arbitrary()? {
        let mut to = Vec::new();
        for _ in 0..u.int_in_range(0..=2)? {
            to.push(operation(u)?);
        }
        r.insert("to".into(), Value::Array(to));
    }
    if u.ratio(1, 3)? {
        let mut when = Vec::new();
        for _ in 0..u.int_in_range(0..=2)? {
            when.push(condition(u)?);
        }
        r.insert("when".into(), Value::Array(when));
    }
    Ok(Value::Object(r))
}

/// An AuthorizationPolicy `spec`, mostly valid, sometimes not (unknown action, bad CIDR, L7
/// fields, targetRefs), as users write them.
pub fn authz_spec(u: &mut Unstructured<'_>, action: Option<&str>) -> Result<Value> {
    let mut spec = Map::new();
    selector(u, &mut spec)?;
    let action = match action {
        Some(a) => Some(a),
        None if u.arbitrary()? => Some(pick(u, ACTIONS)?),
        None => None,
    };
    if let Some(a) = action {
        spec.insert("action".into(), a.into());
        if a == "CUSTOM" && u.arbitrary()? {
            spec.insert("provider".into(), json!({ "name": "ext" }));
        }
    }
    if u.ratio(1, 12)? {
        spec.insert(
            "targetRefs".into(),
            json!([{ "kind": "Service", "name": "x" }]),
        );
    }
    if u.ratio(5, 6)? {
        let mut rules = Vec::new();
        for _ in 0..u.int_in_range(0..=3)? {
            rules.push(rule(u)?);
        }
        spec.insert("rules".into(), Value::Array(rules));
    }
    if u.ratio(1, 20)? {
        spec.insert("unknownField".into(), Value::Bool(true));
    }
    Ok(Value::Object(spec))
}

/// A PeerAuthentication `spec`.
pub fn peer_authn_spec(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut spec = Map::new();
    selector(u, &mut spec)?;
    if u.ratio(3, 4)? {
        spec.insert("mtls".into(), json!({ "mode": pick(u, MTLS_MODES)? }));
    }
    if u.ratio(1, 3)? {
        let port = pick(u, PORT_STRINGS)?;
        spec.insert(
            "portLevelMtls".into(),
            json!({ port: { "mode": pick(u, MTLS_MODES)? } }),
        );
    }
    Ok(Value::Object(spec))
}

pub fn policy(kind: &str, namespace: &str, name: &str, spec: &Value) -> Policy {
    Policy {
        key: format!("{kind}/{namespace}/{name}"),
        kind: kind.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        spec_json: spec.to_string(),
    }
}

/// A policy of any kind: a generated spec, or (sometimes) raw fuzzer text as the spec JSON.
pub fn any_policy(u: &mut Unstructured<'_>, n: usize) -> Result<Policy> {
    let namespace = pick(u, NAMESPACES)?;
    let name = format!("p{n}");
    Ok(match u.int_in_range(0..=9)? {
        0..=5 => policy(
            "AuthorizationPolicy",
            namespace,
            &name,
            &authz_spec(u, None)?,
        ),
        6..=7 => policy("PeerAuthentication", namespace, &name, &peer_authn_spec(u)?),
        8 => {
            let kind = pick(u, &["AuthorizationPolicy", "PeerAuthentication", "Sidecar"])?;
            let raw: String = u.arbitrary()?;
            Policy {
                key: format!("{kind}/{namespace}/{name}"),
                kind: kind.to_string(),
                namespace: namespace.to_string(),
                name,
                spec_json: raw,
            }
        }
        _ => policy("AuthorizationPolicy", namespace, &name, &json!({})),
    })
}

pub fn workload(u: &mut Unstructured<'_>, n: usize) -> Result<Workload> {
    let namespace = pick(u, NAMESPACES)?.to_string();
    let mut ips = Vec::new();
    for _ in 0..u.int_in_range(0..=2)? {
        ips.push(pick(u, IPS)?.to_string());
    }
    let labels = labels(u)?
        .into_iter()
        .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_string())))
        .collect();
    Ok(Workload {
        uid: format!("{namespace}/w{n}"),
        name: format!("w{n}"),
        namespace,
        service_account: pick(u, SERVICE_ACCOUNTS)?.to_string(),
        node: pick(u, &["node-0", "node-1"])?.to_string(),
        ips,
        labels,
        captured: u.arbitrary()?,
        netns: String::new(),
        trust_domain: pick(u, TRUST_DOMAINS)?.to_string(),
        annotations: Default::default(),
        ..Default::default()
    })
}

pub fn connection(u: &mut Unstructured<'_>) -> Result<Connection> {
    let src_identity = if u.ratio(3, 4)? {
        Some(Identity::new(
            pick(u, TRUST_DOMAINS)?,
            pick(u, NAMESPACES)?,
            pick(u, SERVICE_ACCOUNTS)?,
        ))
    } else {
        None
    };
    let ip = |u: &mut Unstructured<'_>| -> Result<std::net::IpAddr> {
        Ok(pick(u, IPS)?
            .parse()
            .unwrap_or(std::net::IpAddr::from([10, 9, 9, 9])))
    };
    Ok(Connection {
        src_identity: src_identity.map(std::sync::Arc::new),
        src_ip: ip(u)?,
        dst_ip: ip(u)?,
        dst_port: *u.choose(PORTS)?,
    })
}

/// One config-stream update over the same small key space, so that removals and upserts
/// hit existing entries.
pub fn config_update(u: &mut Unstructured<'_>) -> Result<ConfigUpdate> {
    let mut up = ConfigUpdate {
        version: u.arbitrary()?,
        snapshot: u.ratio(1, 4)?,
        ..Default::default()
    };
    for _ in 0..u.int_in_range(0..=3)? {
        let n = u.int_in_range(0..=4)?;
        up.workloads.push(workload(u, n)?);
    }
    for _ in 0..u.int_in_range(0..=2)? {
        let n: u8 = u.int_in_range(0..=3)?;
        let namespace = pick(u, NAMESPACES)?;
        let mut vips = Vec::new();
        for _ in 0..u.int_in_range(0..=2)? {
            vips.push(pick(u, IPS)?.to_string());
        }
        up.services.push(Service {
            key: format!("{namespace}/s{n}"),
            name: format!("s{n}"),
            namespace: namespace.to_string(),
            hostname: format!("s{n}.{namespace}.svc.cluster.local"),
            vips,
            ports: vec![ServicePort {
                port: u32::from(*u.choose(PORTS)?),
                target_port: u.arbitrary()?,
                name: String::new(),
                ..Default::default()
            }],
            endpoints: vec![Endpoint {
                workload_uid: format!("{namespace}/w{}", u.int_in_range(0..=4)?),
                ports: [(u.arbitrary()?, u.arbitrary()?)].into_iter().collect(),
            }],
            ..Default::default()
        });
    }
    for _ in 0..u.int_in_range(0..=2)? {
        let n = u.int_in_range(0..=3)?;
        up.policies.push(any_policy(u, n)?);
    }
    if u.ratio(1, 3)? {
        up.trust_bundle = Some(TrustBundle {
            trust_domain: pick(u, TRUST_DOMAINS)?.to_string(),
            roots_pem: vec![u.arbitrary()?],
        });
    }
    for _ in 0..u.int_in_range(0..=2)? {
        let ns = pick(u, NAMESPACES)?;
        match u.int_in_range(0..=2)? {
            0 => up
                .removed_workloads
                .push(format!("{ns}/w{}", u.int_in_range(0..=4)?)),
            1 => up
                .removed_services
                .push(format!("{ns}/s{}", u.int_in_range(0..=3)?)),
            _ => {
                let kind = pick(u, &["AuthorizationPolicy", "PeerAuthentication"])?;
                up.removed_policies
                    .push(format!("{kind}/{ns}/p{}", u.int_in_range(0..=3)?));
            }
        }
    }
    Ok(up)
}
