//! The CNI plugin (spec 1.0: ADD, DEL, CHECK, VERSION; chained, `prevResult` passed through).
//! Owns reading the runtime's environment and netconf, the plugin's skip rules, the call to the
//! agent, and the spec's result/error output. Must not touch a netns or the API itself.
//!
//! ADD succeeds only when the agent says the pod is enrolled (ztunnel acked) or not in the mesh;
//! anything else fails the sandbox with a message saying what to fix, and the runtime retries.
//! DEL never fails because of the agent: a pod's teardown must not hang on the mesh.

mod call;
mod netconf;

use std::io::{Read, Write};

use serde_json::json;

use crate::event::{AgentReply, Command, PluginEvent};
pub use netconf::{MAX_NETCONF, SUPPORTED_VERSIONS};
use netconf::{NetConf, NetConfError, parse_cni_args};

/// Spec error codes (CNI spec 1.0, "Error"), and ours (>= 100; 999 as Istio's plugin uses).
const CODE_INCOMPATIBLE_VERSION: u32 = 1;
const CODE_INVALID_ENV: u32 = 4;
const CODE_DECODE: u32 = 6;
const CODE_INVALID_NETCONF: u32 = 7;
const CODE_NOT_ENROLLED: u32 = 999;

/// The runtime's environment for one invocation (spec: "Parameters").
#[derive(Debug, Default, Clone)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub args: String,
}

impl CniEnv {
    pub fn from_process() -> CniEnv {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }
}

/// What to print on stdout and the exit code.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub code: i32,
}

impl Outcome {
    fn ok(stdout: Vec<u8>) -> Outcome {
        Outcome { stdout, code: 0 }
    }
}

/// A spec error result.
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    fn into_outcome(self, cni_version: &str) -> Outcome {
        tracing::error!(code = self.code, details = %self.details, "{}", self.msg);
        let body = json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        });
        let mut stdout = body.to_string().into_bytes();
        stdout.push(b'\n');
        Outcome { stdout, code: 1 }
    }
}

/// The plugin's entry point: reads the process's environment and stdin, writes the result or
/// error to stdout, returns the exit code.
pub fn main() -> i32 {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESH_CNI_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .lock()
        .take(MAX_NETCONF as u64 + 1)
        .read_to_end(&mut stdin);
    let outcome = match read {
        Err(e) => {
            CniError::new(CODE_DECODE, format!("reading stdin: {e}"), "").into_outcome("1.0.0")
        }
        Ok(_) => run(&CniEnv::from_process(), &stdin),
    };
    let mut out = std::io::stdout().lock();
    if out
        .write_all(&outcome.stdout)
        .and_then(|()| out.flush())
        .is_err()
    {
        return 1;
    }
    outcome.code
}

/// One invocation: `stdin` is the netconf the runtime sent.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Outcome {
    let command = match env.command.as_str() {
        "VERSION" => return version(),
        // CNI 1.1: nothing of ours to collect; our status is the agent's, not the network's.
        "GC" | "STATUS" => return Outcome::ok(Vec::new()),
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        other => {
            return CniError::new(
                CODE_INVALID_ENV,
                format!("unknown CNI_COMMAND {other:?} (mesh-cni knows ADD, DEL, CHECK, VERSION)"),
                "",
            )
            .into_outcome("1.0.0");
        }
    };
    if stdin.len() > MAX_NETCONF {
        return CniError::new(
            CODE_DECODE,
            format!("the network configuration on stdin is over {MAX_NETCONF} bytes"),
            "",
        )
        .into_outcome("1.0.0");
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => {
            let code = match e {
                NetConfError::Decode(_) => CODE_DECODE,
                NetConfError::Version(_) => CODE_INCOMPATIBLE_VERSION,
                NetConfError::Invalid(_) => CODE_INVALID_NETCONF,
            };
            return CniError::new(code, e.to_string(), "").into_outcome("1.0.0");
        }
    };
    match command_outcome(command, env, &conf) {
        Ok(stdout) => Outcome::ok(stdout),
        Err(e) => e.into_outcome(&conf.cni_version),
    }
}

fn version() -> Outcome {
    let body = json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS});
    let mut stdout = body.to_string().into_bytes();
    stdout.push(b'\n');
    Outcome::ok(stdout)
}

