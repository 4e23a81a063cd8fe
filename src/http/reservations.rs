//! The order service's API: reservations.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use uuid::Uuid;

use super::answer::{render, respond};
use super::error::{ApiError, ErrorCode};
use super::extract::{Body, IdempotencyKey, OptionalBody, Query, ReservationId, ReservationParam, whole_number};
use super::openapi::{BodyErrors, Problem, QueryErrors, ReservationList, UnknownReservation};
use super::schemas::{OrderId, TtlSeconds};
use super::state::AppState;
use crate::domain::allocation::{Line, Strategy};
use crate::domain::{ChannelCode, Quantity, Settle, Sku, Validator, WarehouseCode, text};
use crate::engine::Refusal;
use crate::engine::reservations::{Edit, NewReservation, PartLine};
use crate::store::reservations::{self as store, Reservation};

/// Default and bounds of `ttl_seconds`.
pub(crate) const DEFAULT_TTL: i64 = 900;
pub(crate) const MAX_TTL: i64 = 604_800;

/// An order to hold stock for.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"order_id": "1001", "lines": [{"sku": "TSHIRT-M", "quantity": 3}], "ttl_seconds": 900}))]
pub(crate) struct ReserveBody {
    #[schema(value_type = OrderId)]
    order_id: Option<String>,
    /// One line per SKU (or per SKU and pinned warehouse); at most `--max-reservation-lines` (100).
    #[schema(value_type = Vec<LineBody>, min_items = 1, max_items = 100)]
    lines: Option<Vec<LineBody>>,
    /// Default 900.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Option<TtlSeconds>)]
    ttl_seconds: Option<i64>,
    /// Default `priority`.
    #[schema(value_type = Option<Strategy>)]
    strategy: Option<String>,
    /// The sales channel the order comes from: lines are allocated only from its active
    /// warehouses, in its order of preference, and `order_id` is unique within it.
    #[schema(value_type = Option<ChannelCode>)]
    channel: Option<String>,
}

/// One line of an order.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct LineBody {
    #[schema(value_type = Sku)]
    sku: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Quantity, required = true)]
    quantity: Option<i64>,
    /// Take the line from this warehouse only.
    #[schema(value_type = Option<WarehouseCode>)]
    warehouse: Option<String>,
}

fn order_id(raw: String) -> Result<String, String> {
    let id = text(raw)?;
    if id.is_empty() { Err("must not be empty".to_owned()) } else { Ok(id) }
}

fn ttl(raw: i64) -> Result<i64, String> {
    if (1..=MAX_TTL).contains(&raw) { Ok(raw) } else { Err(format!("must be between 1 and {MAX_TTL}")) }
}

