//! The CNI plugin's side of the spec that needs no agent: VERSION, and the error results for
//! what a runtime or a broken conflist can hand it (unsupported version, not chained, bad
//! JSON, oversized stdin, missing environment, malformed CNI_ARGS, unknown command). Real
//! binary, real environment and stdin.

mod plugin_support;

use plugin_support::{PREV_RESULT, k8s_args, netconf, run_plugin};
use serde_json::{Value, json};

const ARGS: &str = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0";

fn add(stdin: &[u8]) -> plugin_support::Run {
    run_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_ARGS", ARGS),
        ],
        stdin,
    )
}

/// A socket nobody listens on: the error cases must fail before asking anyone.
fn nowhere() -> std::path::PathBuf {
    std::path::PathBuf::from("/nonexistent/mesh-cni-plugin-spec.sock")
}

#[test]
fn version_lists_what_the_plugin_speaks() {
    for stdin in [&b""[..], br#"{"cniVersion":"1.0.0"}"#] {
        let out = run_plugin(&[("CNI_COMMAND", "VERSION")], stdin);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v: Value = serde_json::from_slice(&out.stdout).expect("VERSION prints JSON");
        assert_eq!(
            v,
            json!({"cniVersion": "1.0.0",
                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
    }
}

#[test]
fn unsupported_cni_version_is_code_1() {
    let conf = String::from_utf8(netconf(&nowhere(), "", Some(PREV_RESULT)))
        .expect("utf8")
        .replace(
            "\"cniVersion\":\"1.0.0\",\"name\"",
            "\"cniVersion\":\"0.2.0\",\"name\"",
        );
    let err = add(conf.as_bytes()).error();
    assert_eq!(err["code"], 1);
    assert!(err["msg"].as_str().expect("msg").contains("0.2.0"), "{err}");
}

#[test]
fn unchained_add_is_code_7_and_says_where_the_plugin_belongs() {
    let err = add(&netconf(&nowhere(), "", None)).error();
    assert_eq!(err["code"], 7);
    assert!(
        err["msg"]
            .as_str()
            .expect("msg")
            .contains("after the primary"),
        "{err}"
    );
}

#[test]
fn undecodable_or_oversized_stdin_is_code_6() {
    assert_eq!(add(b"{\"cniVersion\": ").error()["code"], 6);
    assert_eq!(add(b"").error()["code"], 6);
    // A prevResult address that is not address/prefix.
    let bad_ip = PREV_RESULT.replace("10.244.1.5/24", "10.244.1.5");
    assert_eq!(
        add(&netconf(&nowhere(), "", Some(&bad_ip))).error()["code"],
        7
    );
    // Valid JSON, but far more than any netconf.
    let pad = format!(",\"pad\":\"{}\"", "x".repeat(2 << 20));
    let err = add(&netconf(&nowhere(), &pad, Some(PREV_RESULT))).error();
    assert_eq!(err["code"], 6);
    assert!(err["msg"].as_str().expect("msg").contains("over"), "{err}");
}

#[test]
fn missing_environment_and_malformed_args_are_code_4() {
    let conf = netconf(&nowhere(), "", Some(PREV_RESULT));
    let no_id = run_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", "/x"),
            ("CNI_ARGS", ARGS),
        ],
        &conf,
    );
    assert_eq!(no_id.error()["code"], 4);
    let no_netns = run_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_ARGS", ARGS),
        ],
        &conf,
    );
    assert_eq!(no_netns.error()["code"], 4);
    let bad_args = run_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/x"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;garbage"),
        ],
        &conf,
    );
    assert_eq!(bad_args.error()["code"], 4);
    let unknown = run_plugin(&[("CNI_COMMAND", "FROB"), ("CNI_CONTAINERID", "c1")], &conf);
    assert_eq!(unknown.error()["code"], 4);
}

#[test]
fn error_results_carry_the_netconfs_version() {
    let conf = String::from_utf8(netconf(&nowhere(), "", None))
        .expect("utf8")
        .replace("\"cniVersion\":\"1.0.0\"", "\"cniVersion\":\"0.4.0\"");
    let err = add(conf.as_bytes()).error();
    assert_eq!(err["cniVersion"], "0.4.0");
    // And a 0.4.0 chain works end to end (skipped: not a Kubernetes pod).
    let chained = String::from_utf8(netconf(&nowhere(), "", Some(PREV_RESULT)))
        .expect("utf8")
        .replace(
            "\"cniVersion\":\"1.0.0\",\"name\"",
            "\"cniVersion\":\"0.4.0\",\"name\"",
        );
    let out = run_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/x"),
            ("CNI_ARGS", &k8s_args("mesh-system", "ztunnel-1", "u")),
        ],
        chained.as_bytes(),
    );
    assert_eq!(out.code, 0, "{}", out.stdout_text());
    assert_eq!(out.stdout_text(), PREV_RESULT);
}

#[test]
fn gc_and_status_of_cni_1_1_succeed_quietly() {
    for cmd in ["GC", "STATUS"] {
        let conf = netconf(&nowhere(), "", None);
        let out = run_plugin(&[("CNI_COMMAND", cmd)], &conf);
        assert_eq!(out.code, 0, "{cmd}: {}", out.stdout_text());
        assert!(out.stdout.is_empty(), "{cmd}");
    }
}
