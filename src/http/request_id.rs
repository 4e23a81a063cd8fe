//! Request ids and the request span: every request gets an `x-request-id` (the client's, when it
//! sends a sane one, or a new UUIDv7), echoed in the response and put in every problem body.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
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

/// Outermost middleware: assigns the id, opens the request span (continuing the caller's trace
/// when spans are exported), logs the outcome.
pub(crate) async fn layer(request: Request, next: Next) -> Response {
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
    let mut response = REQUEST_ID.scope(id.clone(), next.run(request).instrument(span.clone())).await;
    let status = response.status().as_u16();
    let route = response.extensions().get::<Route>().map_or("unmatched", |r| r.0.as_str()).to_owned();
    let elapsed = started.elapsed();
    crate::telemetry::finish_request(&span, &method, &route, status);
    // Label values come from fixed sets only (known methods, route templates, status codes), so
    // no client can grow the number of series: an unknown method is `other`, an unmatched path
    // is `unmatched`.
    let labels = [("method", method_label(&method)), ("route", route), ("status", status.to_string())];
    metrics::counter!(crate::metrics::HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(crate::metrics::HTTP_DURATION, &labels).record(elapsed.as_secs_f64());
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

/// The method as a metrics label: one of the standard methods, else `other`.
fn method_label(method: &axum::http::Method) -> String {
    use axum::http::Method;
    let known = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::TRACE,
        Method::CONNECT,
    ];
    if known.contains(method) { method.as_str().to_owned() } else { "other".to_owned() }
}

/// The matched route template of a request, carried out on its response.
#[derive(Debug, Clone)]
struct Route(String);

/// Route-level middleware: records the matched route template (never the raw path) in the span
/// and hands it to the outer layer for metrics.
pub(crate) async fn record_route(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    if let Some(route) = &route {
        tracing::Span::current().record("route", route.as_str());
    }
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(Route(route));
    }
    response
}
