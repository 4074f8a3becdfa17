//! The local kubelet's container runtime side of CNI (spec 1.0): each node's CNI conf dir and
//! bin dir, the primary conflist naming our veth wiring (`mesh-local-veth`, run in-process
//! because the testbed builds the veth), and running a pod sandbox's chain as a runtime does:
//! ADD runs the primary, then execs every chained plugin in order with `CNI_COMMAND`,
//! `CNI_NETNS`, `CNI_CONTAINERID`, `CNI_IFNAME`, `CNI_PATH`, `CNI_ARGS` and the netconf plus
//! `prevResult` on stdin; DEL runs them in reverse with the cached ADD result.
//! Owns the conf/bin dir layout and the chain's execution; which plugins are chained is the
//! installer's (`mesh-cni install` edits the conflist), the netns and veth are the testbed's,
//! and what a plugin does is its own.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// The primary plugin's type: our veth wiring, run by the kubelet itself.
pub const PRIMARY_TYPE: &str = "mesh-local-veth";
/// The CNI version our conflist and results speak.
pub const CNI_VERSION: &str = "1.0.0";
/// The name of the primary conflist in each node's conf dir (lexically first, so kubelet's pick).
pub const PRIMARY_CONFLIST: &str = "10-localmesh.conflist";
/// The pod's interface.
pub const IFNAME: &str = "eth0";
/// The longest a chained plugin may run (mesh-cni bounds its own wait for the agent at 20 s;
/// a runtime kills a plugin that hangs instead of hanging the pod forever).
const PLUGIN_DEADLINE: Duration = Duration::from_secs(30);
/// The largest conflist or plugin output read.
const MAX_BYTES: u64 = 1 << 20;

/// What went wrong running a pod's CNI chain. Each says what to look at.
#[derive(Debug)]
pub enum CniError {
    /// The conf dir holds no `.conf`/`.conflist`.
    NoConfig(PathBuf),
    /// The chosen config does not read as a conflist.
    BadConfig { file: PathBuf, why: String },
    /// A chained plugin's binary is in no CNI_PATH directory.
    PluginMissing { plugin: String, path: String },
    /// The plugin ran and reported an error (its CNI error JSON, else its exit and stderr).
    PluginFailed {
        plugin: String,
        command: &'static str,
        msg: String,
    },
    /// The plugin could not be run or did not finish in time.
    Exec { plugin: String, why: String },
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CniError::NoConfig(dir) => write!(
                f,
                "no CNI config (.conf/.conflist) in {}: the node's network is not set up",
                dir.display()
            ),
            CniError::BadConfig { file, why } => {
                write!(f, "CNI config {}: {why}", file.display())
            }
            CniError::PluginMissing { plugin, path } => write!(
                f,
                "CNI plugin {plugin:?} is not in CNI_PATH ({path}): install it (mesh-cni install)"
            ),
            CniError::PluginFailed {
                plugin,
                command,
                msg,
            } => write!(f, "CNI plugin {plugin} failed {command}: {msg}"),
            CniError::Exec { plugin, why } => write!(f, "running CNI plugin {plugin}: {why}"),
        }
    }
}

impl std::error::Error for CniError {}

/// One node's CNI directories and the agent's sockets.
#[derive(Clone, Debug)]
pub struct NodeCni {
    pub node: String,
    /// `/etc/cni/net.d` of the node.
    pub conf_dir: PathBuf,
    /// `/opt/cni/bin` of the node (CNI_PATH).
    pub bin_dir: PathBuf,
    /// The agent's state dir (`/var/run/mesh-cni`): its plugin socket lives here.
    pub agent_dir: PathBuf,
    /// Where the agent serves ZDS and ztunnel connects (`/var/run/ztunnel/ztunnel.sock`).
    pub zds_socket: PathBuf,
}

impl NodeCni {
    /// The layout under `<run>/cni/<node>/`, created, with the primary conflist written.
    pub fn create(run_dir: &Path, node: &str) -> anyhow::Result<NodeCni> {
        let root = run_dir.join("cni").join(node);
        let n = NodeCni {
            node: node.to_string(),
            conf_dir: root.join("net.d"),
            bin_dir: root.join("bin"),
            agent_dir: root.join("mesh-cni"),
            zds_socket: root.join("ztunnel").join("ztunnel.sock"),
        };
        for d in [&n.conf_dir, &n.bin_dir, &n.agent_dir] {
            crate::make_private_dir(d)?;
        }
        if let Some(d) = n.zds_socket.parent() {
            crate::make_private_dir(d)?;
        }
        let primary = json!({
            "cniVersion": CNI_VERSION,
            "name": "localmesh",
            "plugins": [{"type": PRIMARY_TYPE, "node": node}],
        });
        crate::write_atomically(
            &n.conf_dir.join(PRIMARY_CONFLIST),
            &serde_json::to_string_pretty(&primary)?,
        )?;
        Ok(n)
    }

