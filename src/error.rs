//! The one error type of the service and its RFC 9457 problem+json rendering.
//!
//! Every status mapping lives here. Database and unexpected errors are logged with their cause
//! and answered with a body that reveals nothing about them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::domain::FieldError;

/// A line of an order, or a stock operation, that cannot be served from current stock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShortLine {
    pub sku: String,
    pub requested: i64,
    pub available: i64,
}

/// The `code` of an error answer, left in the response's extensions for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON, has wrong types, or a query parameter has a bad value.
    #[error("{0}")]
    Malformed(String),
    /// Well-formed input with invalid values.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("{0}")]
    NotFound(String),
    #[error("{detail}")]
    InsufficientStock { detail: String, lines: Vec<ShortLine> },
    #[error("on_hand is {current_on_hand}, not the expected value")]
    StaleQuantity { current_on_hand: i64 },
    /// Any other conflict with current state, with its stable code and extra members.
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String, extra: Map<String, Value> },
    /// An Idempotency-Key sent again with a different request.
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no route for this method and path")]
    MethodNotAllowed,
    /// Too many live event streams are open (in all, or for this caller).
    #[error("{0}")]
    TooManyStreams(String),
    /// The database cannot be reached, or a lock/statement timeout fired; nothing changed.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// The request ran out of time; it may or may not have committed.
    #[error("the request took longer than {0:?}")]
    Timeout(std::time::Duration),
    /// The connection broke while the transaction was committing: the change may or may not
    /// have been applied. Never answered as "nothing changed".
    #[error("the outcome of the commit is unknown: {0}")]
    OutcomeUnknown(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

/// SQLSTATEs that mean "try the whole transaction again".
const RETRYABLE_SQLSTATES: [&str; 2] = ["40001", "40P01"];

impl ApiError {
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound(what.into())
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::Conflict { code, detail: detail.into(), extra: Map::new() }
    }

    /// Adds an extension member to a `Conflict`; other variants are returned unchanged.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        if let Self::Conflict { extra, .. } = &mut self {
            extra.insert(key.to_owned(), value.into());
        }
        self
    }

    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }

    /// Classifies an error of COMMIT itself: an answer from the server (an error it raised)
    /// means the transaction rolled back; anything else (the connection broke after COMMIT
    /// was sent) leaves the outcome unknown.
    pub fn from_commit(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::Database(_) => Self::Database(err),
            other => Self::OutcomeUnknown(other.to_string()),
        }
    }

    /// The SQLSTATE of a database error, if this is one.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            Self::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }

    /// Serialization failures and deadlocks: the transaction can be run again as a whole.
    pub fn is_retryable(&self) -> bool {
        self.sqlstate().is_some_and(|code| RETRYABLE_SQLSTATES.contains(&code.as_str()))
    }

    /// A lock or statement timeout: one row (or statement) is stuck, the rest are fine.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Database(err) if database_class(err) == DbClass::Busy)
    }

    /// The database cannot be reached at all (not one row or request's trouble).
    pub fn is_database_down(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Database(err) => database_class(err) == DbClass::Unavailable,
            _ => false,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::Validation(_) | Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::InsufficientStock { .. } | Self::StaleQuantity { .. } | Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooManyStreams(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) | Self::OutcomeUnknown(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Database(err) => database_class(err).status(),
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_request",
            Self::Validation(_) => "validation_failed",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::NotFound(_) => "not_found",
            Self::InsufficientStock { .. } => "insufficient_stock",
            Self::StaleQuantity { .. } => "stale_quantity",
            Self::Conflict { code, .. } => code,
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooManyStreams(_) => "too_many_streams",
            Self::Unavailable(_) => "unavailable",
            Self::Timeout(_) | Self::OutcomeUnknown(_) => "outcome_unknown",
            Self::Database(err) => database_class(err).code(),
            Self::Internal(_) => "internal_error",
        }
    }

    /// The client-facing explanation. Database and internal errors say nothing about their cause.
    fn public_detail(&self) -> String {
        match self {
            Self::Database(err) => match database_class(err) {
                DbClass::Unavailable => "the database is unavailable; the request changed nothing".into(),
                DbClass::Busy => {
                    "the stock row is busy (lock or statement timeout); the request changed nothing".into()
                }
                DbClass::Internal => "an unexpected error occurred; the request changed nothing".into(),
            },
            Self::Internal(_) => "an unexpected error occurred; the request changed nothing".into(),
            Self::Unavailable(_) => "the service is unavailable; the request changed nothing".into(),
            Self::Timeout(limit) => format!(
                "the request took longer than {limit:?}; it may or may not have taken effect: \
                 retry with the same Idempotency-Key, or look the result up"
            ),
            Self::OutcomeUnknown(_) => "the database connection broke while the change was being committed; it may \
                 or may not have taken effect: retry with the same Idempotency-Key, or look the result up"
                .into(),
            Self::Validation(errors) => format!("{} field(s) are invalid", errors.len()),
            other => other.to_string(),
        }
    }

    fn extension_members(&self) -> Map<String, Value> {
        let mut map = Map::new();
        match self {
            Self::Validation(errors) => {
                map.insert("errors".into(), json!(errors));
            }
            Self::InsufficientStock { lines, .. } => {
                map.insert("lines".into(), json!(lines));
            }
            Self::StaleQuantity { current_on_hand } => {
                map.insert("current_on_hand".into(), json!(current_on_hand));
                map.insert("on_hand".into(), json!(current_on_hand));
            }
            Self::Conflict { extra, .. } => map.extend(extra.clone()),
            _ => {}
        }
        map
    }

    /// The problem+json body, as sent to clients.
    pub fn to_problem(&self) -> Value {
        let status = self.status();
        let code = self.code();
        let mut body = Map::new();
        body.insert("type".into(), json!(format!("https://inventory.example/problems/{}", code.replace('_', "-"))));
        body.insert("title".into(), json!(status.canonical_reason().unwrap_or("Error")));
        body.insert("status".into(), json!(status.as_u16()));
        body.insert("detail".into(), json!(self.public_detail()));
        body.insert("code".into(), json!(code));
        if let Some(id) = crate::http::request_id::current() {
            body.insert("request_id".into(), json!(id));
        }
        // Extension members never replace the RFC 9457 ones.
        for (key, value) in self.extension_members() {
            body.entry(key).or_insert(value);
        }
        Value::Object(body)
    }
}

