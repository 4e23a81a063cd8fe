//! The order service's API: reservations.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use uuid::Uuid;

use super::answer::{render, respond};
use super::error::{ApiError, ErrorCode};
use super::extract::{Body, IdempotencyKey, OptionalBody, Query, ReservationId, ReservationParam};
use super::openapi::{BodyErrors, Problem, QueryErrors, ReservationList, UnknownReservation};
use super::state::AppState;
use crate::domain::allocation::{Line, Strategy};
use crate::domain::{Quantity, Settle, Sku, Validator, WarehouseCode, text};
use crate::engine::Refusal;
use crate::engine::reservations::{NewReservation, PartLine};
use crate::store::reservations::{self as store, Reservation};

/// Default and bounds of `ttl_seconds`.
pub(crate) const DEFAULT_TTL: i64 = 900;
pub(crate) const MAX_TTL: i64 = 604_800;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ReserveBody {
    order_id: Option<String>,
    lines: Option<Vec<LineBody>>,
    ttl_seconds: Option<i64>,
    strategy: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct LineBody {
    sku: Option<String>,
    quantity: Option<i64>,
    warehouse: Option<String>,
}

fn ttl(raw: i64) -> Result<i64, String> {
    if (1..=MAX_TTL).contains(&raw) { Ok(raw) } else { Err(format!("must be between 1 and {MAX_TTL}")) }
}

fn parse_reservation(body: ReserveBody, state: &AppState) -> Result<NewReservation, ApiError> {
    let mut v = Validator::new();
    let order_id = v.required("order_id", body.order_id, |id| {
        let id = text(id)?;
        if id.is_empty() { Err("must not be empty".to_owned()) } else { Ok(id) }
    });
    let ttl_seconds = v.optional("ttl_seconds", body.ttl_seconds, ttl);
    let strategy = v.optional("strategy", body.strategy, |s| Strategy::parse(&s));
    let mut lines = Vec::new();
    match body.lines {
        None => v.fail("lines", "is required"),
        Some(raw) if raw.is_empty() => v.fail("lines", "must not be empty"),
        Some(raw) if raw.len() > state.config.max_reservation_lines => {
            v.fail("lines", format!("at most {} lines per reservation", state.config.max_reservation_lines))
        }
        Some(raw) => {
            for (i, line) in raw.into_iter().enumerate() {
                let sku = v.required(&format!("lines[{i}].sku"), line.sku, Sku::parse);
                let quantity = v.required(&format!("lines[{i}].quantity"), line.quantity, Quantity::parse);
                let warehouse = v.optional(&format!("lines[{i}].warehouse"), line.warehouse, WarehouseCode::parse);
                if let (Some(sku), Some(quantity), Some(warehouse)) = (sku, quantity, warehouse) {
                    lines.push(Line {
                        sku: sku.into_string(),
                        quantity: quantity.get(),
                        warehouse: warehouse.map(WarehouseCode::into_string),
                    });
                }
            }
        }
    }
    if let Some(Some(Strategy::Single)) = strategy {
        let mut pins: Vec<&str> = lines.iter().filter_map(|l| l.warehouse.as_deref()).collect();
        pins.sort_unstable();
        pins.dedup();
        if pins.len() > 1 {
            v.fail("lines", "strategy single cannot honour lines pinned to different warehouses");
        }
    }
    Ok(v.finish(|| {
        Some(NewReservation {
            order_id: order_id?,
            lines,
            ttl_seconds: ttl_seconds?.unwrap_or(DEFAULT_TTL),
            strategy: strategy?.unwrap_or_default(),
        })
    })?)
}

#[utoipa::path(operation_id = "reserveStock", post, path = "/v1/reservations", tag = "reservations", params(IdempotencyKey), request_body = ReserveBody,
    responses((status = 201, description = "held", body = Reservation),
        (status = 409, description = "insufficient_stock (every short line under `lines`) or duplicate_order (with `reservation_id`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown SKU or pinned warehouse", body = Problem, content_type = "application/problem+json"),
        BodyErrors))]
pub(crate) async fn create(
    State(state): State<AppState>,
    key: IdempotencyKey,
    body: Body<ReserveBody>,
) -> Result<Response, ApiError> {
    let req = parse_reservation(body.value, &state)?;
    let key = key.keyed(&body.raw, StatusCode::CREATED);
    let response = match state.engine.reserve(req, key).await {
        Ok(outcome) => render(outcome, StatusCode::CREATED),
        Err(err) => ApiError::from(err).into_response(),
    };
    let outcome = if response.headers().contains_key("idempotent-replayed") {
        "replayed"
    } else if response.status() == StatusCode::CREATED {
        "created"
    } else {
        response.extensions().get::<ErrorCode>().map_or("error", |c| c.0)
    };
    metrics::counter!(crate::metrics::RESERVATIONS, "outcome" => outcome).increment(1);
    Ok(response)
}

#[utoipa::path(operation_id = "planReservation", post, path = "/v1/reservations/plan", tag = "reservations", params(IdempotencyKey),
    request_body = ReserveBody,
    responses((status = 200, description = "what would be held now; nothing is", body = crate::engine::reservations::Plan),
        (status = 409, description = "insufficient_stock or duplicate_order", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown SKU or pinned warehouse", body = Problem, content_type = "application/problem+json"),
        BodyErrors))]
pub(crate) async fn plan(
    State(state): State<AppState>,
    key: IdempotencyKey,
    body: Body<ReserveBody>,
) -> Result<Response, ApiError> {
    let req = parse_reservation(body.value, &state)?;
    let key = key.keyed(&body.raw, StatusCode::OK);
    respond(state.engine.plan(&req, key.as_ref()).await, StatusCode::OK)
}

