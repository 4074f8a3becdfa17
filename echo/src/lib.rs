//! Library half of the `echo` crate: the wire protocol (request parsing, reply
//! types), the benchmark report types and the small parsing helpers shared by the
//! `echo` binary and by other crates (tests, testbed) that drive it and need to
//! deserialize its JSON output.
//!
//! The binary (`src/main.rs` and its modules `serve`, `who`, `bench`) owns the
//! networking; this library owns only data formats and pure logic.

mod duration;
mod protocol;
mod report;

pub use duration::{DurationParseError, parse_duration};
pub use protocol::{
    ClientInfo, ErrorReply, LineRead, MAX_LINE, ProtocolError, Request, SinkReply, WhoReply,
    normalize_addr, parse_request, read_line_limited,
};
pub use report::{BenchReport, BulkReport, ConnReport, LatencySummary, RrReport, percentile};
