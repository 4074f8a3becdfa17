//! The waypoint's answers on the shared servers of [`dataplane::admin`]: readiness on 15021
//! (`GET /healthz/ready`: 200 once it has its certificate and a first config, else 503 with
//! why) and metrics on 15020 (`GET /metrics`, `GET /config_dump` — the waypoint's pod has no
//! separate admin port). Owns only the mapping onto [`Handler`]; what readiness and the dump
//! say comes from `app`.

use std::sync::Arc;

use dataplane::admin::Handler;

use crate::app::Ctx;

/// [`Handler`] over the waypoint's shared context.
pub struct Endpoints(pub Arc<Ctx>);

impl Handler for Endpoints {
    fn metrics(&self) -> String {
        self.0.metrics.encode()
    }
    fn ready(&self) -> Result<(), String> {
        self.0.ready()
    }
    fn config_dump(&self) -> serde_json::Value {
        self.0.config_dump()
    }
}
