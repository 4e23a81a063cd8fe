//! Logging: human-readable by default, one JSON object per line with `--log-format json`.
//!
//! Tracing: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! request spans and the engine and transaction spans beneath them are also exported over
//! OTLP/HTTP (protobuf), batched by a task in the background. The OpenTelemetry SDK reads the
//! rest of its standard variables itself (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`, …). Without the variable
//! nothing of OpenTelemetry is installed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, Method};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Status, TraceContextExt, TracerProvider as _};
use opentelemetry::{Key, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Metadata};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{self, DynFilterFn, FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The service name when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` gives one.
const SERVICE_NAME: &str = "inventory";

/// Longest wait at exit for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether spans are exported; read on every request, so an atomic rather than a lock.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The installed tracing, if any: shut it down at exit so the last spans are sent.
#[derive(Debug)]
#[must_use = "shut it down at exit, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level of the logs;
/// the exported spans have their own filter (this crate's spans down to DEBUG, others' from
/// WARN), so traces do not depend on the log level, and without an endpoint the subscriber is
/// the logs' alone, as before tracing existed: debug spans cost nothing then.
pub fn init(format: LogFormat) -> Telemetry {
    let (provider, problem) = match otlp_requested().then(exporter) {
        Some(Ok(provider)) => (Some(provider), None),
        Some(Err(err)) => (None, Some(err)),
        None => (None, None),
    };
    // A second init (tests) keeps the first subscriber.
    let installed = match &provider {
        None => install_logs(format),
        Some(provider) => install_logs_and_spans(format, provider),
    };
    if let Some(err) = problem {
        tracing::error!(error = %err, "cannot export traces over OTLP; serving without them");
    }
    if installed && provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!("exporting traces over OTLP/HTTP");
    }
    Telemetry { provider }
}

fn log_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"))
}

/// Colours only for a person at a terminal: escape codes in a log file or collector are noise.
fn ansi() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// The logs alone, under one global filter.
fn install_logs(format: LogFormat) -> bool {
    let builder =
        tracing_subscriber::fmt().with_env_filter(log_filter()).with_writer(std::io::stderr).with_ansi(ansi());
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    }
    .is_ok()
}

/// The logs and the exported spans, each layer with its own filter.
fn install_logs_and_spans(format: LogFormat, provider: &SdkTracerProvider) -> bool {
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi());
    let logs = match format {
        LogFormat::Text => logs.with_filter(log_filter().and(every_time())).boxed(),
        LogFormat::Json => logs.json().with_current_span(true).with_filter(log_filter().and(every_time())).boxed(),
    };
    let filter = Targets::new()
        .with_default(Level::WARN)
        .with_target(env!("CARGO_CRATE_NAME"), Level::DEBUG)
        // The SDK's own complaints go to the logs, never into the spans it exports.
        .with_target("opentelemetry", LevelFilter::OFF);
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SERVICE_NAME))
        // Busy/idle times would read the clock on every poll; threads mean nothing to a task;
        // the target repeats `code.module.name`.
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(filter.and(every_time()));
    tracing_subscriber::registry().with(logs).with(spans).try_init().is_ok()
}

/// Joined to a per-layer filter, makes it answer "sometimes" for every callsite, so that every
/// event and span asks it again. With a cached "always", the filters' answers to an earlier
/// question that no event followed would decide the next event, and drop it: the `log` crate's
/// `log_enabled!` (which sqlx asks before every statement) is such a question (tracing issue
/// 2519).
fn every_time<S>() -> DynFilterFn<S, impl Fn(&Metadata<'_>, &Context<'_, S>) -> bool> {
    filter::dynamic_filter_fn(|_: &Metadata<'_>, _: &Context<'_, S>| true).with_max_level_hint(LevelFilter::TRACE)
}

impl Telemetry {
    /// Sends the spans still buffered and stops the exporter, waiting at most [`FLUSH_TIMEOUT`].
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        EXPORTING.store(false, Ordering::Relaxed);
        // The SDK's shutdown blocks until the export task (on this runtime) has sent the last
        // batch: wait for it on a thread of its own, and not forever (the collector may be gone).
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("otel-shutdown".into()).spawn(move || {
            let _ = done_tx.send(provider.shutdown());
        });
        if spawned.is_err() {
            return;
        }
        match tokio::time::timeout(FLUSH_TIMEOUT, done_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "the last spans may not have been exported"),
            Ok(Err(_)) | Err(_) => tracing::warn!(timeout = ?FLUSH_TIMEOUT, "the last spans were not exported in time"),
        }
    }
}

/// Whether an OTLP endpoint is configured (and the SDK not disabled), as the specification says.
fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The tracer provider: OTLP/HTTP with protobuf, batched by a task on the current runtime.
fn exporter() -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithHttpConfig;
    // http:// and https:// alike (the SDK's own hyper client knows only http://).
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
    let client = opentelemetry_http::hyper::HyperClient::new(connector, export_timeout(), None);
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().with_http_client(client).build()?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource()).build())
}

/// The request timeout of an export, from the standard variables (milliseconds; 10 s by
/// default). The SDK reads them only for a client it builds itself.
fn export_timeout() -> Duration {
    ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.trim().parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// What the spans say about their origin: the SDK's detectors (the environment), with
/// `inventory` as the service name unless the environment names one.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if named { detected } else { Resource::builder().with_service_name(SERVICE_NAME).build() }
}

/// Whether spans are exported (an endpoint is set and the exporter runs).
pub(crate) fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Continues the caller's trace in the request span: its W3C `traceparent` (and `tracestate`)
/// become the span's parent, and the trace id is recorded as the span's `trace_id`, so every log
/// line of the request carries it. Does nothing when no span is exported.
pub(crate) fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !exporting() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    // Both only take effect before the span starts, which `context()` below does.
    span.record("otel.kind", "server");
    let _ = span.set_parent(parent);
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// Names the request span after its route and records the response status, in the exported
/// span only (the logs have them already).
pub(crate) fn finish_request(span: &tracing::Span, method: &Method, route: &str, status: u16) {
    if !exporting() {
        return;
    }
    let cx = span.context();
    let exported = cx.span();
    exported.update_name(if route == "unmatched" { method.to_string() } else { format!("{method} {route}") });
    exported.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
    if status >= 500 {
        exported.set_status(Status::error(format!("answered {status}")));
    }
}
