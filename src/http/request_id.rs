//! Request ids and the request span: every request gets an `x-request-id` (the client's, when it
//! sends a sane one, or a new UUIDv7), echoed in the response and put in every problem body.

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Counter, Histogram};
use tracing::Instrument;

pub(crate) const HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served by this task, if any.
pub(crate) fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

fn usable(value: &HeaderValue) -> Option<String> {
    let s = value.to_str().ok()?;
    (!s.is_empty() && s.len() <= 200 && s.bytes().all(|b| b.is_ascii_graphic())).then(|| s.to_owned())
}

/// The outermost step of every request: assigns the id, opens the request span (continuing the
/// caller's trace when spans are exported), runs `serve` in both, logs the outcome.
pub(crate) async fn scope<F, Fut>(request: Request, serve: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let id = request.headers().get(HEADER).and_then(usable).unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let method = request.method().clone();
    let span = tracing::info_span!(
        "request",
        %method,
        route = tracing::field::Empty,
        request_id = %id,
        api_key = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        otel.kind = tracing::field::Empty
    );
    crate::telemetry::continue_trace(&span, request.headers());
    let started = Instant::now();
    let mut response = REQUEST_ID.scope(id.clone(), serve(request).instrument(span.clone())).await;
    let status = response.status().as_u16();
    let route = response.extensions().get::<Route>().map_or("unmatched", |r| r.0.as_str());
    let elapsed = started.elapsed();
    crate::telemetry::finish_request(&span, &method, route, status);
    let (requests, duration) = http_metrics(method_label(&method), route, status);
    requests.increment(1);
    duration.record(elapsed.as_secs_f64());
    span.in_scope(|| {
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        // Successes are the bulk at flash-sale rates: an access log of every request costs a
        // fifth of the throughput, so it is opt-in (`RUST_LOG=info,inventory::http=debug`);
        // metrics count every request anyway.
        if status >= 500 {
            tracing::warn!(status, latency_ms, "request finished");
        } else if status >= 400 {
            tracing::info!(status, latency_ms, "request finished");
        } else {
            tracing::debug!(status, latency_ms, "request finished");
        }
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}

/// The request counter and duration histogram of one method, route and status. Label values
/// come from fixed sets only (known methods, route templates, status codes), so no client can
/// grow the number of series: an unknown method is `other`, an unmatched path is `unmatched`.
/// Each series is registered once and its handles kept: a request only counts.
fn http_metrics(method: &'static str, route: &str, status: u16) -> (Counter, Histogram) {
    type Series = HashMap<(&'static str, u16), (Counter, Histogram)>;
    static KNOWN: LazyLock<RwLock<HashMap<Box<str>, Series>>> = LazyLock::new(Default::default);
    let known = KNOWN.read().unwrap_or_else(|e| e.into_inner());
    if let Some(handles) = known.get(route).and_then(|series| series.get(&(method, status))) {
        return handles.clone();
    }
    drop(known);
    let labels = [("method", method.to_owned()), ("route", route.to_owned()), ("status", status.to_string())];
    let handles = (
        metrics::counter!(crate::metrics::HTTP_REQUESTS, &labels),
        metrics::histogram!(crate::metrics::HTTP_DURATION, &labels),
    );
    let mut known = KNOWN.write().unwrap_or_else(|e| e.into_inner());
    known.entry(route.into()).or_default().insert((method, status), handles.clone());
    handles
}

/// The method as a metrics label: one of the standard methods, else `other`.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::PATCH, "PATCH"),
        (Method::DELETE, "DELETE"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::TRACE, "TRACE"),
        (Method::CONNECT, "CONNECT"),
    ];
    KNOWN.iter().find(|(known, _)| known == method).map_or("other", |&(_, label)| label)
}

/// The matched route template of a request, carried out on its response.
#[derive(Debug, Clone)]
struct Route(MatchedPath);

/// Route-level middleware: records the matched route template (never the raw path) in the span
/// and hands it to the outer layer for metrics.
pub(crate) async fn record_route(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned();
    if let Some(route) = &route {
        tracing::Span::current().record("route", route.as_str());
    }
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(Route(route));
    }
    response
}
