//! The `meshctl waypoint` commands, as `istioctl waypoint` behaves: a waypoint is a Gateway of
//! class `istio-waypoint` with one `mesh` listener (15008, HBONE); `--for` labels what traffic
//! it takes; `--enroll-namespace` labels the namespace `istio.io/use-waypoint`. Deleting a
//! waypoint leaves enrollment labels alone (istioctl does too). A namespace that is not in the
//! ambient mesh gets a warning, not an error, as in istioctl: the waypoint is still valid.
//! Owns what the commands do and print; objects are read and written only through [`Backend`].

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::{Applied, Backend, BackendError, Kind, name_of, namespace_of, str_at};
use crate::cli::{ApplyArgs, DeleteArgs, ListArgs, StatusArgs, WaitArgs, Waypoint};

pub const WAYPOINT_CLASS: &str = "istio-waypoint";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(
        "namespace {namespace} is already enrolled in waypoint {current} (label {USE_WAYPOINT}={current}); pass --overwrite to enroll it in {wanted} instead"
    )]
    Enrolled {
        namespace: String,
        current: String,
        wanted: String,
    },
    #[error(
        "no waypoint {name} in namespace {namespace} (see `meshctl waypoint list -n {namespace}`)"
    )]
    NotFound { namespace: String, name: String },
    #[error(
        "Gateway {namespace}/{name} is not a waypoint (gatewayClassName {class:?}); meshctl leaves it alone: choose another --name"
    )]
    NotWaypoint {
        namespace: String,
        name: String,
        class: String,
    },
    #[error(
        "waypoint {namespace}/{name} not programmed after {waited:?}: {state}; see `meshctl waypoint status -n {namespace} --name {name}` and meshd's log"
    )]
    Timeout {
        namespace: String,
        name: String,
        waited: Duration,
        state: String,
    },
    #[error("{failed} of {total} waypoints not deleted (errors above)")]
    Incomplete { failed: usize, total: usize },
}

pub fn run(backend: &dyn Backend, command: &Waypoint) -> Result<(), CommandError> {
    match command {
        Waypoint::Apply(a) => apply(backend, a),
        Waypoint::List(a) => list(backend, a),
        Waypoint::Delete(a) => delete(backend, a),
        Waypoint::Status(a) => status(backend, a),
    }
}

fn apply(backend: &dyn Backend, args: &ApplyArgs) -> Result<(), CommandError> {
    let ns = &args.namespace;
    let namespace = existing_namespace(backend, ns)?;
    let labels = namespace.pointer("/metadata/labels");
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    // Every refusal comes before the first write, so a refused apply changes nothing.
    let enrolled = label(USE_WAYPOINT);
    if args.enroll_namespace
        && let Some(current) = enrolled.filter(|c| *c != args.name && !args.overwrite)
    {
        return Err(CommandError::Enrolled {
            namespace: ns.clone(),
            current: current.to_string(),
            wanted: args.name.clone(),
        });
    }
    let existing = backend.get(Kind::Gateway, ns, &args.name)?;
    if let Some(gw) = &existing {
        check_waypoint(gw, ns, &args.name)?;
    }
    let gateway = gateway(existing, ns, &args.name, args.traffic.map(|t| t.label()));
    let done = match backend.apply(&gateway)? {
        Applied::Created => "created",
        Applied::Updated => "updated",
        Applied::Unchanged => "unchanged",
    };
    println!("waypoint {ns}/{} {done}", args.name);
    if args.enroll_namespace {
        if enrolled == Some(args.name.as_str()) {
            println!("namespace {ns} already enrolled in waypoint {}", args.name);
        } else {
            backend.set_namespace_label(ns, USE_WAYPOINT, &args.name)?;
            println!(
                "namespace {ns} labeled with \"{USE_WAYPOINT}: {}\"",
                args.name
            );
        }
        if label(DATAPLANE_MODE) != Some("ambient") {
            let place = backend
                .origin(Kind::Namespace, "", ns)
                .map_or_else(String::new, |f| format!(" (declared in {f})"));
            eprintln!(
                "warning: namespace {ns} is not in the ambient mesh, so its traffic does not reach the waypoint: add the label {DATAPLANE_MODE}: ambient to the Namespace{place}"
            );
        }
    }
    if args.wait.wait {
        wait_programmed(backend, ns, &args.name, &args.wait)?;
        println!("waypoint {ns}/{} programmed", args.name);
    }
    Ok(())
}

