//! Shared integration-test harness: runs the built `echo` binary, starts
//! `echo serve` on free ports and waits (with a deadline, by polling connect)
//! until every port accepts. The server is killed when the guard drops.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mesh-echo");
const READY_DEADLINE: Duration = Duration::from_secs(15);
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Server {
    child: Child,
    /// Line-protocol ports (`--port`).
    pub ports: Vec<u16>,
    /// HTTP ports (`--http-port`: HTTP/1.1, h2c, WebSocket, gRPC).
    pub http_ports: Vec<u16>,
    log: PathBuf,
}

impl Server {
    /// `echo serve --name test-pod` on one free port.
    pub fn start() -> Self {
        Self::start_with(1, Some("test-pod"), &[])
    }

    /// `echo serve` on `nports` free ports, with optional `--name` and extra env.
    pub fn start_with(nports: usize, name: Option<&str>, env: &[(&str, &str)]) -> Self {
        Self::start_mixed(nports, 0, name, env)
    }

    /// `echo serve` on `nports` line-protocol ports and `nhttp` HTTP ports.
    pub fn start_mixed(
        nports: usize,
        nhttp: usize,
        name: Option<&str>,
        env: &[(&str, &str)],
    ) -> Self {
        // A port picked by binding :0 can be taken by someone else before the
        // server binds it; retry a few times rather than flake.
        let mut last_log = String::new();
        for _ in 0..5 {
            match Self::try_start(nports, nhttp, name, env) {
                Ok(server) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("echo serve failed to start; last stderr:\n{last_log}");
    }

    fn try_start(
        nports: usize,
        nhttp: usize,
        name: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let ports: Vec<u16> = (0..nports).map(|_| free_port()).collect();
        let http_ports: Vec<u16> = (0..nhttp).map(|_| free_port()).collect();
        let mut args = vec!["serve".to_owned()];
        for p in &ports {
            args.extend(["--port".to_owned(), p.to_string()]);
        }
        for p in &http_ports {
            args.extend(["--http-port".to_owned(), p.to_string()]);
        }
        if let Some(name) = name {
            args.extend(["--name".to_owned(), name.to_owned()]);
        }
        Self::spawn_and_wait(&args, ports, http_ports, env)
    }

    /// `echo serve --name test-pod` on one HTTP port with `extra` flags.
    pub fn start_http_with(extra: &[&str]) -> Self {
        let mut last_log = String::new();
        for _ in 0..5 {
            let http = free_port();
            let mut args: Vec<String> = [
                "serve",
                "--name",
                "test-pod",
                "--http-port",
                &http.to_string(),
            ]
            .map(str::to_owned)
            .to_vec();
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            match Self::spawn_and_wait(&args, vec![], vec![http], &[]) {
                Ok(server) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("echo serve failed to start; last stderr:\n{last_log}");
    }

    /// `mesh-echo echo-advanced` with the conformance manifests' flags: one `--tcp` port
    /// (`ports[0]`), one `--port` and one `--grpc` port (`http_ports`), and a `--tls` port that
    /// must stay closed (returned separately).
    pub fn start_advanced(env: &[(&str, &str)]) -> (Self, u16) {
        let mut last_log = String::new();
        for _ in 0..5 {
            let (tcp, http, grpc, tls) = (free_port(), free_port(), free_port(), free_port());
            let mut args = vec!["echo-advanced".to_owned()];
            args.extend([
                format!("--tcp={tcp}"),
                format!("--port={http}"),
                format!("--grpc={grpc}"),
                format!("--port={tls}"),
                format!("--tls={tls}"),
                "--crt=/cert.crt".to_owned(),
                "--key=/cert.key".to_owned(),
            ]);
            match Self::spawn_and_wait(&args, vec![tcp], vec![http, grpc], env) {
                Ok(server) => return (server, tls),
                Err(log) => last_log = log,
            }
        }
        panic!("echo-advanced failed to start; last stderr:\n{last_log}");
    }

    fn spawn_and_wait(
        args: &[String],
        ports: Vec<u16>,
        http_ports: Vec<u16>,
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let first = ports.iter().chain(&http_ports).next().copied().unwrap_or(0);
        let log =
            std::env::temp_dir().join(format!("echo-test-{}-{}.log", std::process::id(), first));
        let log_file = std::fs::File::create(&log).expect("create server log file");
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        for k in [
            "POD_NAME",
            "POD_NAMESPACE",
            "NAMESPACE",
            "SERVICE_NAME",
            "INGRESS_NAME",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn echo serve");
        let mut server = Server {
            child,
            ports,
            http_ports,
            log,
        };
        let deadline = Instant::now() + READY_DEADLINE;
        let all: Vec<u16> = server
            .ports
            .iter()
            .chain(&server.http_ports)
            .copied()
            .collect();
        for port in all {
            loop {
                if let Ok(Some(status)) = server.child.try_wait() {
                    return Err(format!("exited with {status}: {}", server.log_text()));
                }
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "echo serve not accepting on port {port} within {READY_DEADLINE:?}; stderr:\n{}",
                    server.log_text()
                );
                // Poll interval while waiting for the listener (not a sync point).
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    pub fn v4(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// `127.0.0.1:PORT` of the first HTTP port.
    pub fn http_v4(&self) -> String {
        format!("127.0.0.1:{}", self.http_ports[0])
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A port that was free a moment ago (dual-stack bind, like the server's).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("[::]:0").expect("bind [::]:0");
    l.local_addr().expect("local_addr").port()
}

/// Connects with test timeouts set.
pub fn connect(addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().expect("socket addr");
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

pub fn read_line(r: &mut impl BufRead) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("read line");
    assert!(line.ends_with('\n'), "unterminated line {line:?}");
    line
}

/// Sends `req`, half-closes, and returns everything the server sent back.
pub fn exchange_to_eof(addr: &str, req: &[u8]) -> Vec<u8> {
    let mut s = connect(addr);
    s.write_all(req).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

pub fn run_echo(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run echo")
}

pub fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .expect("utf8 stdout")
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn new_reader(s: &TcpStream) -> BufReader<TcpStream> {
    BufReader::new(s.try_clone().expect("clone stream"))
}
