//! The waypoint: the mesh's L7 proxy. ztunnels send it, over HBONE, the traffic of the Services
//! (and pods) bound to its Gateway; it routes each HTTP request (or TCP connection) and sends it
//! on to an endpoint over HBONE with its own identity.
//!
//! - [`config`]: the typed configuration; [`app`]: wiring, `app::build(config)`;
//!   [`background`]: certificate, route and pool upkeep.
//! - [`inbound`]: HBONE in; [`plain`]: the plain-HTTP listener; [`admin`]: 15021 / 15020.
//! - [`dest`]: original destination and protocol; [`sniff`]: telling HTTP from TCP.
//! - [`http_server`]: hyper on a downstream stream; [`pipeline`]: one request, end to end;
//!   [`local_reply`]: the answers the waypoint makes itself (gRPC-shaped for gRPC clients).
//! - [`attempts`]: an exchange's tries and retries; [`retry`]: what is retried, backoff and the
//!   kept request body; [`fault`]: injected delays and aborts; [`mirror`]: request copies.
//! - [`routing`]: route decisions; [`balance`]: endpoints and load balancing.
//! - [`upstream`]: HBONE / TCP streams and pooled HTTP connections; [`tcp`]: passthrough.
//! - [`telemetry`]: the one record per request or connection (log line + metrics);
//!   [`trace`]: trace headers and spans.
//! - [`authz`]: L7 AuthorizationPolicy and JWT; [`jwks`]: `jwksUri` keys fetched in the mesh.
//! - [`own_cert`]: the waypoint's certificate.

pub mod admin;
pub mod app;
pub mod attempts;
pub mod authz;
pub mod background;
pub mod balance;
pub mod circuit;
pub mod config;
pub mod dest;
pub mod fault;
pub mod http_server;
pub mod inbound;
pub mod jwks;
pub mod local_reply;
pub mod mirror;
pub mod outlier;
pub mod own_cert;
pub mod pipeline;
pub mod plain;
pub mod retry;
pub mod routing;
pub mod sniff;
pub mod tcp;
pub mod telemetry;
pub mod trace;
pub mod upstream;