/// The Gateway `apply` writes: the existing one (its other labels, annotations and spec fields
/// kept) with class, listener and `waypoint-for` label as the flags say.
fn gateway(existing: Option<Value>, ns: &str, name: &str, traffic: Option<&str>) -> Value {
    let mut gw = existing.unwrap_or_else(|| json!({}));
    if !gw.is_object() {
        gw = json!({});
    }
    gw["apiVersion"] = json!(Kind::Gateway.api_version());
    gw["kind"] = json!(Kind::Gateway.name());
    if !gw["metadata"].is_object() {
        gw["metadata"] = json!({});
    }
    gw["metadata"]["name"] = json!(name);
    gw["metadata"]["namespace"] = json!(ns);
    let mut labels = gw["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    match traffic {
        Some(t) => labels.insert(WAYPOINT_FOR.to_string(), json!(t)),
        None => labels.remove(WAYPOINT_FOR),
    };
    if labels.is_empty() {
        gw["metadata"].as_object_mut().map(|m| m.remove("labels"));
    } else {
        gw["metadata"]["labels"] = json!(labels);
    }
    if !gw["spec"].is_object() {
        gw["spec"] = json!({});
    }
    gw["spec"]["gatewayClassName"] = json!(WAYPOINT_CLASS);
    gw["spec"]["listeners"] = json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}]);
    gw
}

