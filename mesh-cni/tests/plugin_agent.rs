//! The CNI plugin and the node agent: the real `mesh-cni` binary run as a runtime runs it,
//! against a fake agent socket. ADD succeeds only on Enrolled/Skipped and then prints the
//! primary's result byte for byte; a Failed, unreachable, silent or confused agent fails the
//! sandbox with a message saying what to fix; DEL succeeds whatever the agent does; CHECK asks.

mod plugin_support;

use mesh_cni::event::{AgentReply, Command, PluginEvent};
use plugin_support::{Behaviour, FakeAgent, PREV_RESULT, k8s_args, netconf, run_plugin};

const NETNS: &str = "/var/run/netns/cni-1234";
const SANDBOX: &str = "5f2e0c9a";

fn add_env(args: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", "ADD".into()),
        ("CNI_CONTAINERID", SANDBOX.into()),
        ("CNI_NETNS", NETNS.into()),
        ("CNI_ARGS", args.into()),
    ]
}

fn with_command(cmd: &str, env: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    env.iter()
        .map(|(k, v)| {
            if *k == "CNI_COMMAND" {
                (*k, cmd.to_string())
            } else {
                (*k, v.clone())
            }
        })
        .collect()
}

fn run(env: &[(&'static str, String)], stdin: &[u8]) -> plugin_support::Run {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run_plugin(&pairs, stdin)
}

#[test]
fn enrolled_add_prints_prev_result_byte_for_byte_and_tells_the_agent_everything() {
    let agent = FakeAgent::start(Behaviour::Reply(AgentReply::Enrolled));
    let conf = netconf(&agent.socket, "", Some(PREV_RESULT));
    let out = run(&add_env(&k8s_args("shop", "web-0", "uid-7")), &conf);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(
        out.stdout_text(),
        PREV_RESULT,
        "prevResult must pass through unchanged"
    );
    assert_eq!(
        agent.events(),
        vec![PluginEvent {
            command: Command::Add,
            container_id: SANDBOX.into(),
            netns: NETNS.into(),
            pod_namespace: "shop".into(),
            pod_name: "web-0".into(),
            pod_uid: "uid-7".into(),
            ips: vec![
                "10.244.1.5".parse().unwrap(),
                "fd00:10:244:1::5".parse().unwrap()
            ],
        }]
    );
}

#[test]
fn skipped_add_passes_prev_result_through() {
    let agent = FakeAgent::start(Behaviour::Reply(AgentReply::Skipped {
        reason: "namespace shop is not ambient".into(),
    }));
    let out = run(
        &add_env(&k8s_args("shop", "web-0", "")),
        &netconf(&agent.socket, "", Some(PREV_RESULT)),
    );
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.stdout_text(), PREV_RESULT);
    assert_eq!(agent.events().len(), 1);
    assert_eq!(
        agent.events()[0].pod_uid,
        "",
        "a runtime may not pass the uid"
    );
}

#[test]
fn failed_add_is_a_cni_error_with_the_agents_reason() {
    let reason = "no ztunnel is connected on node node-1 — is the ztunnel DaemonSet running?";
    let agent = FakeAgent::start(Behaviour::Reply(AgentReply::Failed {
        error: reason.into(),
    }));
    let out = run(
        &add_env(&k8s_args("shop", "web-0", "uid-7")),
        &netconf(&agent.socket, "", Some(PREV_RESULT)),
    );
    let err = out.error();
    assert_eq!(out.code, 1);
    assert_eq!(err["cniVersion"], "1.0.0");
    assert_eq!(err["code"], 999);
    assert_eq!(err["msg"], reason);
    let details = err["details"].as_str().expect("details");
    assert!(
        details.contains("shop/web-0") && details.contains(SANDBOX),
        "{details}"
    );
}

#[test]
fn unreachable_agent_fails_add_and_check_but_not_del() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("absent/plugin.sock");
    let conf = netconf(&socket, "", Some(PREV_RESULT));
    let env = add_env(&k8s_args("shop", "web-0", "uid-7"));

    let add = run(&env, &conf);
    let err = add.error();
    let msg = err["msg"].as_str().expect("msg");
    assert!(
        msg.contains(&socket.display().to_string()) && msg.contains("mesh-cni DaemonSet"),
        "the message names the socket and what must run: {msg}"
    );

    let check = run(&with_command("CHECK", &env), &conf);
    check.error();

    let del = run(&with_command("DEL", &env), &conf);
    assert_eq!(
        del.code,
        0,
        "DEL must not fail on a missing agent: {}",
        del.stdout_text()
    );
    assert!(del.stdout.is_empty());
}

