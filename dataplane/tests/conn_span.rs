//! A connection's span (ztunnel's span per connection) as an independent OTLP/gRPC collector
//! receives it: `tests/py/otlp_receiver.py` (grpcio + opentelemetry-proto), not our code.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane::conn_result::{AccessLog, ConnResult, ConnSpans, Outcome};
use dataplane::spans::{ExportSettings, Spans};
use dataplane::tcp_metrics::TcpMetrics;
use dataplane::telemetry::TcpLabels;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

const DEADLINE: Duration = Duration::from_secs(20);

/// The receiver's spans, as they arrive; the process ends with the test.
async fn receiver() -> (SocketAddr, Arc<Mutex<Vec<Value>>>, tokio::process::Child) {
    let python = std::env::var("MESH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = format!(
        "{}/../tests/py/otlp_receiver.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with grpcio and opentelemetry-proto (cargo xtask deps)");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("receiver starts")
        .unwrap()
        .expect("listening line");
    let port: u16 = first.strip_prefix("listening ").unwrap().parse().unwrap();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let s = spans.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str(&line) {
                s.lock().unwrap().push(v);
            }
        }
    });
    (SocketAddr::from(([127, 0, 0, 1], port)), spans, child)
}

fn log(direction: &'static str, peer: &str, endpoint: &str) -> AccessLog {
    AccessLog {
        direction,
        src_workload: Some("client".into()),
        src_namespace: Some("app".into()),
        src_identity: Some("spiffe://td/ns/app/sa/client".into()),
        dst_identity: Some("spiffe://td/ns/app/sa/server".into()),
        peer: Some(peer.parse().unwrap()),
        endpoint: Some(endpoint.parse().unwrap()),
        protocol: Some("HBONE"),
        ..AccessLog::default()
    }
}

#[tokio::test]
async fn each_sampled_connection_is_one_span_with_its_outcome() {
    let (addr, received, _child) = receiver().await;
    let spans = ConnSpans {
        spans: Spans::start(&ExportSettings {
            collector: addr.to_string(),
            service_name: "ztunnel.node-0".into(),
            flush_every: Duration::from_millis(50),
        })
        .unwrap(),
        sampling: 1.0,
    };
    let unsampled = ConnSpans {
        spans: Spans::start(&ExportSettings {
            collector: addr.to_string(),
            service_name: "never".into(),
            flush_every: Duration::from_millis(50),
        })
        .unwrap(),
        sampling: 0.0,
    };
    let tcp = TcpMetrics::register(&mut Registry::default());
    let conn = |l: AccessLog, s: &ConnSpans| {
        ConnResult::new(Instant::now(), tcp.open(TcpLabels::unknown("source")), l).traced(Some(s))
    };
    conn(log("outbound", "10.0.0.1:40000", "10.0.0.2:8080"), &spans).finish(Outcome::Complete {
        sent: 10,
        received: 20,
    });
    conn(log("inbound", "10.0.0.3:40001", "10.0.0.2:8080"), &spans).finish(Outcome::Denied {
        reason: "denied by app/deny-all".into(),
        message: "connection denied; 401",
    });
    conn(
        log("outbound", "10.0.0.9:40009", "10.0.0.2:8080"),
        &unsampled,
    )
    .finish(Outcome::Complete {
        sent: 1,
        received: 1,
    });
    // Untraced (no collector): nothing is exported and nothing fails.
    ConnResult::new(
        Instant::now(),
        tcp.open(TcpLabels::unknown("source")),
        log("outbound", "10.0.0.8:1", "10.0.0.2:8080"),
    )
    .traced(None)
    .finish(Outcome::Complete {
        sent: 0,
        received: 0,
    });
    // Flush everything both exporters hold: the receiver then has all there will ever be.
    tokio::task::spawn_blocking(move || {
        spans.spans.shutdown();
        unsampled.spans.shutdown();
    })
    .await
    .unwrap();
    let start = Instant::now();
    let got = loop {
        let got = received.lock().unwrap().clone();
        if got.len() >= 2 || start.elapsed() > DEADLINE {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(got.len(), 2, "one span per sampled connection: {got:#?}");
    let out = got
        .iter()
        .find(|s| s["attributes"]["direction"] == "outbound")
        .expect("the outbound span");
    assert_eq!(out["name"], "outbound 10.0.0.2:8080");
    assert_eq!(out["kind"], 3, "SPAN_KIND_CLIENT");
    assert_eq!(out["service"], "ztunnel.node-0");
    assert_eq!(
        out["parent_span_id"], "",
        "a connection starts its own trace"
    );
    let a = &out["attributes"];
    assert_eq!(a["bytes_sent"], 10);
    assert_eq!(a["bytes_received"], 20);
    assert_eq!(a["response_flags"], "-");
    assert_eq!(a["src.identity"], "spiffe://td/ns/app/sa/client");
    assert_eq!(a["peer.address"], "10.0.0.1:40000");
    assert_eq!(a["protocol"], "HBONE");
    assert_eq!(out["status"], 0, "unset: the connection completed");
    let denied = got
        .iter()
        .find(|s| s["attributes"]["direction"] == "inbound")
        .expect("the inbound span");
    assert_eq!(denied["kind"], 2, "SPAN_KIND_SERVER");
    assert_eq!(denied["attributes"]["response_flags"], "DENY");
    assert_eq!(denied["attributes"]["reason"], "denied by app/deny-all");
    assert_eq!(denied["status"], 2, "STATUS_CODE_ERROR");
    assert_ne!(out["trace_id"], denied["trace_id"]);
}