fn list(backend: &dyn Backend, args: &ListArgs) -> Result<(), CommandError> {
    if let Some(ns) = &args.namespace {
        existing_namespace(backend, ns)?;
    }
    let waypoints: Vec<Value> = backend
        .list(Kind::Gateway, args.namespace.as_deref())?
        .into_iter()
        .filter(is_waypoint)
        .collect();
    if waypoints.is_empty() {
        match &args.namespace {
            Some(ns) => eprintln!("no waypoints in namespace {ns}"),
            None => eprintln!("no waypoints"),
        }
        return Ok(());
    }
    let mut rows = vec![
        ["NAMESPACE", "NAME", "FOR", "STATUS"]
            .map(String::from)
            .to_vec(),
    ];
    for gw in &waypoints {
        let (ns, name) = (namespace_of(gw), name_of(gw).unwrap_or_default());
        let traffic = str_at(gw, &["metadata", "labels", WAYPOINT_FOR]).unwrap_or("service");
        let state = match backend.status(Kind::Gateway, ns, name) {
            Ok(status) => summary(status.as_ref()),
            Err(BackendError::NoStatusSource) => "Unknown (no --status-dir)".to_string(),
            Err(e) => return Err(e.into()),
        };
        rows.push(vec![
            ns.to_string(),
            name.to_string(),
            traffic.to_string(),
            state,
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn delete(backend: &dyn Backend, args: &DeleteArgs) -> Result<(), CommandError> {
    let ns = &args.namespace;
    existing_namespace(backend, ns)?;
    let names: Vec<String> = if args.all {
        let all = backend.list(Kind::Gateway, Some(ns))?;
        let names: Vec<String> = all
            .iter()
            .filter(|g| is_waypoint(g))
            .filter_map(|g| name_of(g).map(str::to_string))
            .collect();
        if names.is_empty() {
            eprintln!("no waypoints in namespace {ns}");
        }
        names
    } else if args.names.is_empty() {
        vec!["waypoint".to_string()]
    } else {
        args.names.clone()
    };
    let mut failed = 0;
    for name in &names {
        let result = match backend.get(Kind::Gateway, ns, name)? {
            None => Err(CommandError::NotFound {
                namespace: ns.clone(),
                name: name.clone(),
            }),
            Some(gw) => check_waypoint(&gw, ns, name)
                .and_then(|()| Ok(backend.delete(Kind::Gateway, ns, name)?)),
        };
        match result {
            Ok(_) => println!("waypoint {ns}/{name} deleted"),
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    match failed {
        0 => Ok(()),
        _ => Err(CommandError::Incomplete {
            failed,
            total: names.len(),
        }),
    }
}

fn status(backend: &dyn Backend, args: &StatusArgs) -> Result<(), CommandError> {
    let (ns, name) = (&args.namespace, &args.name);
    existing_namespace(backend, ns)?;
    match backend.get(Kind::Gateway, ns, name)? {
        None => {
            return Err(CommandError::NotFound {
                namespace: ns.clone(),
                name: name.clone(),
            });
        }
        Some(gw) => check_waypoint(&gw, ns, name)?,
    }
    if args.wait.wait {
        wait_programmed(backend, ns, name, &args.wait)?;
    }
    let Some(status) = backend.status(Kind::Gateway, ns, name)? else {
        println!("waypoint {ns}/{name}: meshd has not reported status yet");
        return Ok(());
    };
    let mut rows = vec![
        [
            "NAMESPACE",
            "NAME",
            "CONDITION",
            "STATUS",
            "REASON",
            "MESSAGE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in conditions(&status) {
        rows.push(vec![
            ns.clone(),
            name.clone(),
            c.kind,
            c.status,
            c.reason,
            c.message,
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// Polls the reported status until Programmed is True or `wait.timeout` passes.
fn wait_programmed(
    backend: &dyn Backend,
    ns: &str,
    name: &str,
    wait: &WaitArgs,
) -> Result<(), CommandError> {
    let deadline = Instant::now() + wait.timeout;
    loop {
        let status = backend.status(Kind::Gateway, ns, name)?;
        let programmed = status.as_ref().map(conditions).unwrap_or_default();
        if programmed
            .iter()
            .any(|c| c.kind == "Programmed" && c.status == "True")
        {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CommandError::Timeout {
                namespace: ns.to_string(),
                name: name.to_string(),
                waited: wait.timeout,
                state: summary(status.as_ref()),
            });
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(200)));
    }
}

fn existing_namespace(backend: &dyn Backend, ns: &str) -> Result<Value, CommandError> {
    backend.get(Kind::Namespace, "", ns)?.ok_or_else(|| {
        BackendError::NoNamespace {
            namespace: ns.to_string(),
            place: backend.describe(),
        }
        .into()
    })
}

fn is_waypoint(gw: &Value) -> bool {
    str_at(gw, &["spec", "gatewayClassName"]) == Some(WAYPOINT_CLASS)
}

fn check_waypoint(gw: &Value, ns: &str, name: &str) -> Result<(), CommandError> {
    match is_waypoint(gw) {
        true => Ok(()),
        false => Err(CommandError::NotWaypoint {
            namespace: ns.to_string(),
            name: name.to_string(),
            class: str_at(gw, &["spec", "gatewayClassName"])
                .unwrap_or_default()
                .to_string(),
        }),
    }
}

struct Condition {
    kind: String,
    status: String,
    reason: String,
    message: String,
}

fn conditions(status: &Value) -> Vec<Condition> {
    let field = |c: &Value, k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    status
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| Condition {
                    kind: field(c, "type"),
                    status: field(c, "status"),
                    reason: field(c, "reason"),
                    message: field(c, "message"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One word for a waypoint's state: Programmed, or the first condition that is not True.
fn summary(status: Option<&Value>) -> String {
    let Some(status) = status else {
        return "Unknown (no status from meshd yet)".to_string();
    };
    let cs = conditions(status);
    for kind in ["Accepted", "Programmed"] {
        match cs.iter().find(|c| c.kind == kind) {
            Some(c) if c.status == "True" => {}
            Some(c) => return format!("Not{kind} ({})", c.reason),
            None => return format!("Unknown (no {kind} condition)"),
        }
    }
    "Programmed".to_string()
}

pub fn print_table(rows: &[Vec<String>]) {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}
