//! What operators and their tools call: liveness, readiness, Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::openapi::{Health, Problem, QueryErrors};
use super::state::AppState;
use crate::engine::Error;
use crate::metrics::{POOL_CONNECTIONS, POOL_MAX};
use crate::store::db::{self, MIGRATOR};

/// The process is up.
#[utoipa::path(operation_id = "getLiveness",
    summary = "Is the process up?",
    description = "Answers 200 while the process runs; touches no database. For a liveness probe.",
    get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "the process is up", body = Health), QueryErrors))]
pub(crate) async fn live() -> Json<Health> {
    Json(Health { status: "ok", migration: None })
}

/// The database is reachable and every migration this binary knows is applied.
#[utoipa::path(operation_id = "getReadiness",
    summary = "Can the service take traffic?",
    description = "200 when the database is reachable and every migration this binary knows is applied; 503 while it is not, and from the moment a SIGTERM starts the drain. For a readiness probe or a load balancer's health check.",
    get, path = "/health/ready", tag = "operations",
    responses((status = 200, description = "database reachable, migrations applied", body = Health),
        (status = 503, description = "not ready", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn ready(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::Unavailable("draining: the service is shutting down".into()).into());
    }
    let expected = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied = db::applied_migration(&state.db).await.map_err(|err| match err {
        // Reachable but not migrated (no table yet) is "not ready", not a server error.
        sqlx::Error::Database(db) => Error::Unavailable(format!("database not ready: {db}")),
        other => Error::Database(other),
    })?;
    if applied.unwrap_or(0) < expected {
        return Err(Error::Unavailable(format!("migrations pending: at {applied:?}, need {expected}")).into());
    }
    Ok(Json(Health { status: "ok", migration: Some(expected) }))
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(operation_id = "getMetrics",
    summary = "Prometheus metrics",
    description = "Counters, gauges and histograms in the Prometheus text format (every metric with `# HELP` and `# TYPE`, names prefixed `inventory_`). Public unless the service runs with `--metrics-public false`, then it needs the read role.",
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        QueryErrors))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let idle = state.db.pool().num_idle();
    metrics::gauge!(POOL_CONNECTIONS, "state" => "in_use")
        .set(state.db.pool().size().saturating_sub(idle as u32) as f64);
    metrics::gauge!(POOL_CONNECTIONS, "state" => "idle").set(idle as f64);
    metrics::gauge!(POOL_MAX).set(state.db.pool().options().get_max_connections() as f64);
    crate::metrics::sample();
    let handle = crate::metrics::handle();
    handle.run_upkeep();
    let mut response = handle.render().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}