    /// The agent's plugin socket (what our chain entry names).
    pub fn plugin_socket(&self) -> PathBuf {
        self.agent_dir.join("plugin.sock")
    }

    /// The config kubelet would use: the lexically first `.conf`/`.conflist` (a `.conf` is a
    /// chain of one). Read at every ADD/DEL, so an installer's edit is seen at once.
    pub fn load(&self) -> Result<Conflist, CniError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(|e| CniError::BadConfig {
                file: self.conf_dir.clone(),
                why: e.to_string(),
            })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let hidden = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_none_or(|n| n.starts_with('.'));
                let ext = p.extension().and_then(|e| e.to_str());
                !hidden && matches!(ext, Some("conf" | "conflist" | "json"))
            })
            .collect();
        files.sort();
        let file = files
            .into_iter()
            .next()
            .ok_or_else(|| CniError::NoConfig(self.conf_dir.clone()))?;
        let bad = |why: String| CniError::BadConfig {
            file: file.clone(),
            why,
        };
        let mut text = String::new();
        std::fs::File::open(&file)
            .and_then(|f| f.take(MAX_BYTES).read_to_string(&mut text))
            .map_err(|e| bad(e.to_string()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let (name, version, plugins) = match v.get("plugins") {
            Some(Value::Array(ps)) => (v.get("name"), v.get("cniVersion"), ps.clone()),
            Some(_) => return Err(bad("\"plugins\" is not a list".into())),
            None => (v.get("name"), v.get("cniVersion"), vec![v.clone()]),
        };
        let name = name.and_then(Value::as_str).unwrap_or_default().to_string();
        let version = version
            .and_then(Value::as_str)
            .unwrap_or(CNI_VERSION)
            .to_string();
        let mut types = Vec::new();
        for p in &plugins {
            match p.get("type").and_then(Value::as_str) {
                Some(t) if is_plugin_name(t) => types.push(t.to_string()),
                _ => return Err(bad(format!("plugin without a usable \"type\": {p}"))),
            }
        }
        if types.first().map(String::as_str) != Some(PRIMARY_TYPE) {
            return Err(bad(format!(
                "the chain must start with {PRIMARY_TYPE} (local mode's veth wiring), got {types:?}"
            )));
        }
        Ok(Conflist {
            file,
            name,
            version,
            plugins,
        })
    }
}

/// A plugin type is a file name in CNI_PATH: nothing that walks out of it.
fn is_plugin_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !t.starts_with('.')
}

/// A loaded chain: the primary first, then what was chained after it.
#[derive(Clone, Debug)]
pub struct Conflist {
    pub file: PathBuf,
    pub name: String,
    pub version: String,
    plugins: Vec<Value>,
}

impl Conflist {
    /// Types of the chained plugins (after the primary), in order.
    pub fn chained(&self) -> Vec<String> {
        self.plugins[1..]
            .iter()
            .filter_map(|p| p["type"].as_str().map(str::to_string))
            .collect()
    }
}

/// One pod sandbox as the runtime knows it.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub container_id: String,
    pub netns: PathBuf,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Sandbox {
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container_id, self.uid
        )
    }
}

/// The primary's CNI 1.0 result for a wired testbed pod: the pod's `eth0`, its addresses with
/// the node-side gateways, default routes.
pub fn primary_result(pod: &testbed::Pod, netns: &Path) -> Value {
    let gw4 = std::net::Ipv4Addr::new(10, (pod.node + 1) as u8, 0, 1);
    let mut ips = vec![
        json!({"address": format!("{}/32", pod.ip4), "gateway": gw4.to_string(), "interface": 0}),
    ];
    let mut routes = vec![json!({"dst": "0.0.0.0/0", "gw": gw4.to_string()})];
    if let Some(ip6) = pod.ip6 {
        let gw6 = std::net::Ipv6Addr::new(0xfd00, (pod.node + 1) as u16, 0, 0, 0, 0, 0, 1);
        ips.push(
            json!({"address": format!("{ip6}/128"), "gateway": gw6.to_string(), "interface": 0}),
        );
        routes.push(json!({"dst": "::/0", "gw": gw6.to_string()}));
    }
    json!({
        "cniVersion": CNI_VERSION,
        "interfaces": [{"name": IFNAME, "sandbox": netns.display().to_string()}],
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

/// A runtime's command for the chained plugins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Del,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Add => "ADD",
            Op::Del => "DEL",
        }
    }
}

