//! Unit tests of server-side apply and managedFields bookkeeping.

use super::*;

const T0: &str = "2026-01-01T00:00:00Z";
const T1: &str = "2026-01-01T00:01:00Z";

fn managed(obj: &Value) -> Vec<(String, String, Value)> {
    obj["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            assert_eq!(e["fieldsType"], "FieldsV1");
            (
                e["manager"].as_str().unwrap_or("").to_string(),
                e["operation"].as_str().unwrap_or("").to_string(),
                e["fieldsV1"].clone(),
            )
        })
        .collect()
}

fn deployment() -> Value {
    json!({"apiVersion":"apps/v1","kind":"Deployment",
           "metadata":{"name":"w","namespace":"ns","labels":{"app":"w"}},
           "spec":{"replicas":1,"template":{"spec":{"containers":[
               {"name":"proxy","image":"p:1","args":["a"],"ports":[{"containerPort":15008}]}]}}}})
}

#[test]
fn apply_creates_and_writes_managed_fields_as_the_api_does() {
    let obj = apply(None, &deployment(), "meshd", false, T0).unwrap();
    assert_eq!(obj["spec"], deployment()["spec"]);
    assert_eq!(obj["metadata"]["namespace"], "ns");
    let m = managed(&obj);
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].0.as_str(), m[0].1.as_str()), ("meshd", "Apply"));
    assert_eq!(
        m[0].2,
        json!({
            "f:metadata":{"f:labels":{".":{},"f:app":{}}},
            "f:spec":{"f:replicas":{},"f:template":{"f:spec":{"f:containers":{
                "k:{\"name\":\"proxy\"}":{".":{},"f:args":{},"f:image":{},"f:name":{},
                    "f:ports":{"k:{\"containerPort\":15008,\"protocol\":\"TCP\"}":
                        {".":{},"f:containerPort":{}}}}}}}}
        })
    );
    assert_eq!(obj["metadata"]["managedFields"][0]["time"], T0);
    assert_eq!(obj["metadata"]["managedFields"][0]["apiVersion"], "apps/v1");
}

#[test]
fn reapply_removes_what_the_manager_no_longer_applies_but_not_others_fields() {
    let live = apply(None, &deployment(), "meshd", false, T0).unwrap();
    // Someone else adds a label and a container.
    let other = json!({"apiVersion":"apps/v1","kind":"Deployment",
        "metadata":{"name":"w","namespace":"ns","labels":{"team":"x"}},
        "spec":{"template":{"spec":{"containers":[{"name":"debug","image":"d:1"}]}}}});
    let live = apply(Some(&live), &other, "human", false, T0).unwrap();
    let containers = &live["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers.as_array().map(Vec::len), Some(2));

    // meshd drops its label, replicas and its container's args.
    let mut cfg = deployment();
    cfg["metadata"]["labels"] = json!({"other":"y"});
    cfg["spec"].as_object_mut().unwrap().remove("replicas");
    cfg["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("args");
    let obj = apply(Some(&live), &cfg, "meshd", false, T1).unwrap();
    assert_eq!(obj["metadata"]["labels"], json!({"team":"x","other":"y"}));
    assert!(obj["spec"].get("replicas").is_none());
    let containers = &obj["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers[0]["name"], "proxy");
    assert!(containers[0].get("args").is_none());
    assert_eq!(containers[1], json!({"name":"debug","image":"d:1"}));

    // And dropping the container item removes it whole.
    cfg["spec"]["template"]["spec"]["containers"] = json!([]);
    let obj = apply(Some(&obj), &cfg, "meshd", false, T1).unwrap();
    assert_eq!(
        obj["spec"]["template"]["spec"]["containers"],
        json!([{"name":"debug","image":"d:1"}])
    );
}

#[test]
fn a_different_value_owned_by_another_manager_conflicts_unless_forced() {
    let cm = |v: &str| {
        json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},
               "data":{"k":v,"mine":"1"}})
    };
    let live = apply(None, &cm("1"), "a", false, T0).unwrap();
    let err = apply(Some(&live), &cm("2"), "b", false, T1).unwrap_err();
    assert_eq!(
        err,
        ApplyError::Conflict(vec![(".data.k".into(), "a".into())])
    );

    // The same value is shared, no conflict.
    let shared = apply(Some(&live), &cm("1"), "b", false, T1).unwrap();
    assert_eq!(managed(&shared).len(), 2);
    // a stops applying k: b still owns it, so it stays.
    let cfg = json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},
                     "data":{"mine":"1"}});
    let kept = apply(Some(&shared), &cfg, "a", false, T1).unwrap();
    assert_eq!(kept["data"], json!({"k":"1","mine":"1"}));
    // b stops too: now nobody owns it, and it goes.
    let cfg = json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}});
    let gone = apply(Some(&kept), &cfg, "b", false, T1).unwrap();
    assert_eq!(gone["data"], json!({"mine":"1"}));

    // Forced: b takes .data.k; a keeps .data.mine only.
    let forced = apply(Some(&live), &cm("2"), "b", true, T1).unwrap();
    assert_eq!(forced["data"]["k"], "2");
    let m = managed(&forced);
    assert_eq!(m[0].0, "a");
    assert_eq!(m[0].2, json!({"f:data":{".":{},"f:mine":{}}}));
    assert_eq!(m[1].0, "b");
    // a re-applying its old value now conflicts with b.
    let err = apply(Some(&forced), &cm("1"), "a", false, T1).unwrap_err();
    assert_eq!(
        err,
        ApplyError::Conflict(vec![(".data.k".into(), "b".into())])
    );
}