#[utoipa::path(operation_id = "getReservation", get, path = "/v1/reservations/{id}", tag = "reservations",
    params(ReservationParam),
    responses((status = 200, description = "the reservation", body = Reservation),
        QueryErrors, UnknownReservation))]
pub(crate) async fn get(State(state): State<AppState>, id: ReservationId) -> Result<Response, ApiError> {
    let id = id.get()?;
    let mut conn = state.db.acquire().await?;
    let reservation = store::get(&mut conn, id).await?.ok_or_else(|| Refusal::UnknownReservation(id.to_string()))?;
    Ok(axum::Json(reservation).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ByOrder {
    order_id: Option<String>,
}

#[utoipa::path(operation_id = "listReservations", get, path = "/v1/reservations", tag = "reservations", params(ByOrder),
    responses((status = 200, description = "the reservation of the order (or none)", body = ReservationList),
        (status = 422, description = "`order_id` is missing", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn list(State(state): State<AppState>, Query(q): Query<ByOrder>) -> Result<Response, ApiError> {
    let order_id = q.order_id.ok_or_else(|| ApiError::field("order_id", "is required"))?;
    let mut conn = state.db.acquire().await?;
    let mut items = Vec::new();
    if let Some(id) = store::id_of_order(&mut conn, &order_id).await?
        && let Some(reservation) = store::get(&mut conn, id).await?
    {
        items.push(reservation);
    }
    Ok(axum::Json(ReservationList { items }).into_response())
}

/// Unknown fields are refused: a misspelt `lines` must not turn a partial fulfil into a full one.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettleBody {
    lines: Option<Vec<PartBody>>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartBody {
    sku: Option<String>,
    warehouse: Option<String>,
    quantity: Option<i64>,
}

fn parse_parts(body: Option<SettleBody>) -> Result<Option<Vec<PartLine>>, ApiError> {
    let Some(raw) = body.and_then(|b| b.lines) else { return Ok(None) };
    let mut v = Validator::new();
    if raw.is_empty() {
        v.fail("lines", "must not be empty (omit it to settle everything)");
    }
    let mut parts = Vec::new();
    for (i, p) in raw.into_iter().enumerate() {
        let sku = v.required(&format!("lines[{i}].sku"), p.sku, Sku::parse);
        let warehouse = v.required(&format!("lines[{i}].warehouse"), p.warehouse, WarehouseCode::parse);
        let quantity = v.required(&format!("lines[{i}].quantity"), p.quantity, Quantity::parse);
        if let (Some(sku), Some(warehouse), Some(quantity)) = (sku, warehouse, quantity) {
            parts.push(PartLine {
                sku: sku.into_string(),
                warehouse: warehouse.into_string(),
                quantity: quantity.get(),
            });
        }
    }
    Ok(Some(v.finish(|| Some(parts))?))
}

async fn settle(
    state: AppState,
    key: IdempotencyKey,
    id: Uuid,
    body: OptionalBody<SettleBody>,
    kind: Settle,
) -> Result<Response, ApiError> {
    let parts = parse_parts(body.value)?;
    let key = key.keyed(&body.raw, StatusCode::OK);
    respond(state.engine.settle(id, kind, parts, key.as_ref()).await, StatusCode::OK)
}

/// Fulfil and release are mirror images: one handler each, made by one definition.
macro_rules! settle_handler {
    ($name:ident, $operation:literal, $kind:expr, $path:literal, $done:literal, $conflicts:literal) => {
        #[utoipa::path(operation_id = $operation, post, path = $path, tag = "reservations", params(ReservationParam, IdempotencyKey),
            request_body = Option<SettleBody>,
            responses((status = 200, description = $done, body = Reservation),
                (status = 409, description = $conflicts, body = Problem, content_type = "application/problem+json"),
                BodyErrors, UnknownReservation))]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            key: IdempotencyKey,
            id: ReservationId,
            body: OptionalBody<SettleBody>,
        ) -> Result<Response, ApiError> {
            settle(state, key, id.get()?, body, $kind).await
        }
    };
}

settle_handler!(
    fulfil,
    "fulfilReservation",
    Settle::Fulfil,
    "/v1/reservations/{id}/fulfil",
    "after deducting",
    "over_fulfilment, insufficient_stock (backordered hold) or reservation_not_active"
);
settle_handler!(
    release,
    "releaseReservation",
    Settle::Release,
    "/v1/reservations/{id}/release",
    "after giving units back",
    "over_release or reservation_not_active"
);

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ExtendBody {
    ttl_seconds: Option<i64>,
}

#[utoipa::path(operation_id = "extendReservation", post, path = "/v1/reservations/{id}/extend", tag = "reservations",
    params(ReservationParam, IdempotencyKey), request_body = ExtendBody,
    responses((status = 200, description = "with the new expires_at", body = Reservation),
        (status = 409, description = "reservation_not_active", body = Problem, content_type = "application/problem+json"),
        BodyErrors, UnknownReservation))]
pub(crate) async fn extend(
    State(state): State<AppState>,
    key: IdempotencyKey,
    id: ReservationId,
    body: Body<ExtendBody>,
) -> Result<Response, ApiError> {
    let id = id.get()?;
    let mut v = Validator::new();
    let ttl_seconds = v.required("ttl_seconds", body.value.ttl_seconds, ttl);
    let ttl_seconds = v.finish(|| ttl_seconds)?;
    let key = key.keyed(&body.raw, StatusCode::OK);
    respond(state.engine.extend(id, ttl_seconds, key.as_ref()).await, StatusCode::OK)
}
