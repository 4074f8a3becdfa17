//! Library half of the `echo` crate: the wire protocol (request parsing, reply
//! types), the benchmark report types and the small parsing helpers shared by the
//! `echo` binary and by other crates (tests, testbed) that drive it and need to
//! deserialize its JSON output: the line protocol's replies, the HTTP echo reply
//! (echo-basic's JSON) and the gRPC echo messages.
//!
//! The binary (`src/main.rs` and its modules `serve`, `who`, `bench`, `http_serve`,
//! `grpc_serve`, `grpc_call`, `ws_call`) owns the networking; this library owns only data
//! formats and pure logic.

mod behaviour;
mod duration;
pub mod grpc_frame;
mod http_reply;
pub mod istio_text;
mod protocol;
mod report;

/// The gRPC echo service's messages and generated client (package `mesh.echo.v1`).
pub mod pb {
    tonic::include_proto!("mesh.echo.v1");
}

pub use behaviour::{Behaviour, BehaviourError, Failure, Overrides, STALL_LIMIT};
pub use duration::{DurationParseError, parse_duration};
pub use http_reply::{RequestAssertions, canonical_header_key, echo_set_headers, status_for_path};
pub use protocol::{
    ClientInfo, ErrorReply, LineRead, MAX_LINE, ProtocolError, Request, SinkReply, WhoReply,
    normalize_addr, parse_request, read_line_limited,
};
pub use report::{BenchReport, BulkReport, ConnReport, LatencySummary, RrReport, percentile};