#[test]
fn list_map_items_conflict_by_key_path() {
    let pod = |image: &str| {
        json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},
               "spec":{"containers":[{"name":"app","image":image}]}})
    };
    let live = apply(None, &pod("a:1"), "a", false, T0).unwrap();
    let err = apply(Some(&live), &pod("a:2"), "b", false, T1).unwrap_err();
    assert_eq!(
        err,
        ApplyError::Conflict(vec![(
            ".spec.containers[name=\"app\"].image".into(),
            "a".into()
        )])
    );
}

#[test]
fn updates_are_recorded_and_move_ownership() {
    let mut created = json!({"apiVersion":"v1","kind":"ConfigMap",
        "metadata":{"name":"c","labels":{"x":"1"}},"data":{"k":"1","j":"1"}});
    record_update(None, &mut created, "kubectl-create", T0);
    let m = managed(&created);
    assert_eq!(m[0].0, "kubectl-create");
    assert_eq!(m[0].1, "Update");
    assert_eq!(
        m[0].2,
        json!({"f:data":{".":{},"f:j":{},"f:k":{}},"f:metadata":{"f:labels":{".":{},"f:x":{}}}})
    );

    // An apply of a different value conflicts with the Update owner.
    let cfg = json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},
                     "data":{"k":"2"}});
    let err = apply(Some(&created), &cfg, "ssa", false, T1).unwrap_err();
    assert_eq!(
        err,
        ApplyError::Conflict(vec![(".data.k".into(), "kubectl-create".into())])
    );

    // Another writer changes k and deletes j: k moves to it, j leaves every entry.
    let mut edited = created.clone();
    edited["data"] = json!({"k":"3"});
    record_update(Some(&created), &mut edited, "editor", T1);
    let m = managed(&edited);
    assert_eq!(
        m[0].2,
        json!({"f:data":{},"f:metadata":{"f:labels":{".":{},"f:x":{}}}})
    );
    assert_eq!((m[1].0.as_str(), m[1].1.as_str()), ("editor", "Update"));
    assert_eq!(m[1].2, json!({"f:data":{"f:k":{}}}));
    assert_eq!(edited["metadata"]["managedFields"][1]["time"], T1);

    // A write that changes nothing adds no entry.
    let mut same = edited.clone();
    record_update(Some(&edited), &mut same, "noop", T1);
    assert_eq!(managed(&same).len(), 2);
}

#[test]
fn entries_left_without_fields_are_dropped() {
    let mut a = json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},
                       "data":{"k":"1"}});
    record_update(None, &mut a, "first", T0);
    let mut b = a.clone();
    b["data"]["k"] = json!("2");
    record_update(Some(&a), &mut b, "second", T1);
    let m = managed(&b);
    // "first" keeps the data map itself; the leaf moved.
    assert_eq!(m[0].2, json!({"f:data":{}}));
    let mut c = b.clone();
    c.as_object_mut().unwrap().remove("data");
    record_update(Some(&b), &mut c, "third", T1);
    assert!(c["metadata"].get("managedFields").is_none(), "{c}");
}

#[test]
fn invalid_configurations_and_hostile_managed_fields() {
    for bad in [
        json!([1]),
        json!({"kind":"ConfigMap","metadata":{"name":"c"}}),
        json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{}}),
    ] {
        assert!(matches!(
            apply(None, &bad, "m", false, T0),
            Err(ApplyError::Invalid(_))
        ));
    }
    let cfg = json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}});
    assert!(matches!(
        apply(None, &cfg, "", false, T0),
        Err(ApplyError::Invalid(_))
    ));
    let live = json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c",
        "managedFields":[{"manager":"x","operation":"Apply","fieldsV1":
            {"f:data":5,"k:notjson":{},"v:\"a\"":{},"f:x":{"k:{\"name\":1}":{"f:y":[]}}}},
            "garbage", {"fieldsV1": null}]},
        "data":{"k":"1"}});
    let obj = apply(Some(&live), &cfg, "m", false, T0).unwrap();
    assert_eq!(obj["data"]["k"], "1");
}
