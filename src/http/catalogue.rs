//! Warehouses and SKUs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{OptionalJson, Path, whole_number};
use super::openapi::{BodyErrors, Problem, QueryErrors, WarehouseList};
use super::schemas::{Count, Name, Text};
use super::state::AppState;
use crate::domain::{Code, MAX_QUANTITY, Sku, Validator, WarehouseCode, text};
use crate::engine::Refusal;
use crate::store::catalogue::{self, SkuUpsert, WarehouseUpsert};

fn created_or_ok(created: bool) -> StatusCode {
    if created { StatusCode::CREATED } else { StatusCode::OK }
}

/// A warehouse as ops describe it; `region`, `priority` and `active` keep their values (or
/// defaults) when left out.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"name": "Berlin", "region": "EU", "priority": 10, "active": true}))]
pub(crate) struct WarehouseBody {
    #[schema(value_type = Name)]
    name: Option<String>,
    #[schema(value_type = Option<Text>)]
    region: Option<String>,
    /// Lower is preferred; default 100.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 1_000_000)]
    priority: Option<i64>,
    /// An inactive warehouse takes no new reservations; default true.
    active: Option<bool>,
}

#[utoipa::path(operation_id = "putWarehouse",
    summary = "Create or update a warehouse",
    description = "201 when the code is new, 200 when it existed. `priority` decides where unpinned lines are taken from (lower first). An inactive warehouse takes no new reservations and counts in no availability; existing reservations keep their stock there.",
    put, path = "/v1/warehouses/{code}", tag = "catalogue",
    params(("code" = WarehouseCode, Path, description = "warehouse code")), request_body = WarehouseBody,
    responses((status = 201, description = "created", body = crate::store::catalogue::Warehouse),
        (status = 200, description = "updated", body = crate::store::catalogue::Warehouse), BodyErrors))]
pub(crate) async fn put_warehouse(
    State(state): State<AppState>,
    Path(code): Path<String>,
    OptionalJson(body): OptionalJson<WarehouseBody>,
) -> Result<Response, ApiError> {
    let body = body.unwrap_or_default();
    let mut v = Validator::new();
    let code = v.check("code", WarehouseCode::parse(code));
    let name = v.required("name", body.name, |n| {
        let n = text(n)?;
        if n.trim().is_empty() { Err("must not be empty".to_owned()) } else { Ok(n) }
    });
    let region = v.optional("region", body.region, text);
    let priority = v.optional("priority", body.priority, |p| {
        i32::try_from(p).ok().filter(|p| (0..=1_000_000).contains(p)).ok_or("must be between 0 and 1000000")
    });
    let upsert = v.finish(|| {
        Some(WarehouseUpsert { code: code?, name: name?, region: region?, priority: priority?, active: body.active })
    })?;
    let (warehouse, created) = state.engine.upsert_warehouse(&upsert).await?;
    Ok((created_or_ok(created), axum::Json(warehouse)).into_response())
}

#[utoipa::path(operation_id = "getWarehouse",
    summary = "Get a warehouse",
    description = "One warehouse by its code.",
    get, path = "/v1/warehouses/{code}", tag = "catalogue",
    params(("code" = WarehouseCode, Path, description = "warehouse code")),
    responses((status = 200, description = "the warehouse", body = crate::store::catalogue::Warehouse),
        (status = 404, description = "unknown warehouse", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn get_warehouse(
    State(state): State<AppState>,
    Path(code): Path<String>,
) -> Result<Response, ApiError> {
    let mut conn = state.db.acquire().await?;
    let warehouse = catalogue::get_warehouse(&mut conn, &code).await?.ok_or(Refusal::UnknownWarehouse(code))?;
    Ok(axum::Json(warehouse).into_response())
}

#[utoipa::path(operation_id = "listWarehouses",
    summary = "List warehouses",
    description = "Every warehouse, by priority (lower first), inactive ones included.",
    get, path = "/v1/warehouses", tag = "catalogue",
    responses((status = 200, description = "every warehouse, by priority", body = WarehouseList), QueryErrors))]
pub(crate) async fn list_warehouses(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut conn = state.db.acquire().await?;
    let items = catalogue::list_warehouses(&mut conn).await?;
    Ok(axum::Json(WarehouseList { items }).into_response())
}

/// A SKU's description; what is left out keeps its value (or default).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"name": "T-shirt, size M", "backorder_limit": 0}))]
pub(crate) struct SkuBody {
    #[schema(value_type = Option<Text>)]
    name: Option<String>,
    /// How far below zero `available` may go (backorders); default 0.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(value_type = Option<Count>)]
    backorder_limit: Option<i64>,
}

#[utoipa::path(operation_id = "putSku",
    summary = "Create or update a SKU",
    description = "201 when the SKU is new, 200 when it existed. The body is optional. `backorder_limit` lets reservations take up to that many units more than is on hand (per warehouse); lowering it below what is already backordered is 409 `backorder_limit_in_use`.",
    put, path = "/v1/skus/{sku}", tag = "catalogue", params(("sku" = Sku, Path, description = "the SKU")),
    request_body = Option<SkuBody>,
    responses((status = 201, description = "created", body = crate::store::catalogue::SkuRecord),
        (status = 200, description = "updated", body = crate::store::catalogue::SkuRecord),
        (status = 409, description = "backorder_limit_in_use: lowering the limit below what is backordered", body = Problem, content_type = "application/problem+json"),
        BodyErrors))]
pub(crate) async fn put_sku(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    OptionalJson(body): OptionalJson<SkuBody>,
) -> Result<Response, ApiError> {
    let body = body.unwrap_or_default();
    let mut v = Validator::new();
    let sku = v.check("sku", Sku::parse(sku));
    let name = v.optional("name", body.name, text);
    let backorder_limit = v.optional("backorder_limit", body.backorder_limit, |n| {
        if (0..=MAX_QUANTITY).contains(&n) { Ok(n) } else { Err(format!("must be between 0 and {MAX_QUANTITY}")) }
    });
    let upsert = v.finish(|| Some(SkuUpsert { sku: sku?, name: name?, backorder_limit: backorder_limit? }))?;
    let (sku, created) = state.engine.upsert_sku(&upsert).await?;
    Ok((created_or_ok(created), axum::Json(sku)).into_response())
}

#[utoipa::path(operation_id = "getSku",
    summary = "Get a SKU",
    description = "One SKU by its code.",
    get, path = "/v1/skus/{sku}", tag = "catalogue", params(("sku" = Sku, Path, description = "the SKU")),
    responses((status = 200, description = "the SKU", body = crate::store::catalogue::SkuRecord),
        (status = 404, description = "unknown SKU", body = Problem, content_type = "application/problem+json"),
        QueryErrors))]
pub(crate) async fn get_sku(State(state): State<AppState>, Path(sku): Path<String>) -> Result<Response, ApiError> {
    if Code::parse(sku.as_str()).is_err() {
        return Err(Refusal::UnknownSku(sku).into());
    }
    let mut conn = state.db.acquire().await?;
    let record = catalogue::get_sku(&mut conn, &sku).await?.ok_or(Refusal::UnknownSku(sku))?;
    Ok(axum::Json(record).into_response())
}
