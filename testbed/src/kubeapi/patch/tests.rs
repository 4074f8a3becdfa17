//! Unit tests of the three patch kinds.

use super::*;
use serde_json::json;

#[test]
fn merge_patch_follows_rfc7386_examples() {
    // RFC 7386 appendix A, a selection.
    let cases = [
        (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
        (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
        (json!({"a":"b"}), json!({"a":null}), json!({})),
        (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
        (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
        (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
        (
            json!({}),
            json!({"a":{"bb":{"ccc":null}}}),
            json!({"a":{"bb":{}}}),
        ),
        (json!({"a":"foo"}), json!("bar"), json!("bar")),
    ];
    for (mut t, p, want) in cases {
        merge(&mut t, &p);
        assert_eq!(t, want, "patch {p}");
    }
}

#[test]
fn json_patch_does_every_operation() {
    let mut doc = json!({"metadata":{"labels":{"a/b":"1","m~n":"2"}},"list":[1,2,3]});
    let ops = json!([
        {"op":"add","path":"/metadata/labels/new","value":"x"},
        {"op":"remove","path":"/metadata/labels/a~1b"},
        {"op":"replace","path":"/metadata/labels/m~0n","value":"3"},
        {"op":"add","path":"/list/-","value":4},
        {"op":"add","path":"/list/0","value":0},
        {"op":"move","from":"/list/1","path":"/first"},
        {"op":"copy","from":"/first","path":"/second"},
        {"op":"test","path":"/list","value":[0,2,3,4]},
    ]);
    json_patch(&mut doc, &ops).unwrap();
    assert_eq!(
        doc,
        json!({"metadata":{"labels":{"new":"x","m~n":"3"}},"list":[0,2,3,4],
               "first":1,"second":1})
    );
}

#[test]
fn json_patch_is_all_or_nothing() {
    let before = json!({"a":1,"l":[1]});
    let failing = [
        json!([{"op":"replace","path":"/a","value":2},{"op":"test","path":"/a","value":1}]),
        json!([{"op":"add","path":"/b","value":2},{"op":"remove","path":"/missing"}]),
        json!([{"op":"add","path":"/b","value":2},{"op":"add","path":"/l/5","value":1}]),
        json!([{"op":"add","path":"/b","value":2},{"op":"replace","path":"/l/01","value":1}]),
        json!([{"op":"add","path":"/b","value":2},{"op":"frobnicate","path":"/a"}]),
        json!([{"op":"move","from":"/l","path":"/l/0"}]),
        json!([{"op":"add","path":"a","value":1}]),
        json!({"op":"add"}),
    ];
    for ops in failing {
        let mut doc = before.clone();
        assert!(json_patch(&mut doc, &ops).is_err(), "{ops}");
        assert_eq!(doc, before, "{ops} left a half-applied document");
    }
    let mut doc = before.clone();
    let e = json_patch(&mut doc, &json!([{"op":"test","path":"/a","value":2}]));
    assert!(matches!(e, Err(PatchError::TestFailed(_))));
}

#[test]
fn strategic_merge_merges_list_maps_by_key() {
    let mut pod = json!({"spec":{"containers":[
        {"name":"app","image":"a:1","env":[{"name":"X","value":"1"}],
         "ports":[{"containerPort":80},{"containerPort":53,"protocol":"UDP"}]},
        {"name":"side","image":"s:1"}],
        "tolerations":[{"key":"a"}]},
        "metadata":{"finalizers":["f1"],"ownerReferences":[{"uid":"u1","name":"o"}]},
        "status":{"conditions":[{"type":"Ready","status":"False"},{"type":"Other","status":"True"}]}});
    let patch = json!({"spec":{"containers":[
        {"name":"app","image":"a:2","env":[{"name":"Y","value":"2"}],
         "ports":[{"containerPort":80,"name":"http"},{"containerPort":53,"protocol":"TCP"}]},
        {"name":"new","image":"n:1"}],
        "tolerations":[{"key":"b"}]},
        "metadata":{"finalizers":["f2"],"ownerReferences":[{"uid":"u1","controller":true}]},
        "status":{"conditions":[{"type":"Ready","status":"True"}]}});
    strategic_merge(&mut pod, &patch).unwrap();
    assert_eq!(
        pod,
        json!({"spec":{"containers":[
            {"name":"app","image":"a:2",
             "env":[{"name":"X","value":"1"},{"name":"Y","value":"2"}],
             "ports":[{"containerPort":80,"name":"http"},{"containerPort":53,"protocol":"UDP"},
                      {"containerPort":53,"protocol":"TCP"}]},
            {"name":"side","image":"s:1"},
            {"name":"new","image":"n:1"}],
            "tolerations":[{"key":"b"}]},
            "metadata":{"finalizers":["f1","f2"],
                        "ownerReferences":[{"uid":"u1","name":"o","controller":true}]},
            "status":{"conditions":[{"type":"Ready","status":"True"},{"type":"Other","status":"True"}]}})
    );
}

#[test]
fn strategic_merge_directives() {
    let mut obj = json!({"spec":{"containers":[{"name":"a"},{"name":"b"}],
                                 "selector":{"x":"1","y":"2"},"gone":{"k":1},
                                 "finalizers":["f1","f2"]}});
    let patch = json!({"spec":{
        "containers":[{"name":"a","$patch":"delete"}],
        "selector":{"$patch":"replace","z":"3"},
        "gone":{"$patch":"delete"},
        "$setElementOrder/containers":[{"name":"b"}],
        "$deleteFromPrimitiveList/finalizers":["f1"]}});
    strategic_merge(&mut obj, &patch).unwrap();
    assert_eq!(
        obj,
        json!({"spec":{"containers":[{"name":"b"}],"selector":{"z":"3"},"finalizers":["f2"]}})
    );

    let mut obj = json!({"spec":{"containers":[{"name":"a"},{"name":"b"}]}});
    let patch = json!({"spec":{"containers":[{"name":"c"},{"$patch":"replace"}]}});
    strategic_merge(&mut obj, &patch).unwrap();
    assert_eq!(obj, json!({"spec":{"containers":[{"name":"c"}]}}));

    let mut obj =
        json!({"spec":{"strategy":{"type":"RollingUpdate","rollingUpdate":{"maxSurge":1}}}});
    let patch = json!({"spec":{"strategy":{"$retainKeys":["type"],"type":"Recreate"}}});
    strategic_merge(&mut obj, &patch).unwrap();
    assert_eq!(obj, json!({"spec":{"strategy":{"type":"Recreate"}}}));
}

#[test]
fn strategic_merge_rejects_bad_patches_without_changing_the_target() {
    let before = json!({"spec":{"containers":[{"name":"a"}]}});
    for patch in [
        json!({"spec":{"containers":[{"image":"no-name"}]}}),
        json!({"spec":{"x":{"$patch":"explode"}}}),
        json!([1]),
    ] {
        let mut obj = before.clone();
        assert!(strategic_merge(&mut obj, &patch).is_err(), "{patch}");
        assert_eq!(obj, before);
    }
}