/// Runs the chained plugins (everything after the primary) for `sandbox`: ADD in order, each
/// given the previous result, returning the last result; DEL in reverse, each given `prev`
/// (the cached ADD result). A DEL failure of one plugin does not skip the others: the first
/// error is returned after all ran.
pub fn run_chained(
    node: &NodeCni,
    conf: &Conflist,
    op: Op,
    sandbox: &Sandbox,
    prev: Value,
) -> Result<Value, CniError> {
    let chained = &conf.plugins[1..];
    match op {
        Op::Add => {
            let mut result = prev;
            for plugin in chained {
                let out = exec(node, conf, plugin, op, sandbox, &result)?;
                // A plugin that prints nothing passes the result through unchanged.
                if let Some(r) = out {
                    result = r;
                }
            }
            Ok(result)
        }
        Op::Del => {
            let mut first_err = None;
            for plugin in chained.iter().rev() {
                if let Err(e) = exec(node, conf, plugin, op, sandbox, &prev) {
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(prev), Err)
        }
    }
}

/// Execs one plugin; `Ok(Some(result))` when it printed one.
fn exec(
    node: &NodeCni,
    conf: &Conflist,
    plugin: &Value,
    op: Op,
    sandbox: &Sandbox,
    prev: &Value,
) -> Result<Option<Value>, CniError> {
    let ty = plugin["type"].as_str().unwrap_or_default().to_string();
    let bin = node.bin_dir.join(&ty);
    if !bin.is_file() {
        return Err(CniError::PluginMissing {
            plugin: ty,
            path: node.bin_dir.display().to_string(),
        });
    }
    let mut netconf = plugin.clone();
    if let Some(o) = netconf.as_object_mut() {
        o.insert("cniVersion".into(), conf.version.clone().into());
        o.insert("name".into(), conf.name.clone().into());
        o.insert("prevResult".into(), prev.clone());
    }
    let stdin = serde_json::to_vec(&netconf).unwrap_or_default();
    let fail = |why: String| CniError::Exec {
        plugin: ty.clone(),
        why,
    };
    let mut child = Command::new(&bin)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", op.as_str())
        .env("CNI_CONTAINERID", &sandbox.container_id)
        .env("CNI_NETNS", &sandbox.netns)
        .env("CNI_IFNAME", IFNAME)
        .env("CNI_PATH", &node.bin_dir)
        .env("CNI_ARGS", sandbox.cni_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("{}: {e}", bin.display())))?;
    let pid = child.id();
    if let Some(mut input) = child.stdin.take() {
        // A plugin may exit without reading stdin; its exit code says what happened.
        let _ = input.write_all(&stdin);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(PLUGIN_DEADLINE) {
        Ok(out) => out.map_err(|e| fail(e.to_string()))?,
        Err(_) => {
            // Ours, still running: the waiting thread reaps it.
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(fail(format!("no answer within {PLUGIN_DEADLINE:?}")));
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(MAX_BYTES as usize)]);
    let printed: Option<Value> = serde_json::from_str(stdout.trim()).ok();
    if out.status.success() {
        return Ok(printed.filter(|v| v.is_object()));
    }
    // The spec's error: {"cniVersion", "code", "msg", "details"} on stdout.
    let msg = match printed {
        Some(e) if e.get("msg").is_some() => {
            let mut m = e["msg"].as_str().unwrap_or_default().to_string();
            if let Some(d) = e["details"].as_str().filter(|d| !d.is_empty()) {
                m = format!("{m}: {d}");
            }
            if let Some(code) = e["code"].as_u64() {
                m = format!("{m} (CNI error code {code})");
            }
            m
        }
        _ => format!(
            "{}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    };
    Err(CniError::PluginFailed {
        plugin: ty,
        command: op.as_str(),
        msg,
    })
}

/// A container id as runtimes make them: 64 hex digits.
pub fn new_container_id() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A pod UID as the API server makes them (a random UUID).
pub fn new_pod_uid() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(dir: &TempDir) -> NodeCni {
        NodeCni::create(&dir.0, "node-0").unwrap()
    }

    fn write_plugin(n: &NodeCni, name: &str, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = n.bin_dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn chain(n: &NodeCni, extra: Value) {
        let conf = json!({"cniVersion": CNI_VERSION, "name": "localmesh",
            "plugins": [{"type": PRIMARY_TYPE}, extra]});
        std::fs::write(n.conf_dir.join(PRIMARY_CONFLIST), conf.to_string()).unwrap();
    }

    fn sandbox() -> Sandbox {
        Sandbox {
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            namespace: "a".into(),
            name: "p".into(),
            uid: "u".into(),
        }
    }

    #[test]
    fn primary_only_chain_returns_the_primary_result() {
        let dir = tempdir();
        let n = node(&dir);
        let conf = n.load().unwrap();
        assert!(conf.chained().is_empty());
        let prev = json!({"cniVersion": CNI_VERSION, "ips": []});
        let r = run_chained(&n, &conf, Op::Add, &sandbox(), prev.clone()).unwrap();
        assert_eq!(r, prev);
    }

    #[test]
    fn chained_plugin_gets_env_and_prev_result_and_its_error_is_reported() {
        let dir = tempdir();
        let n = node(&dir);
        chain(&n, json!({"type": "echoer", "x": 1}));
        // Echoes what it was given as its result: stdin and the environment.
        write_plugin(
            &n,
            "echoer",
            r#"in=$(cat); printf '{"in":%s,"cmd":"%s","args":"%s","netns":"%s","ifname":"%s"}' "$in" "$CNI_COMMAND" "$CNI_ARGS" "$CNI_NETNS" "$CNI_IFNAME""#,
        );
        let conf = n.load().unwrap();
        let prev = json!({"ips": [{"address": "10.1.0.2/32"}]});
        let r = run_chained(&n, &conf, Op::Add, &sandbox(), prev.clone()).unwrap();
        assert_eq!(r["in"]["prevResult"], prev);
        assert_eq!(r["in"]["x"], 1);
        assert_eq!(r["in"]["name"], "localmesh");
        assert_eq!(r["cmd"], "ADD");
        assert_eq!(r["netns"], "/run/netns/x");
        assert_eq!(r["ifname"], "eth0");
        let args = r["args"].as_str().unwrap();
        assert!(
            args.contains("K8S_POD_NAMESPACE=a;K8S_POD_NAME=p;"),
            "{args}"
        );
        assert!(args.contains("K8S_POD_UID=u"), "{args}");

        write_plugin(
            &n,
            "echoer",
            r#"echo '{"cniVersion":"1.0.0","code":999,"msg":"no ztunnel","details":"start it"}'; exit 1"#,
        );
        let e = run_chained(&n, &conf, Op::Add, &sandbox(), prev).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CNI plugin echoer failed ADD: no ztunnel: start it (CNI error code 999)"
        );
    }

    #[test]
    fn a_chain_not_starting_with_our_primary_or_naming_a_path_is_refused() {
        let dir = tempdir();
        let n = node(&dir);
        std::fs::write(
            n.conf_dir.join(PRIMARY_CONFLIST),
            json!({"plugins": [{"type": "bridge"}]}).to_string(),
        )
        .unwrap();
        assert!(matches!(n.load(), Err(CniError::BadConfig { .. })));
        chain(&n, json!({"type": "../../bin/sh"}));
        assert!(matches!(n.load(), Err(CniError::BadConfig { .. })));
        chain(&n, json!({"type": "absent"}));
        let conf = n.load().unwrap();
        let e = run_chained(&n, &conf, Op::Add, &sandbox(), json!({})).unwrap_err();
        assert!(matches!(e, CniError::PluginMissing { .. }), "{e}");
    }

    #[test]
    fn uids_and_container_ids_look_like_kubernetes_ones() {
        let u = new_pod_uid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, new_pod_uid().unwrap());
        assert_eq!(new_container_id().unwrap().len(), 64);
    }

    /// A fresh directory, removed when dropped (also when a test fails).
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tempdir() -> TempDir {
        let d = std::env::temp_dir().join(format!("localmesh-cni-{}", new_container_id().unwrap()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
