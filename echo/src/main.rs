//! `echo` binary entry point: the clap command line, tracing setup, the tokio
//! runtime, and dispatch to the `serve`, `who`, `grpc-call`, `ws`, `bench-*`, `hold` and
//! `relay` subcommands.
//! Errors are reported as one `echo: error: ...` line on stderr with exit code 1
//! (clap usage errors exit 2).

mod bench;
mod client;
mod control;
mod fd_limit;
mod grpc_call;
mod grpc_serve;
mod hold;
mod http_serve;
mod istio_client;
mod relay;
mod serve;
mod who;
mod ws_call;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Sample mesh workload (WHO / ECHO / SINK server) and benchmark load client.
#[derive(Debug, Parser)]
#[command(name = "mesh-echo", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the WHO / ECHO / SINK protocol, and HTTP / h2c / WebSocket / gRPC echo, on
    /// dual-stack ports.
    Serve(serve::ServeArgs),
    /// `serve` under the flags of the conformance image echo-advanced (--port, --grpc, --tcp).
    EchoAdvanced(serve::AdvancedArgs),
    /// Call the gRPC echo service; prints a JSON line per reply and per final status.
    GrpcCall(grpc_call::GrpcCallArgs),
    /// The Istio echo client's CLI and output (what the Gateway API mesh conformance suite runs).
    Client(istio_client::ClientArgs),
    /// WebSocket echo client: sends messages and prints each echo.
    Ws(ws_call::WsArgs),
    /// Send WHO requests and print the client's view plus each JSON reply.
    Who(who::WhoArgs),
    /// Benchmark: sequential request/response latency over one ECHO connection.
    BenchRr(bench::RrArgs),
    /// Benchmark: connection rate (connect, WHO, read reply, close) per worker.
    BenchConn(bench::ConnArgs),
    /// Benchmark: bulk throughput into SINK mode with byte accounting.
    BenchBulk(bench::BulkArgs),
    /// Hold N concurrent ECHO connections, each checked with its own payload, until a line on
    /// stdin; then check each again and close them all. One JSON line per phase.
    Hold(hold::HoldArgs),
    /// Relay TCP connections to another address, plainly (the bench's user-space ceiling).
    Relay(relay::RelayArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs a line per connection at info; client commands keep stderr
    // quiet unless something goes wrong (override either with RUST_LOG).
    let default_level = match cli.command {
        Command::Serve(_) | Command::EchoAdvanced(_) => "info",
        _ => "warn",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Relay(args) = &cli.command {
        builder.worker_threads(usize::from(args.worker_threads));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("mesh-echo: error: starting tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::EchoAdvanced(args) => match args.into_serve() {
                Ok(args) => serve::run(args).await,
                Err(err) => Err(err),
            },
            Command::Who(args) => who::run(args).await,
            Command::GrpcCall(args) => grpc_call::run(args).await,
            Command::Ws(args) => ws_call::run(args).await,
            Command::Client(args) => istio_client::run(args).await,
            Command::BenchRr(args) => bench::run_rr(args).await,
            Command::BenchConn(args) => bench::run_conn(args).await,
            Command::BenchBulk(args) => bench::run_bulk(args).await,
            Command::Hold(args) => hold::run(args).await,
            Command::Relay(args) => relay::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mesh-echo: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