/// ADD/DEL/CHECK after the netconf was read: the stdout on success.
fn command_outcome(command: Command, env: &CniEnv, conf: &NetConf) -> Result<Vec<u8>, CniError> {
    // What a successful invocation prints: the primary's result for ADD, nothing otherwise.
    let success = || match command {
        Command::Add => conf.prev_result.clone().unwrap_or_default(),
        Command::Del | Command::Check => Vec::new(),
    };
    if env.container_id.is_empty() {
        return Err(CniError::new(
            CODE_INVALID_ENV,
            "CNI_CONTAINERID is not set",
            "",
        ));
    }
    if command != Command::Del && conf.prev_result.is_none() {
        return Err(CniError::new(
            CODE_INVALID_NETCONF,
            "mesh-cni is a chained plugin and got no prevResult: it must be listed after the \
             primary CNI plugin in the conflist (mesh-cni install puts it there)",
            "",
        ));
    }
    if command == Command::Add && env.netns.is_empty() {
        return Err(CniError::new(
            CODE_INVALID_ENV,
            "CNI_NETNS is not set for ADD",
            "",
        ));
    }
    let args = parse_cni_args(&env.args).map_err(|e| CniError::new(CODE_INVALID_ENV, e, ""))?;
    let (Some(namespace), Some(name)) = (args.namespace, args.name) else {
        tracing::debug!("not a Kubernetes pod (no K8S_POD_NAMESPACE/NAME in CNI_ARGS): skipped");
        return Ok(success());
    };
    if conf.exclude_namespaces.contains(&namespace) {
        tracing::debug!(%namespace, "namespace excluded in the netconf: skipped");
        return Ok(success());
    }
    let event = PluginEvent {
        command,
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        pod_namespace: namespace,
        pod_name: name,
        pod_uid: args.uid.unwrap_or_default(),
        ips: conf.ips.clone(),
    };
    let pod = format!("{}/{}", event.pod_namespace, event.pod_name);
    let socket = conf.agent_socket.display().to_string();
    let details = format!(
        "pod {pod} (uid {:?}), sandbox {}, node agent socket {socket}",
        event.pod_uid, event.container_id
    );
    let reply = call::call(&conf.agent_socket, &event, conf.agent_timeout);
    match (command, reply) {
        (Command::Add, Ok(AgentReply::Enrolled)) => Ok(success()),
        (_, Ok(AgentReply::Skipped { reason })) => {
            tracing::debug!(%pod, %reason, "not in the mesh: skipped");
            Ok(success())
        }
        (Command::Del, Err(e)) => {
            // The agent reconciles a pod it missed a DEL for; teardown must go on.
            tracing::warn!(%pod, error = %e, %socket, "node agent not told of DEL; continuing");
            Ok(success())
        }
        (Command::Del, Ok(AgentReply::Failed { error })) => {
            tracing::warn!(%pod, %error, "node agent failed DEL; continuing");
            Ok(success())
        }
        (Command::Del | Command::Check, Ok(AgentReply::Done | AgentReply::Enrolled)) => {
            Ok(success())
        }
        (_, Ok(AgentReply::Failed { error })) => {
            Err(CniError::new(CODE_NOT_ENROLLED, error, details))
        }
        (Command::Add, Ok(AgentReply::Done)) => Err(CniError::new(
            CODE_NOT_ENROLLED,
            "the mesh-cni node agent answered ADD with \"done\" instead of enrolled or skipped: \
             is the agent the same version as the plugin?",
            details,
        )),
        (_, Err(e)) => Err(CniError::new(
            CODE_NOT_ENROLLED,
            unreachable_msg(&e, &socket),
            details,
        )),
    }
}

fn unreachable_msg(e: &call::CallError, socket: &str) -> String {
    match e {
        call::CallError::Unreachable(_) => format!(
            "cannot reach the mesh-cni node agent at {socket} ({e}): the mesh-cni DaemonSet \
             must be running on this node before ambient pods can start; the runtime will retry"
        ),
        call::CallError::Timeout(_) => format!(
            "the mesh-cni node agent at {socket} gave {e}: check the mesh-cni pod on this node \
             (its logs, and that ztunnel is running); the runtime will retry"
        ),
        _ => format!("talking to the mesh-cni node agent at {socket}: {e}"),
    }
}
