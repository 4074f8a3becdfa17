//! Span export over OTLP/gRPC, shared by ztunnel (a span per connection) and the waypoint (a
//! span per request).
//!
//! Owns the OpenTelemetry tracer provider (batching on its own thread, the tonic OTLP client)
//! and the one way spans are started. Whether a request or connection is sampled, and what its
//! trace headers say, is the caller's business: a span started here is always exported.
//! Nothing here runs, and nothing is allocated, when no collector is configured.

use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
pub use opentelemetry_sdk::trace::Span;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer};

pub use opentelemetry::trace::Span as SpanExt;
pub use opentelemetry::trace::Status;
pub use opentelemetry::{KeyValue as Attr, Value};

/// Where spans go and how often they are flushed.
#[derive(Clone, Debug)]
pub struct ExportSettings {
    /// The collector's OTLP/gRPC address, `http://host:port` (a bare `host:port` gets `http://`).
    pub collector: String,
    /// `service.name` of the spans (Istio: `<canonical service>.<namespace>`).
    pub service_name: String,
    /// How long finished spans wait before a batch is sent.
    pub flush_every: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SpanError {
    #[error("trace collector {collector:?}: {source} (expected http://host:port)")]
    Exporter {
        collector: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The parent a span continues: a trace context that arrived in headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// A started span's ids, to propagate to the next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

/// The span exporter of one process (or of one in-process test instance).
pub struct Spans {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spans").finish_non_exhaustive()
    }
}

impl Spans {
    /// Starts exporting to `settings.collector`. Needs a tokio runtime (the gRPC channel is
    /// connected lazily on it); nothing is dialled until the first batch.
    pub fn start(settings: &ExportSettings) -> Result<Spans, SpanError> {
        let collector = if settings.collector.contains("://") {
            settings.collector.clone()
        } else {
            format!("http://{}", settings.collector)
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(collector)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| SpanError::Exporter {
                collector: settings.collector.clone(),
                source,
            })?;
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(settings.flush_every)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            // The caller has decided already: only sampled spans are started.
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(
                Resource::builder_empty()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("mesh");
        Ok(Spans { provider, tracer })
    }

    /// Starts a span named `name` at `start`, continuing `parent` if any (else a new trace).
    pub fn start_span(
        &self,
        name: String,
        kind: SpanKind,
        start: SystemTime,
        parent: Option<Parent>,
        attributes: Vec<KeyValue>,
    ) -> Span {
        let cx = match parent {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.span_id),
                if p.sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let builder = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(start)
            .with_attributes(attributes);
        self.tracer.build_with_context(builder, &cx)
    }

    /// Sends what is queued and stops; blocks, so call it off the async threads.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

/// The ids of `span` (zero when it is not recording).
pub fn ids(span: &Span) -> Ids {
    let sc = opentelemetry::trace::Span::span_context(span);
    Ids {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
    }
}

pub use opentelemetry::trace::SpanKind as Kind;
