//! Where a tunnelled connection is going, and which protocol it speaks.
//!
//! Owns reading the CONNECT authority (`VIP:port` → a Service and its port; `podIP:port` → a
//! workload), refusing what this waypoint does not serve, and the protocol choice for a port
//! (appProtocol, else the port name's prefix, else sniffing). Does not read bytes (`sniff`) or
//! route (`routing`).

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use meshcore::proto::config::{Service, ServicePort, Workload};
use meshcore::store::ConfigStore;

/// The original destination of a connection.
#[derive(Clone, Debug)]
pub enum Target {
    /// A Service VIP and one of its ports.
    Service {
        service: Arc<Service>,
        port: ServicePort,
    },
    /// A pod IP (a workload binding) and a port on it.
    Workload {
        workload: Arc<Workload>,
        port: u16,
        /// The Service port that targets this pod port, if one does (for its protocol).
        service_port: Option<ServicePort>,
    },
    /// The plain-HTTP listener's fixed backend.
    Address(SocketAddr),
}

impl Target {
    /// `ns/name` of the service (or the workload's uid), for logs and metrics.
    pub fn name(&self) -> String {
        match self {
            Target::Service { service, .. } => service.hostname.clone(),
            Target::Workload { workload, .. } => workload.uid.clone(),
            Target::Address(a) => a.to_string(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Target::Service { port, .. } => port.port as u16,
            Target::Workload { port, .. } => *port,
            Target::Address(a) => a.port(),
        }
    }

    /// How traffic to this destination is handled.
    pub fn protocol(&self) -> Protocol {
        match self {
            Target::Service { port, .. } => protocol_of(&port.app_protocol, &port.name),
            Target::Workload {
                service_port: Some(p),
                ..
            } => protocol_of(&p.app_protocol, &p.name),
            Target::Workload { .. } => Protocol::Detect,
            Target::Address(_) => Protocol::Http,
        }
    }
}

/// Why a CONNECT is refused, with the status it gets.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

fn refuse(status: StatusCode, reason: String) -> Refusal {
    Refusal { status, reason }
}

/// Finds the destination named by a CONNECT authority. `gateway` (`ns/name`, empty: any) is
/// the Gateway this waypoint runs for: only objects bound to it are served.
pub fn resolve(store: &ConfigStore, authority: &str, gateway: &str) -> Result<Target, Refusal> {
    let addr: SocketAddr = authority.parse().map_err(|_| {
        refuse(
            StatusCode::BAD_REQUEST,
            format!("authority {authority:?} is not ip:port"),
        )
    })?;
    let bound = |b: &Option<meshcore::proto::config::WaypointBinding>| {
        gateway.is_empty() || b.as_ref().is_some_and(|b| b.gateway == gateway)
    };
    if let Some(service) = store.service_by_vip(addr.ip()) {
        if !bound(&service.waypoint) {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!("service {} is not bound to waypoint {gateway}", service.key),
            ));
        }
        let port = service
            .ports
            .iter()
            .find(|p| p.port == u32::from(addr.port()))
            .cloned()
            .ok_or_else(|| {
                refuse(
                    StatusCode::NOT_FOUND,
                    format!("service {} has no port {}", service.key, addr.port()),
                )
            })?;
        return Ok(Target::Service {
            service: service.clone(),
            port,
        });
    }
    if let Some(workload) = store.workload_by_ip(addr.ip()) {
        if !bound(&workload.waypoint) {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "workload {} is not bound to waypoint {gateway}",
                    workload.uid
                ),
            ));
        }
        let service_port = service_port_for(store, workload, addr.port());
        return Ok(Target::Workload {
            workload: workload.clone(),
            port: addr.port(),
            service_port,
        });
    }
    Err(refuse(
        StatusCode::NOT_FOUND,
        format!("{addr} is neither a known service VIP nor a known pod"),
    ))
}

/// The port of a Service selecting `workload` whose target is `port` on it.
fn service_port_for(store: &ConfigStore, workload: &Workload, port: u16) -> Option<ServicePort> {
    store.services().find_map(|s| {
        let ep = s
            .endpoints
            .iter()
            .find(|e| e.workload_uid == workload.uid)?;
        s.ports
            .iter()
            .find(|p| {
                let target = ep
                    .ports
                    .get(&p.port)
                    .copied()
                    .unwrap_or(match p.target_port {
                        0 => p.port,
                        t => t,
                    });
                target == u32::from(port)
            })
            .cloned()
    })
}

/// How a port's traffic is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 (told apart by the h2 preface).
    Http,
    /// Bytes passed through to an endpoint.
    Tcp,
    /// Unknown: sniff the first bytes.
    Detect,
}

/// Istio's rule: `appProtocol` first, else the port name's prefix (`http-web`, `grpc`), else
/// sniff. TLS (`https`, `tls`) is opaque to us: passed through.
pub fn protocol_of(app_protocol: &str, port_name: &str) -> Protocol {
    let named = |p: &str| match p.to_ascii_lowercase().as_str() {
        "http" | "http2" | "h2c" | "grpc" | "grpc-web" | "kubernetes.io/h2c" => {
            Some(Protocol::Http)
        }
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws"
        | "kubernetes.io/wss" => Some(Protocol::Tcp),
        _ => None,
    };
    if !app_protocol.is_empty()
        && let Some(p) = named(app_protocol)
    {
        return p;
    }
    // `grpc-web` is a whole prefix of its own; else the part before the first '-'.
    if port_name.eq_ignore_ascii_case("grpc-web") || port_name.starts_with("grpc-web-") {
        return Protocol::Http;
    }
    let prefix = port_name.split('-').next().unwrap_or_default();
    named(prefix).unwrap_or(Protocol::Detect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_protocol_then_name_prefix_then_sniff() {
        assert_eq!(protocol_of("http", "tcp-x"), Protocol::Http);
        assert_eq!(protocol_of("grpc", ""), Protocol::Http);
        assert_eq!(protocol_of("tcp", "http"), Protocol::Tcp);
        assert_eq!(protocol_of("", "http-web"), Protocol::Http);
        assert_eq!(protocol_of("", "grpc-web"), Protocol::Http);
        assert_eq!(protocol_of("", "http2"), Protocol::Http);
        assert_eq!(protocol_of("", "tcp-db"), Protocol::Tcp);
        assert_eq!(protocol_of("", "https"), Protocol::Tcp);
        assert_eq!(protocol_of("", "web"), Protocol::Detect);
        assert_eq!(protocol_of("", ""), Protocol::Detect);
        // An appProtocol we do not know falls back to the name.
        assert_eq!(protocol_of("example.com/custom", "http"), Protocol::Http);
    }
}
