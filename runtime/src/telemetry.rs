//! Logging, tracing and metrics: a `tracing` subscriber filtered by
//! `TWOKEY_LOG` (falling back to `RUST_LOG`, then `info`), writing human or
//! JSON lines to stderr; OpenTelemetry spans for every traced call (so trace
//! and span ids are real W3C ids even with nothing exported); and OTLP/gRPC
//! export of traces and metrics when the standard `OTEL_EXPORTER_OTLP_*`
//! variables name an endpoint. docs/OBSERVABILITY.md has the whole story.

use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::{Resource, metrics::SdkMeterProvider, trace::SdkTracerProvider};
use tracing_subscriber::{
    EnvFilter, Layer, filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt,
};

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// How long shutdown waits for the last spans and metrics to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the OpenTelemetry providers of a process; dropping it (or calling
/// [`Telemetry::shutdown`]) exports what is still buffered and stops them.
/// Hold it in the function that serves, so it is dropped after the server
/// stopped on SIGTERM/SIGINT and before the runtime goes away.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops the exporters"]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exports_traces(&self) -> bool {
        self.tracer.is_some()
    }

    /// Whether metrics are exported.
    pub fn exports_metrics(&self) -> bool {
        self.meter.is_some()
    }

    /// Flushes and stops the exporters (idempotent).
    pub fn shutdown(&mut self) {
        let tracer = self.tracer.take();
        let meter = self.meter.take();
        if tracer.is_none() && meter.is_none() {
            return;
        }
        let stop = move || {
            if let Some(t) = tracer
                && let Err(e) = t.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
            {
                eprintln!("opentelemetry: spans not all exported at shutdown: {e}");
            }
            if let Some(m) = meter
                && let Err(e) = m.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
            {
                eprintln!("opentelemetry: metrics not all exported at shutdown: {e}");
            }
        };
        // The exporters' gRPC connections run on the tokio runtime; never
        // block a runtime thread while they finish.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(stop),
            Ok(_) => {
                let _ = std::thread::spawn(stop).join();
            }
            Err(_) => stop(),
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A non-empty environment variable.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether OTLP export of `signal` (`TRACES` or `METRICS`) is configured:
/// an endpoint is set (the signal's own or the common one) and
/// `OTEL_<signal>_EXPORTER` is not `none`.
fn otlp_enabled(signal: &str) -> bool {
    let endpoint = env(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .is_some();
    let disabled = env(&format!("OTEL_{signal}_EXPORTER")).is_some_and(|v| v.trim() == "none");
    endpoint && !disabled
}

/// The resource describing this process: `service.name` from
/// `OTEL_SERVICE_NAME`, else `service`; more attributes from
/// `OTEL_RESOURCE_ATTRIBUTES`.
pub fn resource(service: &str) -> Resource {
    let name = env("OTEL_SERVICE_NAME").unwrap_or_else(|| service.to_owned());
    Resource::builder()
        .with_service_name(name)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build()
}

/// Installs the global subscriber for the process `service` (e.g.
/// `twokey-broker`) and, when configured, the OTLP exporters. Call it from
/// inside the tokio runtime that serves; keep the guard until shutdown.
///
/// Without an `OTEL_EXPORTER_OTLP_*ENDPOINT` nothing is exported and no
/// background task runs; spans still get W3C ids, which audit events carry.
/// Calling it twice is harmless (the second subscriber is not installed).
pub fn init(service: &str, format: LogFormat) -> Telemetry {
    let filter = std::env::var("TWOKEY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let resource = resource(service);

    let mut problems = Vec::new();
    for var in [
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    ] {
        if let Some(p) = env(var).filter(|p| p.trim() != "grpc") {
            problems.push(format!(
                "{var}={p} is not supported, exporting over grpc; point the endpoint at an OTLP/gRPC port (4317)"
            ));
        }
    }
    let mut tracer_builder = SdkTracerProvider::builder().with_resource(resource.clone());
    let mut exports_traces = false;
    if otlp_enabled("TRACES") {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                tracer_builder = tracer_builder.with_batch_exporter(exporter);
                exports_traces = true;
            }
            Err(e) => problems.push(format!(
                "cannot export spans: {e}; set OTEL_EXPORTER_OTLP_ENDPOINT to http://HOST:4317"
            )),
        }
    }
    let tracer_provider = tracer_builder.build();
    let meter_provider = if otlp_enabled("METRICS") {
        match opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => Some(
                SdkMeterProvider::builder()
                    .with_resource(resource)
                    .with_periodic_exporter(exporter)
                    .build(),
            ),
            Err(e) => {
                problems.push(format!(
                    "cannot export metrics: {e}; set OTEL_EXPORTER_OTLP_ENDPOINT to http://HOST:4317"
                ));
                None
            }
        }
    } else {
        None
    };

    // Spans of twokey's own crates at INFO and above become OpenTelemetry
    // spans whatever the log filter says, so every call has real ids.
    let otel_filter = tracing_subscriber::filter::Targets::new()
        .with_target("twokey", LevelFilter::INFO)
        .with_target("twokey_runtime", LevelFilter::INFO)
        .with_target("twokey_broker", LevelFilter::INFO)
        .with_target("twokey_vault", LevelFilter::INFO)
        .with_target("twokey_audit", LevelFilter::INFO);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer("twokey"))
        .with_location(false)
        .with_threads(false)
        .with_filter(otel_filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    for problem in &problems {
        tracing::warn!("opentelemetry: {problem}");
    }
    if !installed {
        return Telemetry::default();
    }
    if let Some(meter) = &meter_provider {
        opentelemetry::global::set_meter_provider(meter.clone());
    }
    if exports_traces || meter_provider.is_some() {
        tracing::info!(
            traces = exports_traces,
            metrics = meter_provider.is_some(),
            "exporting telemetry over OTLP/gRPC"
        );
    }
    Telemetry {
        tracer: exports_traces.then_some(tracer_provider),
        meter: meter_provider,
    }
}

/// The W3C trace id of the call being handled (see [`crate::trace`]), else
/// of the current OpenTelemetry context, else empty.
pub fn current_trace_id() -> String {
    if let Some(id) = crate::trace::current() {
        return id;
    }
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let sc = span.span_context();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}
