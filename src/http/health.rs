//! Liveness and readiness.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;
use crate::db::MIGRATOR;
use crate::error::ApiError;

/// The process is up.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "operations",
    responses(
        (status = 400, description = "malformed request (bad query values, a NUL byte in the path or query)", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        (status = 200, description = "the process is up", body = crate::http::openapi::Health)
    )
)]
pub async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The database is reachable and every migration this binary knows is applied.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "operations",
    responses(
        (status = 400, description = "malformed request (bad query values, a NUL byte in the path or query)", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        (status = 200, description = "database reachable, migrations applied", body = crate::http::openapi::Health),
        (status = 503, description = "not ready", body = crate::http::openapi::Problem, content_type = "application/problem+json")
    )
)]
pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let expected = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
        .fetch_one(&state.db)
        .await
        .map_err(|err| match ApiError::from(err) {
            // Reachable but not migrated (no table yet) is "not ready", not a server error.
            ApiError::Database(sqlx::Error::Database(db)) => ApiError::Unavailable(format!("database not ready: {db}")),
            other => other,
        })?;
    if applied.unwrap_or(0) < expected {
        return Err(ApiError::Unavailable(format!("migrations pending: at {applied:?}, need {expected}")));
    }
    Ok(Json(json!({"status": "ok", "migration": expected})))
}
