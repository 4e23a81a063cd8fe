//! Traces over OTLP: a request's span continues the caller's W3C trace, the engine and
//! transaction spans hang beneath it, the JSON logs carry the trace id, and the last spans are
//! sent when the service stops. A small OTLP/HTTP receiver in the test stands in for the
//! collector; the service is the real binary.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::{Value, json};

use crate::drills::{self, DrillLog, Service};
use crate::helpers::{self, TestApp};

/// The caller's trace and span, as its `traceparent` names them.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// How long spans may take to arrive.
const PATIENCE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_reservation_continues_the_callers_trace_down_to_its_transaction() {
    let collector = Collector::start().await;
    let (service, app, log) = serve("traces", &collector, "100").await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 5).await;

    let res = app
        .client
        .post(app.url("/v1/reservations"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&json!({"order_id": "o-1", "lines": [{"sku": "A", "quantity": 2}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();

    let trace = collector.trace(TRACE_ID, |spans| tree(spans, "transaction").is_some()).await;
    let (server, chain) = tree(&trace, "transaction").unwrap_or_else(|| {
        panic!("no server span with a transaction beneath it in trace {TRACE_ID} ({log}): {trace:#?}")
    });
    assert_eq!(server.parent_span_id, CALLER_SPAN, "the request span's parent is the caller's span");
    assert_eq!(server.name, "POST /v1/reservations");
    assert_eq!(server.attribute("request_id"), Some(request_id.as_str()));
    assert_eq!(server.attribute("http.response.status_code"), Some("201"));
    assert!(chain.iter().any(|s| s.name == "reserve"), "the engine operation is in the chain: {chain:#?}");
    for span in &trace {
        assert_eq!(span.trace_id, TRACE_ID);
        assert_eq!(span.service, "inventory", "service.name of {span:?}");
    }

    // A log line inside a request (a 404 is logged at the default level) names its trace.
    let other_trace = "0af7651916cd43dd8448eb211c80319c";
    let res = app
        .client
        .get(app.url("/v1/reservations/01890000-0000-7000-8000-000000000000"))
        .header("traceparent", format!("00-{other_trace}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    stop(service).await;
    let lines = std::fs::read_to_string(log.path()).unwrap();
    let line = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["span"]["request_id"] == request_id.as_str() && l["fields"]["message"] == "request finished")
        .unwrap_or_else(|| panic!("no log line of request {request_id} ({log})"));
    assert_eq!(line["span"]["trace_id"], other_trace, "{line}");
    assert_eq!(line["fields"]["status"], 404, "{line}");

    // The expiry sweep ran every second meanwhile: its transactions are no traces of their own.
    let all = collector.spans.lock().unwrap().clone();
    let orphans: Vec<_> = all.iter().filter(|s| s.parent_span_id.is_empty() && s.name == "transaction").collect();
    assert!(orphans.is_empty(), "transactions exported as traces of their own: {orphans:#?}");
}

#[tokio::test]
async fn the_last_spans_are_sent_when_the_service_stops() {
    let collector = Collector::start().await;
    // Batches leave every minute: only the flush at shutdown can send these spans in time.
    let (service, app, log) = serve("traces-stop", &collector, "60000").await;
    let res = app
        .client
        .put(app.url("/v1/warehouses/W1"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&json!({"name": "W1", "priority": 1}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.spans_of(TRACE_ID).is_empty(), "nothing is sent before the batch is due");

    stop(service).await;
    let trace = collector.spans_of(TRACE_ID);
    let (server, chain) = tree(&trace, "transaction")
        .unwrap_or_else(|| panic!("the last spans were not sent at shutdown ({log}): {trace:#?}"));
    assert_eq!(server.parent_span_id, CALLER_SPAN);
    assert!(chain.iter().any(|s| s.name == "upsert_warehouse"), "{chain:#?}");
}

/// `inventory serve` on a fresh database, exporting to `collector` every `schedule_delay_ms`,
/// with JSON logs; ready, with a client.
async fn serve(name: &str, collector: &Collector, schedule_delay_ms: &str) -> (Service, TestApp, DrillLog) {
    let db_url = helpers::fresh_database().await;
    let listen = format!("127.0.0.1:{}", drills::free_port());
    let log = DrillLog::new(name);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", schedule_delay_ms),
    ];
    let args = ["--log-format", "json", "--drain-delay-secs", "0"];
    let service = Service::start_with_env(&db_url, &listen, log.path(), &args, &env);
    let app = drills::app_for(&listen, &db_url).await;
    assert!(drills::wait_ready(&app.base, Duration::from_secs(30)).await.is_some(), "service did not start ({log})");
    (service, app, log)
}

/// SIGTERM and a graceful exit, waited for off the runtime (the collector must keep answering).
async fn stop(service: Service) {
    tokio::task::spawn_blocking(move || service.stop()).await.unwrap();
}

/// The server span of `trace` and the chain of parents from a span named `leaf` up to it
/// (leaf first), if there is such a chain.
fn tree<'a>(trace: &'a [Received], leaf: &str) -> Option<(&'a Received, Vec<&'a Received>)> {
    let server = trace.iter().find(|s| s.kind == SpanKind::Server as i32)?;
    trace.iter().filter(|s| s.name == leaf).find_map(|span| {
        let mut chain = vec![span];
        let mut at = span;
        while at.span_id != server.span_id {
            at = trace.iter().find(|p| p.span_id == at.parent_span_id)?;
            chain.push(at);
        }
        Some((server, chain))
    })
}

/// A span as the collector received it, ids in hex.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: i32,
    attributes: Vec<(String, String)>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// An OTLP/HTTP receiver on a free loopback port: `POST /v1/traces`, protobuf.
struct Collector {
    /// What `OTEL_EXPORTER_OTLP_ENDPOINT` should say.
    endpoint: String,
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    async fn start() -> Self {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new().route("/v1/traces", axum::routing::post(receive)).with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { endpoint, spans }
    }

    fn spans_of(&self, trace_id: &str) -> Vec<Received> {
        self.spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
    }

    /// The spans of `trace_id` once `done` holds for them, waiting at most [`PATIENCE`].
    async fn trace(&self, trace_id: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let started = Instant::now();
        loop {
            let spans = self.spans_of(trace_id);
            if done(&spans) {
                return spans;
            }
            if started.elapsed() > PATIENCE {
                let all = self.spans.lock().unwrap().clone();
                panic!("after {PATIENCE:?}, trace {trace_id} is incomplete: {spans:#?}\nall spans received: {all:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn receive(
    State(spans): State<Arc<Mutex<Vec<Received>>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let protobuf = [(header::CONTENT_TYPE, "application/x-protobuf")];
    if headers.get(header::CONTENT_TYPE).is_none_or(|v| v != "application/x-protobuf") {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, protobuf, Vec::new());
    }
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, protobuf, Vec::new());
    };
    let mut received = spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let resource = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
        let service = attributes(&resource).into_iter().find(|(k, _)| k == "service.name").map(|(_, v)| v);
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            received.push(Received {
                service: service.clone().unwrap_or_default(),
                trace_id: hex::encode(&span.trace_id),
                span_id: hex::encode(&span.span_id),
                parent_span_id: hex::encode(&span.parent_span_id),
                name: span.name,
                kind: span.kind,
                attributes: attributes(&span.attributes),
            });
        }
    }
    (StatusCode::OK, protobuf, ExportTraceServiceResponse::default().encode_to_vec())
}

fn attributes(attributes: &[KeyValue]) -> Vec<(String, String)> {
    attributes.iter().map(|kv| (kv.key.clone(), text(kv.value.as_ref()))).collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}
