//! Turning the engine's outcomes into HTTP answers.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::ApiError;
use crate::engine::{Answer, Outcome};

/// The HTTP answer of an outcome. Call it in the request's own task (a replayed problem names
/// the current request id).
pub(crate) fn render(outcome: Outcome, success: StatusCode) -> Response {
    match outcome {
        Outcome::Done(body) => json_response(success, body, false),
        Outcome::Replay(Answer { status, body }) => {
            metrics::counter!(crate::metrics::IDEMPOTENT_REPLAYS).increment(1);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            json_response(status, with_current_request_id(status, body), true)
        }
        Outcome::Refused(refusal) => ApiError::Refused(refusal).into_response(),
    }
}

/// [`render`] of an engine result.
pub(crate) fn respond(result: crate::engine::Result<Outcome>, success: StatusCode) -> Result<Response, ApiError> {
    Ok(render(result?, success))
}

fn json_response(status: StatusCode, body: String, replayed: bool) -> Response {
    let content_type = if status.is_success() { "application/json" } else { "application/problem+json" };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// A replayed problem names the request being answered now, not the first one.
fn with_current_request_id(status: StatusCode, body: String) -> String {
    if status.is_success() {
        return body;
    }
    match (serde_json::from_str::<Value>(&body), super::request_id::current()) {
        (Ok(Value::Object(mut map)), Some(id)) => {
            map.insert("request_id".into(), Value::String(id));
            Value::Object(map).to_string()
        }
        _ => body,
    }
}
