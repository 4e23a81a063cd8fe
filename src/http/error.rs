//! Every error answer of the API: the one place where refusals and failures become HTTP status
//! codes and RFC 9457 problem+json bodies.
//!
//! Database and unexpected errors are logged with their cause and answered with a body that
//! reveals nothing about them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::domain::FieldError;
use crate::engine::{Answer, Error, Refusal};
use crate::store::db::Trouble;

/// The `code` of an error answer, left in the response's extensions for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ErrorCode(pub &'static str);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The body is not valid JSON, has wrong types, or a query parameter has a bad value.
    #[error("{0}")]
    Malformed(String),
    /// Well-formed input with invalid values.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// No such route.
    #[error("{0}")]
    NotFound(String),
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
    /// The request ran out of time; it may or may not have committed.
    #[error("the request took longer than {0:?}")]
    Timeout(std::time::Duration),
    /// The engine's definite answer.
    #[error(transparent)]
    Refused(Refusal),
    /// The engine could not decide: the database, an unknown commit outcome, a bug. (A
    /// refusal inside is answered as a refusal.)
    #[error(transparent)]
    Failed(Error),
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Refused(refusal) => Self::Refused(refusal),
            other => Self::Failed(other),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        Self::Failed(Error::Database(err))
    }
}

impl From<Vec<FieldError>> for ApiError {
    fn from(errors: Vec<FieldError>) -> Self {
        Self::Validation(errors)
    }
}

impl ApiError {
    pub(crate) fn field(field: &str, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }

    /// The engine's refusal, however it was wrapped.
    fn refusal(&self) -> Option<&Refusal> {
        match self {
            Self::Refused(refusal) | Self::Failed(Error::Refused(refusal)) => Some(refusal),
            _ => None,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        if let Some(refusal) = self.refusal() {
            return refusal_status(refusal);
        }
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Refused(refusal) => refusal_status(refusal),
            Self::Failed(Error::OutcomeUnknown(_)) => StatusCode::GATEWAY_TIMEOUT,
            Self::Failed(err) => match err.trouble() {
                Some(Trouble::Down | Trouble::Busy) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        if let Some(refusal) = self.refusal() {
            return refusal.code();
        }
        match self {
            Self::Malformed(_) => "malformed_request",
            Self::Validation(_) => "validation_failed",
            Self::NotFound(_) => "not_found",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Timeout(_) | Self::Failed(Error::OutcomeUnknown(_)) => "outcome_unknown",
            Self::Refused(refusal) => refusal.code(),
            Self::Failed(err) => match err.trouble() {
                Some(Trouble::Down | Trouble::Busy) => "unavailable",
                _ => "internal_error",
            },
        }
    }

    /// The client-facing explanation. Database and internal errors say nothing about their cause.
    fn public_detail(&self) -> String {
        const NOTHING_CHANGED: &str = "an unexpected error occurred; the request changed nothing";
        match (self, self.refusal()) {
            (_, Some(Refusal::Invalid(errors))) | (Self::Validation(errors), _) => {
                return format!("{} field(s) are invalid", errors.len());
            }
            (_, Some(refusal)) => return refusal.to_string(),
            _ => {}
        }
        match self {
            Self::Timeout(limit) => format!(
                "the request took longer than {limit:?}; it may or may not have taken effect: \
                 retry with the same Idempotency-Key, or look the result up"
            ),
            Self::Failed(Error::OutcomeUnknown(_)) => "the database connection broke while the change was being \
                 committed; it may or may not have taken effect: retry with the same Idempotency-Key, or look the \
                 result up"
                .into(),
            Self::Failed(Error::Unavailable(_)) => "the service is unavailable; the request changed nothing".into(),
            Self::Failed(err) => match err.trouble() {
                Some(Trouble::Down) => "the database is unavailable; the request changed nothing".into(),
                Some(Trouble::Busy) => {
                    "the stock row is busy (lock or statement timeout); the request changed nothing".into()
                }
                _ => NOTHING_CHANGED.into(),
            },
            other => other.to_string(),
        }
    }

    fn extension_members(&self) -> Map<String, Value> {
        let mut map = Map::new();
        let mut put = |key: &str, value: Value| {
            map.insert(key.to_owned(), value);
        };
        if let Self::Validation(errors) = self {
            put("errors", json!(errors));
        }
        match self.refusal() {
            Some(Refusal::Invalid(errors) | Refusal::UnknownInRows(errors)) => put("errors", json!(errors)),
            Some(Refusal::InsufficientStock { lines, .. }) => put("lines", json!(lines)),
            Some(Refusal::DuplicateOrder { order_id, reservation_id }) => {
                put("reservation_id", json!(reservation_id.to_string()));
                put("order_id", json!(order_id));
            }
            Some(Refusal::PartlyFulfilled { reservation_id }) => {
                put("reservation_id", json!(reservation_id.to_string()));
            }
            Some(Refusal::NotActive { reservation_id, status }) => {
                put("reservation_status", json!(status.as_str()));
                put("reservation_id", json!(reservation_id.to_string()));
            }
            Some(Refusal::OverSettle { sku, warehouse, requested, held, .. }) => {
                put("sku", json!(sku));
                put("warehouse", json!(warehouse));
                put("requested", json!(requested));
                put("held", json!(held));
            }
            Some(Refusal::StaleQuantity { current_on_hand }) => {
                put("current_on_hand", json!(current_on_hand));
                put("on_hand", json!(current_on_hand));
            }
            Some(Refusal::BackorderLimitInUse { warehouse, available, .. }) => {
                put("warehouse", json!(warehouse));
                put("available", json!(available));
            }
            _ => {}
        }
        map
    }

    /// The problem+json body, as sent to clients.
    pub(crate) fn to_problem(&self) -> Value {
        let status = self.status();
        let code = self.code();
        let mut body = Map::new();
        body.insert("type".into(), json!(format!("https://inventory.example/problems/{}", code.replace('_', "-"))));
        body.insert("title".into(), json!(status.canonical_reason().unwrap_or("Error")));
        body.insert("status".into(), json!(status.as_u16()));
        body.insert("detail".into(), json!(self.public_detail()));
        body.insert("code".into(), json!(code));
        if let Some(id) = super::request_id::current() {
            body.insert("request_id".into(), json!(id));
        }
        // Extension members never replace the RFC 9457 ones.
        for (key, value) in self.extension_members() {
            body.entry(key).or_insert(value);
        }
        Value::Object(body)
    }
}

fn refusal_status(refusal: &Refusal) -> StatusCode {
    match refusal {
        Refusal::UnknownSku(_)
        | Refusal::UnknownWarehouse(_)
        | Refusal::UnknownReservation(_)
        | Refusal::UnknownChannel(_)
        | Refusal::UnknownWebhook(_)
        | Refusal::UnknownInRows(_) => StatusCode::NOT_FOUND,
        Refusal::InsufficientStock { .. }
        | Refusal::DuplicateOrder { .. }
        | Refusal::NotActive { .. }
        | Refusal::PartlyFulfilled { .. }
        | Refusal::OverSettle { .. }
        | Refusal::StaleQuantity { .. }
        | Refusal::BackorderLimitInUse { .. }
        | Refusal::IdempotencyInProgress => StatusCode::CONFLICT,
        Refusal::IdempotencyKeyReused | Refusal::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Refusal::TooManyStreams(_) => StatusCode::TOO_MANY_REQUESTS,
        Refusal::NotCsv(_) => StatusCode::BAD_REQUEST,
        Refusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
    }
}

/// A refusal written down as it is answered, for the engine to store for replay.
pub(crate) fn answer_of(refusal: &Refusal) -> Answer {
    let err = ApiError::Refused(refusal.clone());
    Answer { status: err.status().as_u16(), body: err.to_problem().to_string() }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_has_the_rfc9457_members_and_a_code() {
        let err = ApiError::Refused(Refusal::InsufficientStock {
            detail: "short".into(),
            lines: vec![crate::domain::Shortage { sku: "A".into(), requested: 3, available: 1 }],
        });
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
        let err = ApiError::from(sqlx::Error::ColumnNotFound("secret_column".into()));
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!err.to_problem().to_string().contains("secret_column"));
        let down = ApiError::from(sqlx::Error::PoolTimedOut);
        assert_eq!((down.status(), down.code()), (StatusCode::SERVICE_UNAVAILABLE, "unavailable"));
    }
}
