//! Shared by the plugin tests: a fake node agent on a real unix socket (it records what the
//! plugin asked and answers as told, or not at all) and the real `mesh-cni` binary run the way
//! a container runtime runs it (CNI_* environment, netconf on stdin, result on stdout).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_cni::event::{AgentReply, PluginEvent};
use serde_json::Value;

/// A plugin invocation that outlives this has hung: the test fails instead of hanging.
const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// How the fake agent answers.
#[derive(Clone)]
pub enum Behaviour {
    Reply(AgentReply),
    /// Reads the request and never answers (the connection stays open).
    Silent,
    /// Reads the request and closes the connection.
    Hangup,
    /// Answers with a line that is not a reply.
    Garbage,
}

pub struct FakeAgent {
    pub socket: PathBuf,
    events: Arc<Mutex<Vec<PluginEvent>>>,
    _dir: tempfile::TempDir,
}

impl FakeAgent {
    pub fn start(behaviour: Behaviour) -> FakeAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("plugin.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake agent");
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        std::thread::spawn(move || {
            // Silent connections are kept here so they stay open.
            let mut held = Vec::new();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                if let Some(kept) = serve(stream, &behaviour, &seen) {
                    held.push(kept);
                }
            }
        });
        FakeAgent {
            socket,
            events,
            _dir: dir,
        }
    }

    pub fn events(&self) -> Vec<PluginEvent> {
        self.events.lock().expect("events lock").clone()
    }
}

fn serve(
    stream: UnixStream,
    behaviour: &Behaviour,
    seen: &Mutex<Vec<PluginEvent>>,
) -> Option<UnixStream> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    reader.read_line(&mut line).ok()?;
    let event: PluginEvent = serde_json::from_str(line.trim()).expect("plugin sent a PluginEvent");
    seen.lock().expect("events lock").push(event);
    let mut stream = stream;
    match behaviour {
        Behaviour::Reply(reply) => {
            let mut text = serde_json::to_vec(reply).expect("encode reply");
            text.push(b'\n');
            let _ = stream.write_all(&text);
            None
        }
        Behaviour::Silent => Some(stream),
        Behaviour::Hangup => None,
        Behaviour::Garbage => {
            let _ = stream.write_all(b"{\"outcome\":\"maybe\"}\n");
            None
        }
    }
}

/// What the plugin printed and returned.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    /// The spec error object on stdout, checked for its required fields.
    pub fn error(&self) -> Value {
        assert_ne!(self.code, 0, "expected a failure; stderr: {}", self.stderr);
        let v: Value = serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("error output is not JSON ({e}): {:?}", self.stdout_text()));
        assert!(v["code"].is_u64(), "error has a numeric code: {v}");
        assert!(v["msg"].is_string(), "error has a msg: {v}");
        assert!(v["cniVersion"].is_string(), "error has a cniVersion: {v}");
        v
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs the plugin binary as a runtime would: `CNI_*` from `env` (and nothing else from this
/// process's CNI_* variables), `stdin` as the netconf.
pub fn run_plugin(env: &[(&str, &str)], stdin: &[u8]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-cni"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run mesh-cni");
    let pid = child.id();
    let mut input = child.stdin.take().expect("stdin piped");
    let stdin = stdin.to_vec();
    // The plugin may answer before reading everything (VERSION, oversized input).
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(RUN_DEADLINE) {
        Ok(out) => out.expect("wait for mesh-cni"),
        Err(_) => {
            // SAFETY-free: kill(2) on our own child's pid.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("mesh-cni did not exit within {RUN_DEADLINE:?}");
        }
    };
    let _ = writer.join();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A netconf for our entry, with `prev` (raw JSON text) as prevResult when given.
pub fn netconf(socket: &Path, extra: &str, prev: Option<&str>) -> Vec<u8> {
    let mut s = format!(
        "{{\"cniVersion\":\"1.0.0\",\"name\":\"k8s-pod-network\",\"type\":\"mesh-cni\",\"agent_socket\":{},\"exclude_namespaces\":[\"mesh-system\"]{extra}",
        serde_json::to_string(&socket.display().to_string()).expect("path json")
    );
    if let Some(p) = prev {
        s.push_str(",\"prevResult\":");
        s.push_str(p);
    }
    s.push('}');
    s.into_bytes()
}

/// A primary plugin's result, laid out the way no serializer would (odd spacing, key order,
/// escapes, a number in exponent form), so a re-encoded copy would differ.
pub const PREV_RESULT: &str = "{ \"interfaces\" : [{\"name\":\"eth0\",\"sandbox\":\"/var/run/netns/cni-1\",\"mac\":\"0a:58:0a:f4:01:05\"}],\n  \"cniVersion\":\"1.0.0\", \"ips\":[ {\"interface\":0,\"address\":\"10.244.1.5/24\",\"gateway\":\"10.244.1.1\"}, {\"address\":\"fd00:10:244:1::5/64\", \"interface\":0} ],\n  \"dns\":{\"nameservers\":[\"10.96.0.10\"],\"search\":[\"caf\\u00e9.svc\"]}, \"x-mtu\": 1.5e3 }";

pub fn k8s_args(ns: &str, name: &str, uid: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID={uid}"
    )
}