/// The lines of an order (new or changed): at least one, at most `--max-reservation-lines`.
fn parse_lines(v: &mut Validator, raw: Option<Vec<LineBody>>, state: &AppState) -> Vec<Line> {
    let mut lines = Vec::new();
    match raw {
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
    lines
}

fn parse_reservation(body: ReserveBody, state: &AppState) -> Result<NewReservation, ApiError> {
    let mut v = Validator::new();
    let order_id = v.required("order_id", body.order_id, order_id);
    let ttl_seconds = v.optional("ttl_seconds", body.ttl_seconds, ttl);
    let strategy = v.optional("strategy", body.strategy, |s| Strategy::parse(&s));
    let channel = v.optional("channel", body.channel, ChannelCode::parse);
    let lines = parse_lines(&mut v, body.lines, state);
    // `single` with lines pinned to different warehouses cannot be met by any one warehouse: the
    // engine answers 409 insufficient_stock, as for any order no single warehouse can fill.
    Ok(v.finish(|| {
        Some(NewReservation {
            order_id: order_id?,
            channel: channel?.map(ChannelCode::into_string),
            lines,
            ttl_seconds: ttl_seconds?.unwrap_or(DEFAULT_TTL),
            strategy: strategy?.unwrap_or_default(),
        })
    })?)
}

#[utoipa::path(operation_id = "reserveStock",
    summary = "Hold stock for an order",
    description = "Allocates every line in one transaction, all or nothing: each line from the preferred warehouses first (`strategy: priority`) or the whole order from one warehouse (`single`); a line with `warehouse` is taken from that warehouse only. The hold expires after `ttl_seconds` (then released within 5 s) unless fulfilled, released or extended. With `channel`, lines are allocated only from that channel's active warehouses, in its order of preference; a line pinned to a warehouse outside it is 422. One reservation per `order_id` and channel: a second is 409 `duplicate_order`. Not enough stock: 409 `insufficient_stock` with every short line.",
    post, path = "/v1/reservations", tag = "reservations", request_body = ReserveBody,
    responses((status = 201, description = "held", body = Reservation),
        (status = 409, description = "insufficient_stock (every short line under `lines`) or duplicate_order (with `reservation_id`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown SKU, pinned warehouse or channel", body = Problem, content_type = "application/problem+json"),
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

#[utoipa::path(operation_id = "planReservation",
    summary = "Preview an allocation",
    description = "What `POST /v1/reservations` would allocate now, with the same checks and answers; nothing is held.",
    post, path = "/v1/reservations/plan", tag = "reservations", 
    request_body = ReserveBody,
    responses((status = 200, description = "what would be held now; nothing is", body = crate::engine::reservations::Plan),
        (status = 409, description = "insufficient_stock or duplicate_order", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown SKU, pinned warehouse or channel", body = Problem, content_type = "application/problem+json"),
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

#[utoipa::path(operation_id = "getReservation",
    summary = "Get a reservation",
    description = "A reservation with its lines and allocations (held, fulfilled, released per warehouse) and its status.",
    get, path = "/v1/reservations/{id}", tag = "reservations",
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
    /// The order service's id of the order.
    #[param(value_type = OrderId, required = true)]
    order_id: Option<String>,
    /// Only the reservation made in this sales channel.
    #[param(value_type = Option<ChannelCode>)]
    channel: Option<String>,
}

#[utoipa::path(operation_id = "listReservations",
    summary = "Find the reservations of an order",
    description = "The reservations made for `order_id`: with `channel`, the one made in that channel (a list of at most one); without, those of every channel and the one made without a channel, oldest first.",
    get, path = "/v1/reservations", tag = "reservations", params(ByOrder),
    responses((status = 200, description = "the reservation of the order (or none)", body = ReservationList),
        (status = 422, description = "`order_id` is missing", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn list(State(state): State<AppState>, Query(q): Query<ByOrder>) -> Result<Response, ApiError> {
    let mut v = Validator::new();
    let order_id = v.required("order_id", q.order_id, order_id);
    let channel = v.optional("channel", q.channel, ChannelCode::parse);
    let (order_id, channel) = v.finish(|| Some((order_id?, channel?)))?;
    let mut conn = state.db.acquire().await?;
    let mut items = Vec::new();
    for id in store::ids_of_order(&mut conn, &order_id, channel.as_ref().map(ChannelCode::as_str)).await? {
        items.extend(store::get(&mut conn, id).await?);
    }
    Ok(axum::Json(ReservationList { items }).into_response())
}

/// What to settle: some lines, or (without `lines`, or without a body) everything still held.
/// Unknown fields are refused: a misspelt `lines` must not turn a partial fulfil into a full one.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"lines": [{"sku": "TSHIRT-M", "warehouse": "BER", "quantity": 1}]}))]
pub(crate) struct SettleBody {
    #[schema(value_type = Option<Vec<PartBody>>, min_items = 1)]
    lines: Option<Vec<PartBody>>,
}

/// Part of one allocation.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartBody {
    #[schema(value_type = Sku)]
    sku: Option<String>,
    #[schema(value_type = WarehouseCode)]
    warehouse: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Quantity, required = true)]
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
    ($name:ident, $operation:literal, $summary:literal, $description:literal, $kind:expr, $path:literal, $done:literal, $conflicts:literal) => {
        #[utoipa::path(operation_id = $operation, summary = $summary, description = $description, post, path = $path, tag = "reservations", params(ReservationParam),
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
    "Ship reserved units",
    "Deducts shipped units: `on_hand` and `reserved` both go down. Without a body (or without `lines`), everything still held is fulfilled; with `lines`, those quantities from those allocations. More than is held is 409 `over_fulfilment`; a reservation that is no longer active is 409 `reservation_not_active`. When nothing is held any more, the reservation is `fulfilled` (or `released`, if nothing was ever shipped).",
    Settle::Fulfil,
    "/v1/reservations/{id}/fulfil",
    "after deducting",
    "over_fulfilment, insufficient_stock (backordered hold) or reservation_not_active"
);
settle_handler!(
    release,
    "releaseReservation",
    "Give reserved units back",
    "Returns held units to available stock (an order cancelled, a line removed). Without a body (or without `lines`), everything still held is released; with `lines`, those quantities from those allocations. More than is held is 409 `over_release`; a reservation that is no longer active is 409 `reservation_not_active`.",
    Settle::Release,
    "/v1/reservations/{id}/release",
    "after giving units back",
    "over_release or reservation_not_active"
);

/// The complete new set of lines of an open reservation.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"lines": [{"sku": "TSHIRT-M", "quantity": 2}, {"sku": "CAP", "quantity": 1}]}))]
pub(crate) struct LinesBody {
    /// Every line the order now has (at least one); a SKU left out is released entirely.
    #[schema(value_type = Vec<LineBody>, min_items = 1, max_items = 100)]
    lines: Option<Vec<LineBody>>,
    /// When given, the deadline also moves to now + this.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Option<TtlSeconds>)]
    ttl_seconds: Option<i64>,
}

#[utoipa::path(operation_id = "putReservationLines",
    summary = "Change an open order's lines",
    description = "Replaces the reservation's lines with the complete new set, in one transaction, all or nothing. Per SKU the hold grows or shrinks to the new quantity: units already held stay where they are; extra units are allocated as a new reservation of the same channel and strategy would be, from what is available now; a shrink gives back the least preferred warehouse's units first; a SKU left out is released entirely. Afterwards the reservation's allocations are exactly what it holds. Growth that cannot be allocated is 409 `insufficient_stock` (with `lines`: the new quantity and what the reservation could have) and nothing changes. Only an active reservation with nothing fulfilled can change: 409 `reservation_not_active` or `reservation_partly_fulfilled`. The ledger records the differences as `reserve`/`release` entries; the event feed gets `reservation.modified`. `ttl_seconds` also moves the deadline.",
    put, path = "/v1/reservations/{id}/lines", tag = "reservations",
    params(ReservationParam), request_body = LinesBody,
    responses((status = 200, description = "the reservation with its new lines", body = Reservation),
        (status = 409, description = "insufficient_stock, reservation_not_active or reservation_partly_fulfilled", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "unknown reservation, SKU or pinned warehouse", body = Problem, content_type = "application/problem+json"),
        BodyErrors))]
pub(crate) async fn change_lines(
    State(state): State<AppState>,
    key: IdempotencyKey,
    id: ReservationId,
    body: Body<LinesBody>,
) -> Result<Response, ApiError> {
    let id = id.get()?;
    let mut v = Validator::new();
    let lines = parse_lines(&mut v, body.value.lines, &state);
    let ttl_seconds = v.optional("ttl_seconds", body.value.ttl_seconds, ttl);
    let edit = v.finish(|| Some(Edit { lines, ttl_seconds: ttl_seconds? }))?;
    let key = key.keyed(&body.raw, StatusCode::OK);
    respond(state.engine.modify(id, edit, key.as_ref()).await, StatusCode::OK)
}

/// A new deadline, counted from now.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"ttl_seconds": 1800}))]
pub(crate) struct ExtendBody {
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = TtlSeconds, required = true)]
    ttl_seconds: Option<i64>,
}

#[utoipa::path(operation_id = "extendReservation",
    summary = "Extend a hold",
    description = "Sets the reservation's deadline to now + `ttl_seconds`. Only an active reservation can be extended (409 `reservation_not_active`).",
    post, path = "/v1/reservations/{id}/extend", tag = "reservations",
    params(ReservationParam), request_body = ExtendBody,
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