/// How a database error looks to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DbClass {
    /// Connection refused, pool exhausted, server shutting down.
    Unavailable,
    /// lock_timeout / statement_timeout: this row is stuck, others are fine.
    Busy,
    Internal,
}

impl DbClass {
    fn status(self) -> StatusCode {
        match self {
            Self::Unavailable | Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Self::Unavailable | Self::Busy => "unavailable",
            Self::Internal => "internal_error",
        }
    }
}

fn database_class(err: &sqlx::Error) -> DbClass {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => DbClass::Unavailable,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // lock_not_available, query_canceled (statement_timeout)
            Some("55P03" | "57014") => DbClass::Busy,
            // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections
            Some("57P01" | "57P02" | "57P03" | "53300") => DbClass::Unavailable,
            Some(code) if code.starts_with("08") => DbClass::Unavailable,
            _ => DbClass::Internal,
        },
        _ => DbClass::Internal,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, code = self.code(), "request failed");
        } else {
            tracing::debug!(error = %self, code = self.code(), "request rejected");
        }
        let body = serde_json::to_vec(&self.to_problem()).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        response.extensions_mut().insert(ErrorCode(self.code()));
        response
    }
}

impl From<Vec<FieldError>> for ApiError {
    fn from(errors: Vec<FieldError>) -> Self {
        Self::Validation(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_has_the_rfc9457_members_and_a_code() {
        let err = ApiError::InsufficientStock {
            detail: "short".into(),
            lines: vec![ShortLine { sku: "A".into(), requested: 3, available: 1 }],
        };
        let body = err.to_problem();
        assert_eq!(body["status"], 409);
        assert_eq!(body["code"], "insufficient_stock");
        assert_eq!(body["lines"][0]["available"], 1);
        for member in ["type", "title", "detail"] {
            assert!(body[member].is_string(), "{member}");
        }
    }

    #[test]
    fn database_errors_reveal_nothing() {
        let err = ApiError::Database(sqlx::Error::ColumnNotFound("secret_column".into()));
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!err.to_problem().to_string().contains("secret_column"));
        let down = ApiError::Database(sqlx::Error::PoolTimedOut);
        assert_eq!((down.status(), down.code()), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"));
    }
}