#[test]
fn silent_agent_times_out_add_and_del_still_succeeds() {
    let agent = FakeAgent::start(Behaviour::Silent);
    let conf = netconf(
        &agent.socket,
        ",\"agent_timeout_ms\":300",
        Some(PREV_RESULT),
    );
    let env = add_env(&k8s_args("shop", "web-0", "uid-7"));
    let add = run(&env, &conf);
    let msg = add.error()["msg"].as_str().expect("msg").to_string();
    assert!(msg.contains("no answer within"), "{msg}");
    assert!(msg.contains(&agent.socket.display().to_string()), "{msg}");

    let del = run(&with_command("DEL", &env), &conf);
    assert_eq!(del.code, 0, "{}", del.stdout_text());
    assert_eq!(agent.events().len(), 2, "both were sent to the agent");
}

#[test]
fn an_agent_that_hangs_up_or_talks_nonsense_fails_add() {
    for behaviour in [Behaviour::Hangup, Behaviour::Garbage] {
        let agent = FakeAgent::start(behaviour);
        let out = run(
            &add_env(&k8s_args("shop", "web-0", "uid-7")),
            &netconf(&agent.socket, "", Some(PREV_RESULT)),
        );
        assert_eq!(out.error()["code"], 999);
    }
    // "done" is not "enrolled": the pod would start uncaptured.
    let agent = FakeAgent::start(Behaviour::Reply(AgentReply::Done));
    let out = run(
        &add_env(&k8s_args("shop", "web-0", "uid-7")),
        &netconf(&agent.socket, "", Some(PREV_RESULT)),
    );
    assert_eq!(out.error()["code"], 999);
}

#[test]
fn excluded_namespace_and_non_kubernetes_add_never_reach_the_agent() {
    let agent = FakeAgent::start(Behaviour::Reply(AgentReply::Failed {
        error: "must not be asked".into(),
    }));
    let conf = netconf(&agent.socket, "", Some(PREV_RESULT));
    let excluded = run(&add_env(&k8s_args("mesh-system", "ztunnel-x", "u")), &conf);
    assert_eq!(excluded.code, 0, "{}", excluded.stdout_text());
    assert_eq!(excluded.stdout_text(), PREV_RESULT);

    for args in [
        "",
        "IgnoreUnknown=1",
        "K8S_POD_NAMESPACE=shop",
        "K8S_POD_NAME=web-0;FOO=bar",
    ] {
        let out = run(&add_env(args), &conf);
        assert_eq!(out.code, 0, "CNI_ARGS {args:?}: {}", out.stdout_text());
        assert_eq!(out.stdout_text(), PREV_RESULT);
    }
    assert!(
        agent.events().is_empty(),
        "the agent was asked: {:?}",
        agent.events()
    );
}

#[test]
fn del_and_check_ask_the_agent_and_print_nothing() {
    let agent = FakeAgent::start(Behaviour::Reply(AgentReply::Done));
    let conf = netconf(&agent.socket, "", Some(PREV_RESULT));
    let mut env = with_command("DEL", &add_env(&k8s_args("shop", "web-0", "uid-7")));
    // A runtime may run DEL after the netns is gone.
    env.retain(|(k, _)| *k != "CNI_NETNS");
    let del = run(&env, &netconf(&agent.socket, "", None));
    assert_eq!(del.code, 0, "{}", del.stdout_text());
    assert!(del.stdout.is_empty());
    let check = run(
        &with_command("CHECK", &add_env(&k8s_args("shop", "web-0", "uid-7"))),
        &conf,
    );
    assert_eq!(check.code, 0, "{}", check.stdout_text());
    assert!(check.stdout.is_empty());
    let commands: Vec<(Command, String)> = agent
        .events()
        .into_iter()
        .map(|e| (e.command, e.netns))
        .collect();
    assert_eq!(
        commands,
        vec![
            (Command::Del, String::new()),
            (Command::Check, NETNS.into())
        ]
    );

    let failing = FakeAgent::start(Behaviour::Reply(AgentReply::Failed {
        error: "pod shop/web-0 is ambient but not enrolled".into(),
    }));
    let conf = netconf(&failing.socket, "", Some(PREV_RESULT));
    let check = run(
        &with_command("CHECK", &add_env(&k8s_args("shop", "web-0", "u"))),
        &conf,
    );
    assert_eq!(
        check.error()["msg"],
        "pod shop/web-0 is ambient but not enrolled"
    );
    let del = run(
        &with_command("DEL", &add_env(&k8s_args("shop", "web-0", "u"))),
        &conf,
    );
    assert_eq!(del.code, 0, "DEL succeeds even when the agent fails it");
}
